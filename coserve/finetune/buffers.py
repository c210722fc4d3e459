"""What one training sequence keeps between its forward and its backward.

Per token: the input of every decoder layer (the backward recomputes each
layer from it), the loss gradient at the final hidden state (computed during
the forward, so the vocabulary projection never runs again), the target id,
and, from the start of the backward, dK/dV accumulators per layer that collect
the gradient later queries send to earlier keys. The accumulators cover only
the tokens before the first (last-in-sequence) window, which no later query
sees: none at all when one window covers the sequence (they grow when a
window's layer is cut by tokens, whose later part sends gradient to the
earlier one). The K/V themselves stay in the paged cache. `nbytes()` counts
every byte these tensors hold.
"""
from __future__ import annotations

import torch


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gradients are kept in at least fp32: fp32 for fp32/bf16/fp16 models, fp64 for fp64 ones (so an
    fp64 backward cut into windows and pieces equals the whole sequence's to fp64 rounding)."""
    return torch.promote_types(dtype, torch.float32)


class SequenceBuffers:

    def __init__(self, num_layers: int, length: int, hidden_size: int, num_kv_heads: int, head_dim: int,
                 targets: list[int], dtype: torch.dtype, device: torch.device) -> None:
        if len(targets) != length:
            raise ValueError(f"{len(targets)} targets for a sequence of {length} tokens")
        self.length = length
        self.layer_inputs = torch.empty(num_layers, length, hidden_size, dtype=dtype, device=device)
        self.grad_dtype = grad_dtype(dtype)
        self.grad_final = torch.zeros(length, hidden_size, dtype=self.grad_dtype, device=device)
        self.targets = torch.tensor(targets, dtype=torch.long, device=device)  # [length], -100 = none
        self._kv_grad_shape = (num_layers, length, num_kv_heads, head_dim)
        self.grad_key: torch.Tensor | None = None    # [layers, length, kv_heads, head_dim]
        self.grad_value: torch.Tensor | None = None
        # Between the pieces of a window: the gradient at the output of the layer the backward is in
        # (the input gradient of the last whole layer done), for all the window's tokens, and the
        # input gradient of the layer in progress for its tokens done so far (a token-cut layer).
        self.pending_grad: torch.Tensor | None = None
        self.partial_grad: torch.Tensor | None = None

    def start_backward(self, first_window_start: int) -> None:
        """Allocate dK/dV accumulators for tokens [0, first_window_start), once."""
        if self.grad_key is None:
            layers, _, kv_heads, head_dim = self._kv_grad_shape
            shape = (layers, first_window_start, kv_heads, head_dim)
            device = self.layer_inputs.device
            self.grad_key = torch.zeros(shape, dtype=self.grad_dtype, device=device)
            self.grad_value = torch.zeros(shape, dtype=self.grad_dtype, device=device)

    def cover_kv_grads(self, num_rows: int) -> None:
        """Grow the dK/dV accumulators to rows [0, num_rows) (new rows hold zeros)."""
        rows = self.grad_key.shape[1]
        if num_rows <= rows:
            return
        grown = []
        for old in (self.grad_key, self.grad_value):
            new = old.new_zeros((old.shape[0], num_rows) + tuple(old.shape[2:]))
            new[:, :rows] = old
            grown.append(new)
        self.grad_key, self.grad_value = grown

    def kv_grads(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient later tokens sent to K/V rows [start, end) of `layer`: rows past the accumulators
        were sent nothing (the first window's, or a cut layer's that no later part reached)."""
        rows = self.grad_key.shape[1]
        if end <= rows:
            return self.grad_key[layer, start:end], self.grad_value[layer, start:end]
        missing = (end - max(start, rows),) + tuple(self.grad_key.shape[2:])
        zeros = torch.zeros(missing, dtype=self.grad_dtype, device=self.grad_key.device)
        if start >= rows:
            return zeros, zeros
        return (torch.cat((self.grad_key[layer, start:rows], zeros)),
                torch.cat((self.grad_value[layer, start:rows], zeros)))

    def nbytes(self) -> int:
        """Bytes held now."""
        held = [self.layer_inputs, self.grad_final, self.targets]
        if self.grad_key is not None:
            held += [self.grad_key, self.grad_value]
        held += [t for t in (self.pending_grad, self.partial_grad) if t is not None]
        return sum(t.untyped_storage().nbytes() for t in held)
