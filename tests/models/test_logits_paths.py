"""The vocabulary projection and its input gradient give the same result on every CPU path.

Paths: the packed oneDNN head (and its packed transpose), and without it the GEMM
(`lm_head`), W @ h^T for a few rows, and the CPU kernel for up to
_KERNEL_LOGITS_MAX_ROWS rows (its gradient from the transposed copy of the head).
"""
import pytest
import torch

from coserve.models import llama
from coserve.models.checkpoint import resolve_checkpoint
from coserve.models.loader import load_model
from peft_methods.lora.cpu_kernel import load_cpu_kernel

ROW_COUNTS = [1, 2, 7, 33, llama._KERNEL_GRAD_MAX_ROWS + 1, llama._KERNEL_LOGITS_MAX_ROWS + 1]


@pytest.fixture(scope="module")
def model(tiny_llama3_tied_dir):
    return load_model(resolve_checkpoint(str(tiny_llama3_tied_dir)), torch.float32, torch.device("cpu"))


def _with_kernel(model, use: bool):
    if not use:
        model.use_cpu_kernel(None)
        return
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("the CPU kernel needs an AVX-512 CPU")
    kernel, why_not = load_cpu_kernel()
    assert kernel is not None, why_not
    model.use_cpu_kernel(kernel)


@pytest.mark.parametrize("use_kernel", [False, True])
@pytest.mark.parametrize("rows", ROW_COUNTS)
def test_logits_and_their_input_gradient_match_the_plain_ops(model, linear_packing, use_kernel, rows):
    _with_kernel(model, use_kernel)
    try:
        gen = torch.Generator().manual_seed(rows)
        hidden = torch.randn(rows, model.config.hidden_size, generator=gen)
        grad_logits = torch.randn(rows, model.config.vocab_size, generator=gen)
        weight = model.lm_head.weight
        with torch.no_grad():
            logits = model.compute_logits(hidden)
            grad_hidden = model.logits_input_grad(grad_logits)
        torch.testing.assert_close(logits, hidden @ weight.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_hidden, grad_logits @ weight, rtol=1e-5, atol=1e-4)
        assert logits.is_contiguous()
    finally:
        model.use_cpu_kernel(None)
