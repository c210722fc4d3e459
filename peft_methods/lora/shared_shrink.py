"""One shrink GEMM for sibling LoRA layers that read the same input.

q/k/v projections (and gate/up) all multiply the same activations by their
LoRA A matrices. `SharedShrink` keeps, per adapter slot, the members' A
matrices concatenated ([sum of member ranks, in]); the first
member called in a forward computes `x[s:e] @ A_cat^T` once per adapter
segment and every member expands its own columns (through the CPU kernel for
small segments where the context has it, see `cpu_kernel`). Same result as each member
shrinking alone (`lora_apply_grouped`), with one GEMM instead of three (or two)
and wider ones, which matters most for the small segments of decode tokens.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from peft_methods.lora.cpu_kernel import KERNEL_MAX_ROWS

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
        self.a_cat: list[torch.Tensor | None] = [None] * max_loras     # [sum of ranks, in] per slot
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
        self.a_cat[slot] = torch.cat(parts) if parts else None
        self.columns[slot] = columns
        self._cached_x = self._cached_batch = None

    def apply(self, member: "MultiLoRALinear", x_key: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
              batch: "LoRABatch") -> None:
        """Add member's LoRA delta to y [T, out] in place; x is [T, in], x_key the tensor it was called with."""
        kernel = member.context.kernel_for(y, x)
        # NOTE: identity of the held input and batch (not ids) decides reuse, so a new forward whose
        # tensors happen to reuse freed memory can never read a stale shrink.
        if not (self._cached_x is x_key and self._cached_batch is batch):
            self._cached_h = self._shrink(x, batch.segments, kernel)
            self._cached_x, self._cached_batch = x_key, batch
        index = member.shared_index
        kernel_work: list[tuple[int, int, torch.Tensor, int, int]] = []  # (start, end, h, column, slot)
        for (slot, start, end), h in zip(batch.segments, self._cached_h):
            columns = self.columns[slot][index] if h is not None else None
            if columns is None:
                continue
            if kernel is not None and end - start <= KERNEL_MAX_ROWS:
                kernel_work.append((start, end, h, columns[0], slot))
            else:
                y[start:end].addmm_(h[:, columns[0]:columns[1]], member.lora_b[slot].T,
                                    alpha=member.scalings[slot])
        if kernel_work:
            kernel.lora_expand(y, [w[0] for w in kernel_work], [w[1] for w in kernel_work],
                               [w[2] for w in kernel_work], [w[3] for w in kernel_work],
                               [member.lora_b[w[4]].T for w in kernel_work],
                               [float(member.scalings[w[4]]) for w in kernel_work])

    def _shrink(self, x: torch.Tensor, segments, kernel) -> list[torch.Tensor | None]:
        """x[start:end] @ A_cat^T for every segment (None where the slot has no A here)."""
        shrunk: list[torch.Tensor | None] = [None] * len(segments)
        small = []
        for position, (slot, start, end) in enumerate(segments):
            a_cat = self.a_cat[slot]
            if a_cat is None:
                continue
            if kernel is not None and end - start <= KERNEL_MAX_ROWS:
                small.append(position)
            else:
                shrunk[position] = x[start:end] @ a_cat.T
        if small:
            picked = [segments[p] for p in small]
            results = kernel.lora_shrink(x, [seg[1] for seg in picked], [seg[2] for seg in picked],
                                         [self.a_cat[seg[0]] for seg in picked])
            for position, h in zip(small, results):
                shrunk[position] = h
        return shrunk
