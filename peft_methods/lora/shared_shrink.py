"""One shrink GEMM for sibling LoRA layers that read the same input.

q/k/v projections (and gate/up) all multiply the same activations by their
LoRA A matrices. `SharedShrink` keeps, per adapter slot, the members' A
matrices concatenated and transposed ([in, sum of member ranks]); the first
member called in a forward computes `x[s:e] @ A_cat^T` once per adapter
segment and every member expands its own columns. Same result as each member
shrinking alone (`lora_apply_grouped`), with one GEMM instead of three (or two)
and wider ones, which matters most for the small segments of decode tokens.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from peft_methods.lora.layer import LoRABatch, MultiLoRALinear


class SharedShrink:
    def __init__(self, members: list["MultiLoRALinear"]) -> None:
        if len(members) < 2:
            raise ValueError("a shared shrink needs at least two member layers")
        in_features = {m.in_features for m in members}
        if len(in_features) != 1:
            raise ValueError(f"members of a shared shrink must have one input size, got {sorted(in_features)}")
        self.members = members
        max_loras = members[0].max_loras
        self.a_cat_t: list[torch.Tensor | None] = [None] * max_loras     # [in, sum of ranks] per slot
        self.columns: list[list[tuple[int, int] | None]] = [[None] * len(members) for _ in range(max_loras)]
        self._cached_x: torch.Tensor | None = None
        self._cached_batch: "LoRABatch | None" = None
        self._cached_h: list[torch.Tensor | None] = []
        for index, member in enumerate(members):
            member.attach_shared_shrink(self, index)

    def rebuild(self, slot: int) -> None:
        """Re-concatenate slot's A matrices after a member's slot changed."""
        parts, columns, offset = [], [None] * len(self.members), 0
        for index, member in enumerate(self.members):
            lora_a = member.lora_a[slot]
            if lora_a is not None:
                parts.append(lora_a)
                columns[index] = (offset, offset + lora_a.shape[0])
                offset += lora_a.shape[0]
        self.a_cat_t[slot] = torch.cat(parts).T.contiguous() if parts else None
        self.columns[slot] = columns
        self._cached_x = self._cached_batch = None

    def apply(self, member: "MultiLoRALinear", x_key: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
              batch: "LoRABatch") -> None:
        """Add member's LoRA delta to y [T, out] in place; x is [T, in], x_key the tensor it was called with."""
        # NOTE: identity of the held input and batch (not ids) decides reuse, so a new forward whose
        # tensors happen to reuse freed memory can never read a stale shrink.
        if not (self._cached_x is x_key and self._cached_batch is batch):
            self._cached_h = [None if self.a_cat_t[slot] is None else x[start:end] @ self.a_cat_t[slot]
                              for slot, start, end in batch.segments]
            self._cached_x, self._cached_batch = x_key, batch
        index = member.shared_index
        for (slot, start, end), h in zip(batch.segments, self._cached_h):
            columns = self.columns[slot][index] if h is not None else None
            if columns is None:
                continue
            y[start:end].addmm_(h[:, columns[0]:columns[1]], member.lora_b[slot].T, alpha=member.scalings[slot])
