"""Sibling LoRA layers that read one input, applied together per adapter segment.

q/k/v projections (and gate/up) all multiply the same activations by their
LoRA A matrices. A `LoRAGroup` keeps, per adapter slot, its members' A
matrices stacked ([sum of member ranks, in]); the first member called in a
forward computes `x[s:e] @ A_stack^T` once per adapter segment and every
member expands its own columns. Same result as each member shrinking alone
(`lora_apply_grouped`), with one GEMM instead of three (or two) and wider ones,
which matters most for the small segments of decode tokens. Every
`MultiLoRALinear` starts in a group of its own; `LoRAGroup(members)` regroups
siblings.

Where the context has the CPU kernel (`cpu_kernel`), segments of up to
`KERNEL_MAX_ROWS` rows go to the kernel's `LoRAGroup`, which holds each slot's
weights in its own layouts, so a forward passes it only the activations and
the batch's plan table; longer segments (prefill chunks) take the GEMMs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from peft_methods.lora.layer import LoRABatch, MultiLoRALinear


class LoRAGroup:
    def __init__(self, members: list["MultiLoRALinear"]) -> None:
        if not members:
            raise ValueError("a LoRA group needs at least one member layer")
        in_features = {m.in_features for m in members}
        if len(in_features) != 1:
            raise ValueError(f"members of a LoRA group must have one input size, got {sorted(in_features)}")
        self.members = members
        self.max_loras = members[0].max_loras
        self.a_stack: list[torch.Tensor | None] = [None] * self.max_loras   # [sum of ranks, in] per slot
        self.columns: list[list[tuple[int, int] | None]] = [[None] * len(members) for _ in range(self.max_loras)]
        self._kernel_group = None     # the kernel's LoRAGroup, made on the first forward that uses it
        self._cached_x: torch.Tensor | None = None
        self._cached_batch: "LoRABatch | None" = None
        self._cached_h: dict = {}
        self._cached_kernel = None
        for index, member in enumerate(members):
            member.attach_group(self, index)
        for slot in range(self.max_loras):
            self.rebuild(slot)

    def rebuild(self, slot: int) -> None:
        """Re-stack slot's A matrices after a member's slot changed."""
        parts, columns, offset = [], [None] * len(self.members), 0
        for index, member in enumerate(self.members):
            lora_a = member.lora_a[slot]
            if lora_a is not None:
                parts.append(lora_a)
                columns[index] = (offset, offset + lora_a.shape[0])
                offset += lora_a.shape[0]
        self.a_stack[slot] = torch.cat(parts) if parts else None
        self.columns[slot] = columns
        self._cached_x = self._cached_batch = None
        if self._kernel_group is not None:
            self._sync_kernel_slot(slot)

    def apply(self, member: "MultiLoRALinear", x_key: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
              batch: "LoRABatch") -> None:
        """Add member's LoRA delta to y [T, out] in place; x is [T, in], x_key the tensor it was called with."""
        kernel = member.context.kernel_for(y, x)
        # NOTE: identity of the held input and batch (not ids) decides reuse, so a new forward whose
        # tensors happen to reuse freed memory can never read a stale shrink.
        if not (self._cached_x is x_key and self._cached_batch is batch and self._cached_kernel is kernel):
            self._cached_h = self._shrink(x, batch, kernel)
            self._cached_x, self._cached_batch, self._cached_kernel = x_key, batch, kernel
        index = member.group_index
        if kernel is not None:
            plan = batch.kernel_plan
            if plan.num_kernel_segments:
                self._kernel_group.expand(index, y, self._cached_h["kernel"], plan.table)
            gemm_segments = plan.large
        else:
            gemm_segments = batch.segments
        for slot, start, end in gemm_segments:
            h = self._cached_h.get((slot, start))
            columns = self.columns[slot][index] if h is not None else None
            if columns is not None:
                y[start:end].addmm_(h[:, columns[0]:columns[1]], member.lora_b_t[slot],
                                    alpha=member.scalings[slot])

    def _shrink(self, x: torch.Tensor, batch: "LoRABatch", kernel) -> dict:
        """x[start:end] @ A_stack^T: per (slot, start) for GEMM segments, flat under "kernel" for the rest."""
        shrunk: dict = {}
        if kernel is not None:
            plan = batch.kernel_plan
            if plan.num_kernel_segments:
                shrunk["kernel"] = self._kernel_group_of(kernel).shrink(x, plan.table)
            gemm_segments = plan.large
        else:
            gemm_segments = batch.segments
        for slot, start, end in gemm_segments:
            if self.a_stack[slot] is not None:
                shrunk[(slot, start)] = x[start:end] @ self.a_stack[slot].T
        return shrunk

    def _kernel_group_of(self, kernel):
        if self._kernel_group is None:
            self._kernel_group = kernel.LoRAGroup(self.members[0].in_features,
                                                  [m.out_features for m in self.members], self.max_loras)
            for slot in range(self.max_loras):
                self._sync_kernel_slot(slot)
        return self._kernel_group

    def _sync_kernel_slot(self, slot: int) -> None:
        a_stack, columns = self.a_stack[slot], self.columns[slot]
        if a_stack is None:
            self._kernel_group.clear_slot(slot)
            return
        self._kernel_group.set_slot(
            slot, a_stack,
            [c[0] if c is not None else -1 for c in columns],
            [m.lora_b_t[slot] if c is not None else None for m, c in zip(self.members, columns)],
            [float(m.scalings[slot]) for m in self.members])
