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
        self._cached_h: dict = {}
        self._cached_kernel = None
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
        if not (self._cached_x is x_key and self._cached_batch is batch and self._cached_kernel is kernel):
            self._cached_h = self._shrink(x, batch, kernel)
            self._cached_x, self._cached_batch, self._cached_kernel = x_key, batch, kernel
        index = member.shared_index
        if kernel is not None:
            self._expand_with_kernel(kernel, member, index, y, batch.kernel_plan)
            gemm_segments = batch.kernel_plan.large
        else:
            gemm_segments = batch.segments
        for slot, start, end in gemm_segments:
            h = self._cached_h.get((slot, start))
            columns = self.columns[slot][index] if h is not None else None
            if columns is not None:
                y[start:end].addmm_(h[:, columns[0]:columns[1]], member.lora_b_t[slot],
                                    alpha=member.scalings[slot])

    def _expand_with_kernel(self, kernel, member: "MultiLoRALinear", index: int, y: torch.Tensor, plan) -> None:
        """The member's expand of every kernel-sized segment, in one call."""
        shrunk = self._cached_h["kernel"]       # one h per plan segment whose slot has an A here
        slots, starts, ends = plan.present(self.a_cat)
        work = [(position, slot) for position, slot in enumerate(slots) if self.columns[slot][index] is not None]
        if len(work) != len(slots):
            starts = [starts[p] for p, _ in work]
            ends = [ends[p] for p, _ in work]
        if work:
            kernel.lora_expand(y, starts, ends, [shrunk[p] for p, _ in work],
                               [self.columns[slot][index][0] for _, slot in work],
                               [member.lora_b_t[slot] for _, slot in work],
                               [float(member.scalings[slot]) for _, slot in work])

    def _shrink(self, x: torch.Tensor, batch: "LoRABatch", kernel) -> dict:
        """x[start:end] @ A_cat^T: per (slot, start) for GEMM segments, as a list under "kernel" for the rest."""
        shrunk: dict = {}
        if kernel is not None:
            plan = batch.kernel_plan
            slots, starts, ends = plan.present(self.a_cat)
            shrunk["kernel"] = (kernel.lora_shrink(x, starts, ends, [self.a_cat[slot] for slot in slots])
                                if slots else [])
            gemm_segments = plan.large
        else:
            gemm_segments = batch.segments
        for slot, start, end in gemm_segments:
            if self.a_cat[slot] is not None:
                shrunk[(slot, start)] = x[start:end] @ self.a_cat[slot].T
        return shrunk
