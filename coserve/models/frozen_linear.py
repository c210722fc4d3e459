"""Frozen linear layers on CPU through oneDNN, with each weight packed once.

Given a plain fp32 weight, the GEMM library behind `torch.mm` re-packs it on
every call; for the few to few hundred rows of a serving iteration that
packing is most of the call (measured on bench-small's 1376 x 512 weights with
2 AVX-512 cores: 0.30 against 0.12 ms for 1 row, 0.70 against 0.28 for 32,
1.8 against 0.94 for 128, 9.9 against 8.0 for 1024). Base weights never
change while the engine serves, so `linear` keeps a oneDNN-packed copy of each
one (and `input_grad` one of its transpose, for backward passes) and runs the
product on it. Results equal `F.linear` to float32 rounding (another summation
order), not bit for bit.

Anything else takes `F.linear`: other devices and dtypes, weights that
require grad, a torch without the oneDNN ops, or COSERVE_ONEDNN_LINEAR=0.
A packed copy is rebuilt when its weight's storage or version changes, and
dropped with the weight.
"""
from __future__ import annotations

import functools
import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

_DISABLE_ENV = "COSERVE_ONEDNN_LINEAR"
_PACKING_ROWS_HINT = 64
"""Rows oneDNN tunes the packed layout for; 64 and 512 measured alike from 1 to 1024 rows."""

_packed: dict[tuple[int, bool], tuple[tuple, torch.Tensor]] = {}
"""(id of the weight, transposed) -> (the weight's key when packed, packed copy); an entry goes with its weight."""


@functools.cache
def onednn_available() -> tuple[bool, str]:
    """(True, "") when packed oneDNN linears can run here, else (False, why not)."""
    if os.environ.get(_DISABLE_ENV, "1") == "0":
        return False, f"{_DISABLE_ENV}=0"
    if not torch.backends.mkldnn.is_available():
        return False, "this torch is built without oneDNN"
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False, "this torch lacks mkldnn._reorder_linear_weight / _linear_pointwise"
    try:
        weight, x = torch.randn(24, 40), torch.randn(3, 40)
        packed = ops._reorder_linear_weight(weight, _PACKING_ROWS_HINT)
        ok = torch.allclose(ops._linear_pointwise(x, packed, None, "none", [], ""), x @ weight.T, atol=1e-4)
    except RuntimeError as error:
        return False, f"oneDNN linear failed: {error}"
    return (True, "") if ok else (False, "oneDNN linear disagreed with torch.mm")


def packs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(x, weight)` and `input_grad(x, weight)` run on a packed copy of `weight`."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and x.dtype == torch.float32
            and x.device.type == "cpu" and weight.dim() == 2 and x.dim() >= 1
            and not (weight.requires_grad and torch.is_grad_enabled()) and onednn_available()[0])


def _key(weight: torch.Tensor) -> tuple:
    # NOTE: a weight made under inference_mode has no version counter (and cannot change in place
    # outside it); its storage and shape still tell a replaced weight apart.
    version = None if weight.is_inference() else weight._version
    return (weight.data_ptr(), version, tuple(weight.shape), tuple(weight.stride()))


def _packed_weight(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    slot = (id(weight), transposed)
    entry = _packed.get(slot)
    key = _key(weight)
    if entry is None or entry[0] != key:
        if entry is None:
            # NOTE: keyed by id (tensors cannot be dict keys by value), so the entry must leave
            # with its weight before the id can be reused.
            weakref.finalize(weight, _packed.pop, slot, None)
        with torch.no_grad():
            source = weight.detach().T.contiguous() if transposed else weight.detach().contiguous()
            entry = (key, torch.ops.mkldnn._reorder_linear_weight(source, _PACKING_ROWS_HINT))
        _packed[slot] = entry
    return entry[1]


def _run(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], out_features)


class _PackedLinearFunction(torch.autograd.Function):
    """y = x @ W^T + b on packed weights, differentiable in x only (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight
        return _run(x, _packed_weight(weight, False), bias, weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return input_grad(grad, ctx.weight), None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a frozen weight; differentiable in x."""
    if not packs(x, weight) or (bias is not None and bias.requires_grad and torch.is_grad_enabled()):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and x.requires_grad:
        return _PackedLinearFunction.apply(x, weight, bias)
    return _run(x, _packed_weight(weight, False), bias, weight.shape[0])


def input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad [..., out] @ weight [out, in]: the input gradient of a frozen linear."""
    if not packs(grad, weight) or (torch.is_grad_enabled() and grad.requires_grad):
        return grad @ weight
    return _run(grad, _packed_weight(weight, True), None, weight.shape[1])


class FrozenLinear(nn.Linear):
    """nn.Linear whose forward takes `linear` (packed oneDNN weights on CPU fp32 while frozen)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
