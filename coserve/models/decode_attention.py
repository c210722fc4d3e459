"""Decode attention for every decoding sequence of an iteration at once (CPU kernel and reference).

A decode is one query row per head attending to its sequence's cached keys.
Through SDPA each decode is its own call per layer, and on a CPU that call's
fixed cost is most of a decode's attention time (about 55 us on 2 cores for a
few hundred keys). `csrc/decode_attention_cpu.cpp` attends all of an
iteration's decodes in one call per layer, reading the paged cache through
each sequence's block table. `decode_attention_ref` states the same semantics
in plain torch (and is the path whenever autograd needs the result).

The kernel is compiled on first use like the LoRA kernel
(`peft_methods.lora.cpu_kernel.build_cpu_extension`); `load_decode_kernel()`
returns None, with the reason, where it cannot run (no AVX-512, no compiler,
or COSERVE_DECODE_ATTENTION_KERNEL=0).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from peft_methods.lora.cpu_kernel import build_cpu_extension

_SOURCE = Path(__file__).with_name("csrc") / "decode_attention_cpu.cpp"
DISABLE_ENV = "COSERVE_DECODE_ATTENTION_KERNEL"


@functools.cache
def load_decode_kernel() -> tuple[ModuleType | None, str]:
    """Build (once per machine) and load the kernel; (module, "") or (None, why not)."""
    return build_cpu_extension("coserve_decode_attention_cpu", _SOURCE, DISABLE_ENV)


@dataclass
class DecodeGroup:
    """All decodes of an iteration: row b of the batch attends to keys [lo_b, context_lens[b])."""

    rows: torch.Tensor            # [B] long, row of each decode token in the flat batch
    block_tables: torch.Tensor    # [B, max_blocks] long, padded with block 0
    context_lens: torch.Tensor    # [B] long, keys cached for the sequence, the new one included
    sliding_window: int | None
    """lo_b = context_lens[b] - sliding_window when the window is shorter than the context, else 0."""

    @classmethod
    def build(cls, rows: list[int], tables: list[list[int]], lens: list[int], sliding_window: int | None,
              device: torch.device) -> "DecodeGroup":
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        return cls(torch.tensor(rows, dtype=torch.long, device=device),
                   torch.tensor(padded, dtype=torch.long, device=device),
                   torch.tensor(lens, dtype=torch.long, device=device), sliding_window)


def decode_attention_ref(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         group: DecodeGroup, scale: float) -> torch.Tensor:
    """Attention output [B, heads, head_dim] of the group's rows of q [tokens, heads, head_dim].

    For decode b, head h (KV head g = h // (heads / kv_heads)) and keys p in [lo_b, len_b):
    out[b, h] = softmax_p(scale * q[rows[b], h] . K_b[p, g]) @ V_b[p, g], where K_b / V_b are
    the sequence's cached rows in position order (slot = block_tables[b][p // block_size] *
    block_size + p % block_size).
    """
    block_size, kv_heads, head_dim = key_cache.shape[1:]
    heads = q.shape[1]
    outs = []
    for b in range(group.rows.shape[0]):
        length = int(group.context_lens[b])
        low = max(0, length - group.sliding_window) if group.sliding_window else 0
        positions = torch.arange(low, length, device=q.device)
        slots = group.block_tables[b][positions // block_size] * block_size + positions % block_size
        keys = key_cache.view(-1, kv_heads, head_dim)[slots].repeat_interleave(heads // kv_heads, dim=1)
        values = value_cache.view(-1, kv_heads, head_dim)[slots].repeat_interleave(heads // kv_heads, dim=1)
        query = q[group.rows[b]]                                             # [heads, d]
        weights = torch.softmax(scale * torch.einsum("hd,phd->hp", query, keys), dim=-1)
        outs.append(torch.einsum("hp,phd->hd", weights, values))
    return torch.stack(outs)


def decode_attention(kernel: ModuleType | None, q: torch.Tensor, key_cache: torch.Tensor,
                     value_cache: torch.Tensor, group: DecodeGroup, scale: float, out: torch.Tensor) -> None:
    """Write the group's attention rows into out [tokens, heads, head_dim]: through the kernel when
    it is given and autograd does not need the result, through `decode_attention_ref` otherwise."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or key_cache.requires_grad)
    if kernel is not None and not needs_grad and q.dtype == torch.float32 and out.is_contiguous():
        kernel.decode_attention(q.contiguous(), key_cache, value_cache, group.rows, group.block_tables, group.context_lens,
                                group.sliding_window or 0, float(scale), out)
        return
    out.index_copy_(0, group.rows, decode_attention_ref(q, key_cache, value_cache, group, scale).to(out.dtype))
