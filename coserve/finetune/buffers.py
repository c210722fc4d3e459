"""What one training sequence keeps between its forward and its backward.

Per token: the input of every decoder layer (the backward recomputes each
layer from it), the loss gradient at the final hidden state (computed during
the forward, so the vocabulary projection never runs again), the target id,
and, from the start of the backward, dK/dV accumulators per layer that collect
the gradient later queries send to earlier keys. The K/V themselves stay in
the paged cache. `nbytes()` counts every byte these tensors hold.
"""
from __future__ import annotations

import torch


class SequenceBuffers:
    # NOTE: gradients are accumulated in fp32 whatever the model dtype.
    GRAD_DTYPE = torch.float32

    def __init__(self, num_layers: int, length: int, hidden_size: int, num_kv_heads: int, head_dim: int,
                 targets: list[int], dtype: torch.dtype, device: torch.device) -> None:
        if len(targets) != length:
            raise ValueError(f"{len(targets)} targets for a sequence of {length} tokens")
        self.length = length
        self.layer_inputs = torch.empty(num_layers, length, hidden_size, dtype=dtype, device=device)
        self.grad_final = torch.zeros(length, hidden_size, dtype=self.GRAD_DTYPE, device=device)
        self.targets = torch.tensor(targets, dtype=torch.long, device=device)  # [length], -100 = none
        self._kv_grad_shape = (num_layers, length, num_kv_heads, head_dim)
        self.grad_key: torch.Tensor | None = None    # [layers, length, kv_heads, head_dim]
        self.grad_value: torch.Tensor | None = None

    def start_backward(self) -> None:
        if self.grad_key is None:
            device = self.layer_inputs.device
            self.grad_key = torch.zeros(self._kv_grad_shape, dtype=self.GRAD_DTYPE, device=device)
            self.grad_value = torch.zeros(self._kv_grad_shape, dtype=self.GRAD_DTYPE, device=device)

    def nbytes(self, include_kv_grads: bool = True) -> int:
        """Bytes held now (KV grads counted as if allocated when include_kv_grads)."""
        held = [self.layer_inputs, self.grad_final, self.targets]
        total = sum(t.untyped_storage().nbytes() for t in held)
        if include_kv_grads:
            numel = 1
            for size in self._kv_grad_shape:
                numel *= size
            total += 2 * numel * torch.empty((), dtype=self.GRAD_DTYPE).element_size()
        return total
