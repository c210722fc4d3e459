"""Next-token cross-entropy and its gradient at the final hidden state, in row chunks.

Runs during a training chunk's forward: the loss is summed and the gradient
w.r.t. the pre-norm final hidden state is kept, so the backward never needs
the vocabulary projection again. Rows are processed a few at a time so no
[tokens, vocab] matrix ever exists for more than a chunk of rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
_MAX_LOGIT_ELEMENTS = 1 << 24  # ~64 MB of fp32 logits per chunk: fewer passes over the vocabulary weight


def loss_and_grad(model, final_hidden: torch.Tensor, targets: torch.Tensor,
                  scale: float) -> tuple[float, int, torch.Tensor]:
    """Sum of token cross-entropies and d(scale * sum)/d(final_hidden).

    Args:
        final_hidden: [n, hidden] last decoder layer's output, before the final norm.
        targets: [n] long, next-token id per row or IGNORE_INDEX.
        scale: the loss weight of one token (1 / target tokens in the optimizer step).

    Returns:
        (loss sum, number of targets, gradient [n, hidden] fp32).
    """
    grad = torch.zeros(final_hidden.shape, dtype=torch.float32, device=final_hidden.device)
    loss_sum, num_targets = 0.0, 0
    rows_per_chunk = max(1, _MAX_LOGIT_ELEMENTS // model.config.vocab_size)
    for start in range(0, final_hidden.shape[0], rows_per_chunk):
        chunk_targets = targets[start:start + rows_per_chunk]
        count = int((chunk_targets != IGNORE_INDEX).sum())
        if count == 0:
            continue
        with torch.enable_grad():
            hidden = final_hidden[start:start + rows_per_chunk].detach().requires_grad_(True)
            logits = model.compute_logits(model.model.norm(hidden))            # [rows, vocab]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(logits, chunk_targets, ignore_index=IGNORE_INDEX, reduction="sum")
            (chunk_grad,) = torch.autograd.grad(loss * scale, hidden)
        grad[start:start + rows_per_chunk] = chunk_grad
        loss_sum += float(loss.detach())
        num_targets += count
    return loss_sum, num_targets, grad
