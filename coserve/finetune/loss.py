"""Next-token cross-entropy and its gradient at the final hidden state, in row chunks.

Runs during a training chunk's forward: the loss is summed and the gradient
w.r.t. the pre-norm final hidden state is kept, so the backward never needs
the vocabulary projection again. Rows are processed a few at a time so no
[tokens, vocab] matrix ever exists for more than a chunk of rows. The rows of
every training chunk of an iteration go through one projection, together with
the inference rows to sample (`extra_normed`): on a small batch the projection
costs the time to read the vocabulary weight, so one pass instead of several
is most of its cost saved.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
_MAX_LOGIT_ELEMENTS = 1 << 23
"""~32 MB of fp32 logits per chunk: just under glibc's largest mmap threshold, so a chunk's logits come
from the heap instead of fresh pages each time, and few passes over the vocabulary weight."""


@dataclass
class LossResult:
    row_losses: torch.Tensor
    """[n] cross-entropy per row, fp32 or wider (0 where the target is IGNORE_INDEX)."""
    grad: torch.Tensor
    """[n, hidden] fp32 d(sum of scale * loss)/d(final_hidden)."""
    extra_logits: torch.Tensor | None
    """[m, vocab] logits of `extra_normed`, or None."""


def loss_and_grad(model, final_hidden: torch.Tensor, targets: torch.Tensor, scales: torch.Tensor,
                  extra_normed: torch.Tensor | None = None) -> LossResult:
    """Token cross-entropies, and the gradient of their weighted sum at the final hidden state.

    Args:
        final_hidden: [n, hidden] last decoder layer's output, before the final norm.
        targets: [n] long, next-token id per row or IGNORE_INDEX.
        scales: [n] fp64, the loss weight of each row (1 / target tokens in its optimizer step).
        extra_normed: [m, hidden] rows after the final norm whose logits are wanted too (no loss).
    """
    num_rows = final_hidden.shape[0]
    grad = torch.zeros(final_hidden.shape, dtype=torch.float32, device=final_hidden.device)
    row_losses = torch.zeros(num_rows, dtype=torch.promote_types(final_hidden.dtype, torch.float32),
                             device=final_hidden.device)
    extra_logits = None
    rows_per_chunk = max(1, _MAX_LOGIT_ELEMENTS // model.config.vocab_size)
    for start in range(0, max(num_rows, 1), rows_per_chunk):
        end = min(start + rows_per_chunk, num_rows)
        chunk_targets = targets[start:end]
        extra = extra_normed if start == 0 else None      # the sampled rows ride along once
        valid = chunk_targets != IGNORE_INDEX
        has_targets = bool(valid.any())
        if not has_targets and extra is None:
            continue
        hidden = final_hidden[start:end].detach().requires_grad_(True)
        with torch.enable_grad():
            normed = model.model.norm(hidden)
        rows = normed.detach() if extra is None else torch.cat((normed.detach(), extra.to(normed.dtype)))
        # NOTE: the logits land in the model's reused buffer. The sampled rows' logits stay valid
        # after this loop: they follow the first chunk's rows, and later chunks are never longer.
        logits = model.compute_logits(rows, reuse_buffer=True)                    # [rows (+ m), vocab]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if extra is not None:
            extra_logits = logits[end - start:]
        if not has_targets:
            continue                                     # only the sampled rows' logits were wanted
        train_logits = logits[:end - start]
        safe_targets = torch.where(valid, chunk_targets, 0)
        target_logits = train_logits.gather(1, safe_targets[:, None]).squeeze(1)
        # Softmax and log-normalizer in place in the logits' own memory: torch.logsumexp and
        # autograd's cross-entropy would each allocate and sweep another [rows, vocab] matrix,
        # which does not fit in cache (measured: 41 against 15 ms for 524 rows of bench-small).
        row_max = train_logits.amax(dim=1)
        probs = train_logits.sub_(row_max[:, None]).exp_()
        sum_exp = probs.sum(dim=1)
        log_normalizer = row_max + sum_exp.log()                                 # [rows]
        row_losses[start:end] = torch.where(valid, log_normalizer - target_logits, 0.0)
        # d(loss)/d(logits) = softmax - onehot(target).
        probs.div_(sum_exp[:, None])
        target_rows = valid.nonzero().squeeze(1)
        probs[target_rows, safe_targets[target_rows]] -= 1.0
        weights = torch.where(valid, scales[start:end].to(probs.dtype), 0.0)
        grad_normed = model.logits_input_grad(probs).mul_(weights[:, None].to(normed.dtype))
        (chunk_grad,) = torch.autograd.grad(normed, hidden, grad_normed)
        grad[start:end] = chunk_grad
    return LossResult(row_losses, grad, extra_logits)

