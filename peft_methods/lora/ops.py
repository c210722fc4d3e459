"""Batched multi-adapter LoRA: y += scaling * (x @ A.T) @ B.T, per token's adapter.

Two paths with identical semantics. `lora_apply_ref` is the pure-torch gather +
einsum reference over a per-token slot index. `lora_apply_grouped` is the
segment form: the runner sorts tokens so each adapter's rows are contiguous, and
each segment costs one shrink GEMM and one in-place expand `addmm_`, with no
padding of heterogeneous ranks; the layers' `group.LoRAGroup` computes the same
for sibling linears at once. Slot -1 (or rows outside every segment) means no
adapter.
"""
from __future__ import annotations

from typing import Sequence

import torch

Segment = tuple[int, int, int]  # (slot, start, end): rows [start, end) use `slot`
NO_ADAPTER = -1


def segments_from_slots(token_slots: Sequence[int]) -> list[Segment]:
    """Merge runs of equal slots into (slot, start, end) segments, skipping -1."""
    segments: list[Segment] = []
    start = 0
    for i in range(1, len(token_slots) + 1):
        if i == len(token_slots) or token_slots[i] != token_slots[start]:
            if token_slots[start] != NO_ADAPTER:
                segments.append((int(token_slots[start]), start, i))
            start = i
    return segments


def lora_apply_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    token_slots: torch.Tensor,
    lora_a: Sequence[torch.Tensor | None],
    lora_b: Sequence[torch.Tensor | None],
    scalings: Sequence[float],
) -> torch.Tensor:
    """Add each token's LoRA delta to `y` in place and return `y`.

    Semantics: for every row t with s = token_slots[t] >= 0,
    y[t] += scalings[s] * (x[t] @ lora_a[s].T) @ lora_b[s].T; rows with slot -1
    are untouched. lora_a[s] is [r_s, in], lora_b[s] is [out, r_s]; ranks may
    differ between slots (zero-padded here to the largest rank, which adds
    nothing). An empty slot (None: the adapter does not target this layer)
    adds nothing.

    Args:
        y: [T, out] base output, updated in place.
        x: [T, in] layer input.
        token_slots: [T] long, slot per row or -1.
    """
    used = sorted(set(token_slots[token_slots >= 0].tolist()))
    bad = [s for s in used if s >= len(lora_a)]
    if bad:
        raise ValueError(f"tokens point at LoRA slots {bad}, but there are only {len(lora_a)} slots")
    # NOTE: an empty slot is an adapter that does not target this layer; its
    # rows keep zero A/B below and so get no delta.
    used = [s for s in used if lora_a[s] is not None and lora_b[s] is not None]
    if not used:
        return y
    rows = torch.nonzero(token_slots >= 0).flatten()  # [T']
    slots = token_slots[rows]  # [T']
    max_rank = max(lora_a[s].shape[0] for s in used)
    num_slots, out_features, in_features = len(lora_a), y.shape[1], x.shape[1]
    a_all = x.new_zeros(num_slots, max_rank, in_features)  # [S, R, in]
    b_all = x.new_zeros(num_slots, out_features, max_rank)  # [S, out, R]
    scale_all = x.new_zeros(num_slots)  # [S]
    for s in used:
        rank = lora_a[s].shape[0]
        a_all[s, :rank] = lora_a[s]
        b_all[s, :, :rank] = lora_b[s]
        scale_all[s] = scalings[s]
    shrink = torch.einsum("ti,tri->tr", x[rows], a_all[slots])  # [T', R]
    expand = torch.einsum("tr,tor->to", shrink, b_all[slots])  # [T', out]
    y.index_add_(0, rows, expand * scale_all[slots].unsqueeze(1))
    return y


def lora_apply_grouped(
    y: torch.Tensor,
    x: torch.Tensor,
    segments: Sequence[Segment],
    lora_a: Sequence[torch.Tensor | None],
    lora_b: Sequence[torch.Tensor | None],
    scalings: Sequence[float],
) -> torch.Tensor:
    """Same result as `lora_apply_ref`, given contiguous per-adapter segments.

    Semantics: for each (slot, start, end), rows [start, end) get
    y[start:end] += scalings[slot] * (x[start:end] @ A.T) @ B.T; rows outside
    every segment, and segments whose slot is empty (None), are untouched.
    Segments must not overlap.
    """
    for slot, start, end in segments:
        lora_a_s, lora_b_s = lora_a[slot], lora_b[slot]
        if lora_a_s is None or lora_b_s is None:
            continue
        shrink = x[start:end] @ lora_a_s.T  # [n, r]
        y[start:end].addmm_(shrink, lora_b_s.T, alpha=scalings[slot])
    return y
