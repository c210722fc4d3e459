"""Multi-adapter LoRA linear layer and the per-forward batch context it reads.

`MultiLoRALinear` wraps a frozen nn.Linear (`base_layer`, as in peft) and owns
`max_loras` device slots, each holding one adapter's A, B and scaling at its own
rank. Which slot each token uses comes from the `LoRABatch` set on the shared
`LoRAContext` for the duration of one forward (`with context.use(batch):`);
with no batch set the layer is the plain base linear. The deltas are applied
by the layer's `LoRAGroup` (its own, or one shared with siblings reading the
same input), or by the reference op where the context forces it.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from peft_methods.lora.cpu_kernel import KernelPlan, kernel_applies, load_cpu_kernel
from peft_methods.lora.group import LoRAGroup
from peft_methods.lora.ops import Segment, lora_apply_ref, segments_from_slots

logger = logging.getLogger(__name__)


@dataclass
class LoRABatch:
    """Adapter slot of every token (row) of one forward."""

    segments: list[Segment]
    """(slot, start, end): rows [start, end) use `slot`; read by the grouped path."""
    token_slots: torch.Tensor
    """[num_tokens] long, slot per row or -1; read by the reference path."""

    def __post_init__(self) -> None:
        if self.token_slots.dim() != 1 or self.token_slots.dtype != torch.long:
            raise ValueError("token_slots must be a 1-D long tensor [num_tokens]")
        num_tokens, last_end = self.token_slots.shape[0], 0
        for slot, start, end in sorted(self.segments, key=lambda seg: seg[1]):
            if slot < 0 or start < last_end or end <= start or end > num_tokens:
                raise ValueError(
                    f"bad segment {(slot, start, end)}: need slot >= 0, start < end <= {num_tokens} "
                    "and no overlap"
                )
            last_end = end

    @classmethod
    def from_slots(cls, token_slots: Sequence[int], device: torch.device | str = "cpu") -> "LoRABatch":
        """Build both views from a per-token slot list (-1 = no adapter)."""
        return cls(
            segments=segments_from_slots(token_slots),
            token_slots=torch.tensor(list(token_slots), dtype=torch.long, device=device),
        )

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]

    @functools.cached_property
    def kernel_plan(self) -> KernelPlan:
        """The segments split for the CPU kernel, made once for all layers of the forward."""
        return KernelPlan.of(self.segments)


class LoRAContext:
    """Shared by all MultiLoRALinear layers of one model: the current batch.

    The op path is chosen once here: segment GEMMs by default; the `*_ref`
    reference when `use_ref=True` (tests force it); with `use_cpu_kernel=True`
    (CPU engines) the AVX-512 kernel for segments of up to `KERNEL_MAX_ROWS`
    rows where it loads, GEMMs for the rest. Calls the kernel cannot take (not
    fp32, autograd) take the GEMMs.
    """

    def __init__(self, use_ref: bool = False, use_cpu_kernel: bool = False) -> None:
        self._use_ref = bool(use_ref)
        self.batch: LoRABatch | None = None
        self.cpu_kernel = None
        if self._use_ref:
            path = "lora_apply_ref (forced)"
        elif use_cpu_kernel:
            self.cpu_kernel, why_not = load_cpu_kernel()
            path = ("AVX-512 kernel for decode-sized segments, segment GEMMs for the rest"
                    if self.cpu_kernel is not None else f"segment GEMMs (no CPU kernel: {why_not})")
        else:
            path = "segment GEMMs, no rank padding"
        self.path = path
        logger.info("LoRA op path: %s", path)

    @property
    def use_ref(self) -> bool:
        return self._use_ref

    @contextlib.contextmanager
    def use(self, batch: LoRABatch | None) -> Iterator[LoRABatch | None]:
        """Set `batch` for the forwards inside the block; restore the previous one after."""
        previous = self.batch
        self.batch = batch
        try:
            yield batch
        finally:
            self.batch = previous

    def apply_ref(self, y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor | None],
                  lora_b: Sequence[torch.Tensor | None], scalings: Sequence[float]) -> torch.Tensor:
        """Add the current batch's LoRA deltas to y [T, out] in place through the reference op."""
        return lora_apply_ref(y, x, self.batch.token_slots, lora_a, lora_b, scalings)

    def kernel_for(self, y: torch.Tensor, x: torch.Tensor):
        """The CPU kernel module if this call may use it, else None."""
        if self.cpu_kernel is not None and kernel_applies(y, x):
            return self.cpu_kernel
        return None


class MultiLoRALinear(nn.Module):
    """nn.Linear plus `max_loras` adapter slots applied per token."""

    def __init__(self, base_layer: nn.Linear, max_loras: int, context: LoRAContext) -> None:
        super().__init__()
        if max_loras <= 0:
            raise ValueError(f"max_loras must be positive, got {max_loras}")
        self.base_layer = base_layer
        self.max_loras = max_loras
        self.context = context
        # NOTE: plain lists, not buffers: slots are serving state, kept out of
        # state_dict and loaded by the adapter manager after the model is placed.
        self.lora_a: list[torch.Tensor | None] = [None] * max_loras  # [r_s, in]
        self.lora_b: list[torch.Tensor | None] = [None] * max_loras  # [out, r_s], a view of lora_b_t's
        self.lora_b_t: list[torch.Tensor | None] = [None] * max_loras  # [r_s, out] contiguous
        self.scalings: list[float] = [0.0] * max_loras
        self.group: LoRAGroup | None = None   # set by LoRAGroup below: this layer's, or one shared with siblings
        self.group_index = -1
        LoRAGroup([self])

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def set_slot(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        """Copy A [r, in] and B [out, r] into `slot` on the base weight's device and dtype."""
        self._check_slot(slot)
        rank = lora_a.shape[0]
        if tuple(lora_a.shape) != (rank, self.in_features) or tuple(lora_b.shape) != (self.out_features, rank):
            raise ValueError(
                f"LoRA shapes A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} do not fit a "
                f"Linear({self.in_features} -> {self.out_features}): need A [r, {self.in_features}], "
                f"B [{self.out_features}, r]"
            )
        weight = self.base_layer.weight
        with torch.no_grad():
            self.lora_a[slot] = lora_a.detach().to(device=weight.device, dtype=weight.dtype, copy=True)
            # NOTE: B is stored transposed and contiguous ([r, out]), the layout the expand GEMM
            # reads fastest; lora_b[slot] is a [out, r] view of it for the reference op.
            lora_b_t = torch.empty((rank, self.out_features), device=weight.device, dtype=weight.dtype)
            lora_b_t.copy_(lora_b.detach().T)
            self.lora_b_t[slot] = lora_b_t
            self.lora_b[slot] = lora_b_t.T
        self.scalings[slot] = float(scaling)
        self.group.rebuild(slot)

    def clear_slot(self, slot: int) -> None:
        self._check_slot(slot)
        self.lora_a[slot] = None
        self.lora_b[slot] = None
        self.lora_b_t[slot] = None
        self.scalings[slot] = 0.0
        self.group.rebuild(slot)

    def attach_group(self, group: LoRAGroup, index: int) -> None:
        self.group, self.group_index = group, index

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_loras:
            raise ValueError(f"slot {slot} out of range [0, {self.max_loras})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # [..., out]
        if self.context.batch is None:
            return out
        out = out.contiguous()
        # NOTE: views, so the in-place LoRA update lands in `out`; rows are tokens.
        y, rows = out.view(-1, self.out_features), x.reshape(-1, self.in_features)
        batch = self.context.batch
        if batch.num_tokens != rows.shape[0]:
            raise ValueError(f"LoRABatch covers {batch.num_tokens} tokens but the layer got {rows.shape[0]} rows")
        if self.context.use_ref:
            self.context.apply_ref(y, rows, self.lora_a, self.lora_b, self.scalings)
        else:
            self.group.apply(self, x, rows, y, batch)
        return out

    def extra_repr(self) -> str:
        num_loaded = sum(a is not None for a in self.lora_a)
        return f"max_loras={self.max_loras}, loaded={num_loaded}"
