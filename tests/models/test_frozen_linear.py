"""Packed oneDNN linears equal F.linear, differentiate in their input, and fall back where they must."""
import gc

import pytest
import torch
import torch.nn.functional as F

from coserve.models import frozen_linear
from coserve.models.frozen_linear import FrozenLinear, input_grad, linear


@pytest.fixture(autouse=True)
def needs_onednn():
    available, why_not = frozen_linear.onednn_available()
    assert available, why_not


def _weights(out_features=48, in_features=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=gen), torch.randn(out_features, generator=gen)


@pytest.mark.parametrize("shape", [(0, 40), (1, 40), (7, 40), (300, 40), (2, 5, 40)])
def test_linear_and_input_grad_equal_the_plain_ops(shape):
    weight, bias = _weights()
    x = torch.randn(*shape)
    torch.testing.assert_close(linear(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    grad = torch.randn(*shape[:-1], weight.shape[0])
    torch.testing.assert_close(input_grad(grad, weight), grad @ weight, rtol=1e-5, atol=1e-5)


def test_linear_differentiates_in_its_input():
    weight, bias = _weights()
    x = torch.randn(9, 40, requires_grad=True)
    grad = torch.randn(9, 48)
    linear(x, weight, bias).backward(grad)
    torch.testing.assert_close(x.grad, grad @ weight, rtol=1e-5, atol=1e-5)


def test_a_strided_input_gives_the_same_result():
    weight, _ = _weights()
    wide = torch.randn(6, 80)
    torch.testing.assert_close(linear(wide[:, ::2], weight), F.linear(wide[:, ::2], weight), rtol=1e-5, atol=1e-5)


def test_a_weight_changed_in_place_is_packed_again():
    weight, _ = _weights()
    x = torch.randn(3, 40)
    before = linear(x, weight)
    with torch.no_grad():
        weight.mul_(2)
    torch.testing.assert_close(linear(x, weight), 2 * before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(input_grad(torch.ones(3, 48), weight), torch.ones(3, 48) @ weight)


def test_a_weight_made_under_inference_mode_packs():
    with torch.inference_mode():
        weight, _ = _weights()
    x = torch.randn(3, 40)
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_packed_copies_leave_with_their_weight():
    weight, _ = _weights()
    linear(torch.randn(2, 40), weight)
    input_grad(torch.randn(2, 48), weight)
    slots = {(id(weight), False), (id(weight), True)}
    assert slots <= set(frozen_linear._packed)
    del weight
    gc.collect()
    assert not slots & set(frozen_linear._packed)


def test_other_dtypes_and_trainable_weights_take_the_plain_op():
    weight, bias = _weights()
    x64 = torch.randn(4, 40, dtype=torch.float64)
    w64 = weight.double()
    assert torch.equal(linear(x64, w64), F.linear(x64, w64))       # bit for bit: the same op
    trainable = weight.clone().requires_grad_(True)
    linear(torch.randn(4, 40), trainable, bias).sum().backward()
    assert trainable.grad is not None and trainable.grad.shape == weight.shape


def test_frozen_linear_module_is_an_nn_linear_with_the_same_output():
    layer = FrozenLinear(40, 48)
    layer.requires_grad_(False)
    x = torch.randn(5, 40)
    assert isinstance(layer, torch.nn.Linear)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("COSERVE_ONEDNN_LINEAR", "0")
    frozen_linear.onednn_available.cache_clear()
    try:
        available, why_not = frozen_linear.onednn_available()
        assert not available and "COSERVE_ONEDNN_LINEAR=0" in why_not
        weight, _ = _weights()
        x = torch.randn(3, 40)
        assert torch.equal(linear(x, weight), F.linear(x, weight))
        assert (id(weight), False) not in frozen_linear._packed
    finally:
        monkeypatch.delenv("COSERVE_ONEDNN_LINEAR")
        frozen_linear.onednn_available.cache_clear()
