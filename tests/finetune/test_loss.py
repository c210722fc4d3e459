"""loss_and_grad equals autograd's cross-entropy over the vocabulary projection, chunk by chunk.

Chunks are forced small so several reuse the model's logits buffer (where the
packed head does not run), and the sampled rows that ride along in the first
chunk must keep their logits.
"""
import pytest
import torch
import torch.nn.functional as F

from coserve.finetune import loss as loss_module
from coserve.finetune.loss import IGNORE_INDEX, loss_and_grad
from coserve.models import llama
from coserve.models.checkpoint import resolve_checkpoint
from coserve.models.loader import load_model


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return load_model(resolve_checkpoint(str(tiny_llama_dir)), torch.float64, torch.device("cpu"))


def _reference(model, final_hidden, targets, scales, extra_normed):
    hidden = final_hidden.detach().clone().requires_grad_(True)
    logits = model.lm_head(model.model.norm(hidden))
    losses = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    (grad,) = torch.autograd.grad((losses * scales).sum(), hidden)
    return losses.detach(), grad, model.lm_head(extra_normed).detach()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_and_grad_equal_autograd_cross_entropy(model, monkeypatch, linear_packing, dtype):
    model = model.to(dtype)
    vocab, hidden_size = model.config.vocab_size, model.config.hidden_size
    monkeypatch.setattr(loss_module, "_MAX_LOGIT_ELEMENTS", 3 * vocab)   # chunks of 3 rows
    monkeypatch.setattr(llama, "_TALL_LOGITS_MAX_ROWS", 0)                # the GEMM into the reused buffer
    model._logits_buffer = None
    gen = torch.Generator().manual_seed(0)
    final_hidden = torch.randn(8, hidden_size, generator=gen, dtype=dtype)
    targets = torch.randint(0, vocab, (8,), generator=gen)
    targets[[1, 5]] = IGNORE_INDEX
    scales = torch.full((8,), 1 / 6, dtype=torch.float64)
    extra = torch.randn(2, hidden_size, generator=gen, dtype=dtype)
    expected_losses, expected_grad, expected_extra = _reference(model, final_hidden, targets, scales.to(dtype), extra)
    with torch.no_grad():
        result = loss_and_grad(model, final_hidden, targets, scales, extra_normed=extra)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.row_losses.to(dtype), expected_losses, **tol)
    # the kept gradient is fp32 by design (LossResult.grad), whatever the model's dtype
    torch.testing.assert_close(result.grad, expected_grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.extra_logits.to(dtype), expected_extra, **tol)
    assert result.row_losses[1] == 0 and result.row_losses[5] == 0
    if dtype == torch.float32 and linear_packing == "packed":
        assert model._logits_buffer is None           # the packed head writes fresh results
    else:
        assert model._logits_buffer is not None and model._logits_buffer.dtype == dtype
    model.to(torch.float64)
