"""Small building blocks shared by the Llama-family model: RMSNorm and rotary embeddings.

Rotary inverse frequencies come from transformers' own `ROPE_INIT_FUNCTIONS`,
so every rope variant a checkpoint declares (default, llama3, linear, yarn, ...)
matches Hugging Face exactly without a second implementation here.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: the variance is taken in fp32 (or wider) whatever the model dtype, as HF does.
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None)
    if params is None:  # older transformers configs
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        params.setdefault("rope_type", params.get("type", "default"))
    return params


class RotaryEmbedding(nn.Module):
    """cos/sin tables for arbitrary (non-contiguous) token positions."""

    def __init__(self, config, head_dim: int) -> None:
        super().__init__()
        params = rope_parameters(config)
        rope_type = params.get("rope_type", "default")
        # NOTE: computed on the CPU even when the model is being built on the meta device.
        with torch.device("cpu"):
            inv_freq = self._inv_freq(config, params, rope_type, head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def _inv_freq(self, config, params: dict, rope_type: str, head_dim: int) -> torch.Tensor:
        if rope_type == "default":
            inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            self.attention_scaling = 1.0
        elif rope_type in ROPE_INIT_FUNCTIONS and rope_type != "dynamic":
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        else:
            raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, "
                             + ", ".join(sorted(k for k in ROPE_INIT_FUNCTIONS if k != "dynamic")))
        return inv_freq

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [num_tokens, head_dim], looked up from a table that grows to the largest position seen."""
        needed = int(positions.max()) + 1 if positions.numel() else 0
        table = self._tables.get(dtype)
        if table is None or table[0].shape[0] < needed:
            table = self._build_table(max(needed, 2 * (table[0].shape[0] if table else 1024)), dtype)
            self._tables[dtype] = table
        return table[0].index_select(0, positions), table[1].index_select(0, positions)

    def _build_table(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(length, device=self.inv_freq.device, dtype=torch.float)
        freqs = positions[:, None] * self.inv_freq[None, :]            # [length, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)                         # [length, head_dim]
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

    def _apply(self, fn, recurse=True):
        self._tables = {}  # moved to another device: rebuild the tables there
        return super()._apply(fn, recurse)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, heads, head_dim]; cos/sin: [num_tokens, head_dim] (HF's rotate-half layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
