"""What one training sequence keeps between its forward and its backward.

Per token: the input of every decoder layer (the backward recomputes each
layer from it), the loss gradient at the final hidden state (computed during
the forward, so the vocabulary projection never runs again), the target id,
and, from the start of the backward, dK/dV accumulators per layer that collect
the gradient later queries send to earlier keys. The accumulators cover only
the tokens before the first (last-in-sequence) window, which no later query
sees: none at all when one window covers the sequence. The K/V themselves
stay in the paged cache. `nbytes()` counts every byte these tensors hold.
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
        # Between the pieces of a layer window: the gradient at the input of the last layer done.
        self.pending_grad: torch.Tensor | None = None

    def start_backward(self, first_window_start: int) -> None:
        """Allocate dK/dV accumulators for tokens [0, first_window_start), once."""
        if self.grad_key is None:
            layers, _, kv_heads, head_dim = self._kv_grad_shape
            shape = (layers, first_window_start, kv_heads, head_dim)
            device = self.layer_inputs.device
            self.grad_key = torch.zeros(shape, dtype=self.GRAD_DTYPE, device=device)
            self.grad_value = torch.zeros(shape, dtype=self.GRAD_DTYPE, device=device)

    def kv_grads(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient later windows sent to K/V rows [start, end) of `layer` (zeros for the first window)."""
        if end <= self.grad_key.shape[1]:
            return self.grad_key[layer, start:end], self.grad_value[layer, start:end]
        shape = (end - start,) + tuple(self.grad_key.shape[2:])
        zeros = torch.zeros(shape, dtype=self.GRAD_DTYPE, device=self.grad_key.device)
        return zeros, zeros

    def nbytes(self) -> int:
        """Bytes held now."""
        held = [self.layer_inputs, self.grad_final, self.targets]
        if self.grad_key is not None:
            held += [self.grad_key, self.grad_value]
        if self.pending_grad is not None:
            held.append(self.pending_grad)
        return sum(t.untyped_storage().nbytes() for t in held)
