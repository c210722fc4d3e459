"""The trainable weights of one adapter being finetuned, kept apart from the serving slots.

`TrainableLoRA` holds one (A, B) pair of fp32 leaf parameters per targeted
module, in model order, plus each module's scaling. The optimizer updates
these; after each optimizer step the engine copies them into the adapter's
serving slot (`to_adapter()`), so inference sees the new weights.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from peft_methods.lora.config import LoRAAdapterConfig
from peft_methods.lora.weights import LoRAAdapter

LoRAWeights = tuple[torch.Tensor, torch.Tensor, float]  # (A [r, in], B [out, r], scaling)


class TrainableLoRA:
    def __init__(self, config: LoRAAdapterConfig, params: dict[str, tuple[nn.Parameter, nn.Parameter]]) -> None:
        if not params:
            raise ValueError("the LoRA config targets no module of the model; check target_modules")
        self.config = config
        self.params = params
        self.scalings = {name: config.scaling_for(name) for name in params}

    @classmethod
    def initialize(cls, config: LoRAAdapterConfig, linears: dict[str, nn.Module], seed: int,
                   device: torch.device) -> "TrainableLoRA":
        """peft's default init: A kaiming-uniform (a=sqrt(5)), B zero; drawn from a generator seeded with `seed`."""
        generator = torch.Generator().manual_seed(seed)
        params = {}
        for name, linear in linears.items():
            if not config.is_target(name):
                continue
            rank = config.rank_for(name)
            lora_a = torch.empty(rank, linear.in_features)
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator)
            lora_b = torch.zeros(linear.out_features, rank)
            params[name] = (nn.Parameter(lora_a.to(device)), nn.Parameter(lora_b.to(device)))
        return cls(config, params)

    @classmethod
    def from_adapter(cls, adapter: LoRAAdapter, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> "TrainableLoRA":
        """Start from saved weights; master weights are fp32 unless `dtype` says otherwise (fp64 tests)."""
        params = {name: (nn.Parameter(a.detach().to(device=device, dtype=dtype, copy=True)),
                         nn.Parameter(b.detach().to(device=device, dtype=dtype, copy=True)))
                  for name, (a, b) in adapter.weights.items()}
        return cls(adapter.config, params)

    def parameters(self) -> list[nn.Parameter]:
        """A then B of every module, in model order (the optimizer's parameter order)."""
        return [p for pair in self.params.values() for p in pair]

    def get(self, module_name: str) -> LoRAWeights | None:
        pair = self.params.get(module_name)
        if pair is None:
            return None
        return pair[0], pair[1], self.scalings[module_name]

    def to_adapter(self) -> LoRAAdapter:
        """A CPU snapshot in serving/saving form."""
        weights = {name: (a.detach().cpu().clone(), b.detach().cpu().clone()) for name, (a, b) in self.params.items()}
        return LoRAAdapter(config=self.config, weights=weights)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())
