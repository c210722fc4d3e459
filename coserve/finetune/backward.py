"""Exact token-window backward for LoRA finetuning, recomputing each layer from its saved input.

A training sequence's backward runs over token windows in reverse order.
For one window [start, end) it walks the layers top-down: the layer's forward
is recomputed from its saved input (frozen base weights, trainable LoRA), the
window's queries attend to the cached K/V of earlier tokens, and the layer's
gradients are formed: the input gradient, the LoRA gradients and the gradient
sent to earlier keys and values, which is added to the per-layer dK/dV
accumulators. Each window's own K/V rows receive what later windows sent them.
The result equals a full-sequence backward (tests check it in fp64).

Recomputed: norms, q/o, attention, gate/up and the activation. Not
recomputed: the window's K and V (read back from the KV cache, where its
forward wrote them; their projections are only differentiated), down_proj's
output (the backward only needs its input gradient, formed from the frozen
weight directly) and the vocabulary projection (its gradient was kept at
forward time).

The gradients are written out by hand, with autograd only inside attention:
a window of a few dozen tokens is what co-serving runs beside decodes, and
there autograd's graph building and its extra passes cost as much as the
GEMMs (measured on a bench-small layer, 16 to 128 tokens: 8 to 19% faster).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from coserve.engine.training_sequence import piece_steps
from coserve.finetune.buffers import SequenceBuffers
from coserve.finetune.trainable import LoRAWeights, TrainableLoRA
from coserve.models.attention import LayerKVCache
from coserve.models.frozen_linear import input_grad, linear
from coserve.models.layers import apply_rotary

LoRALookup = Callable[[str], LoRAWeights | None]


def _base(module) -> torch.nn.Linear:
    return getattr(module, "base_layer", module)


def _visible_mask(start: int, end: int, sliding_window: int | None, device) -> torch.Tensor | None:
    """[end - start, end] bool: causal (and windowed) visibility of keys 0..end-1 to queries start..end-1."""
    if start == 0 and sliding_window is None:
        return None
    query_pos = torch.arange(start, end, device=device)[:, None]
    key_pos = torch.arange(end, device=device)[None, :]
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask &= key_pos > query_pos - sliding_window
    return mask


def _rms_norm(norm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm's output (as `RMSNorm.forward`) and the inverse RMS its backward needs."""
    x_wide = x.to(torch.promote_types(x.dtype, torch.float32))
    inv_rms = torch.rsqrt(x_wide.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.weight * (x_wide * inv_rms).to(x.dtype), inv_rms


def _rms_norm_input_grad(norm, x: torch.Tensor, inv_rms: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d(weight * x * inv_rms(x))/dx applied to `grad` (the norm's weight is frozen)."""
    scaled = (grad * norm.weight).to(inv_rms.dtype)
    x_wide = x.to(inv_rms.dtype)
    projection = (x_wide * scaled).mean(-1, keepdim=True)
    return (inv_rms * scaled - x_wide * inv_rms.pow(3) * projection).to(x.dtype)


def _rotary_input_grad(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary`'s input gradient: the transpose of its rotate-half map, applied to `grad`."""
    half = grad.shape[-1] // 2
    by_sin = grad * sin[:, None, :]
    return grad * cos[:, None, :] + torch.cat((by_sin[..., half:], -by_sin[..., :half]), dim=-1)


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


class _LoRAPath:
    """One module's low-rank path over a window: y = (scaling * x A^T) B^T, then its gradients."""

    def __init__(self, weights: LoRAWeights, x: torch.Tensor) -> None:
        lora_a, lora_b, scaling = weights
        self.params = lora_a, lora_b
        self.a, self.b, self.scaling = lora_a.to(x.dtype), lora_b.to(x.dtype), scaling
        self.x = x
        # NOTE: the scaling multiplies the rank-r intermediate, not the [w, out] result (nor its gradient).
        self.low = F.linear(x, self.a).mul_(scaling)                   # [w, r]

    def output(self) -> torch.Tensor:
        return F.linear(self.low, self.b)

    def backward(self, grad: torch.Tensor, need_input_grad: bool) -> torch.Tensor | None:
        """Accumulate dA and dB from the output gradient `grad` [w, out]; the input gradient if asked."""
        grad_low = (grad @ self.b).mul_(self.scaling)                   # [w, r]
        _accumulate(self.params[1], grad.t() @ self.low)
        _accumulate(self.params[0], grad_low.t() @ self.x)
        return grad_low @ self.a if need_input_grad else None


def _lora_path(lora_of: LoRALookup, name: str, x: torch.Tensor) -> _LoRAPath | None:
    weights = lora_of(name)
    return None if weights is None else _LoRAPath(weights, x)


def _frozen(module, x: torch.Tensor, lora: _LoRAPath | None) -> torch.Tensor:
    """A target linear's output: the frozen base, plus its LoRA path if it has one."""
    base = _base(module)
    y = linear(x, base.weight, base.bias)
    return y if lora is None else y.add_(lora.output())


def _input_grad(module, grad: torch.Tensor, lora: _LoRAPath | None) -> torch.Tensor:
    """A target linear's input gradient (its LoRA gradients accumulated on the way)."""
    result = input_grad(grad, _base(module).weight)
    return result if lora is None else result.add_(lora.backward(grad, True))


@torch.no_grad()
def layer_backward(layer, prefix: str, lora_of: LoRALookup, x: torch.Tensor, grad_out: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, key_past: torch.Tensor, value_past: torch.Tensor,
                   key_window: torch.Tensor, value_window: torch.Tensor,
                   grad_key: torch.Tensor, grad_value: torch.Tensor, sliding_window: int | None,
                   need_input_grad: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Backward of one decoder layer for a window of w tokens at positions [start, start + w).

    Args:
        x: [w, hidden] the layer's saved input for the window.
        grad_out: [w, hidden] gradient at the layer's output.
        key_past, value_past: [start, kv_heads, head_dim] cached K (after rope) and V of earlier tokens.
        key_window, value_window: [w, kv_heads, head_dim] the window's own cached K (after rope) and V:
            used as they are, so the K/V projections are differentiated but not recomputed.
        grad_key, grad_value: [w, kv_heads, head_dim] gradient later windows sent to this window's K/V.

    Returns:
        (grad of x or None, grad of key_past, grad of value_past; None for an empty past); LoRA
        gradients accumulate in the adapter's .grad.
    """
    attn, mlp = layer.self_attn, layer.mlp
    num_tokens, start = x.shape[0], key_past.shape[0]
    heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
    dtype = x.dtype

    # Recompute the forward, keeping what the gradients below read.
    normed, inv_rms = _rms_norm(layer.input_layernorm, x)
    lora_q = _lora_path(lora_of, f"{prefix}.self_attn.q_proj", normed)
    lora_k = _lora_path(lora_of, f"{prefix}.self_attn.k_proj", normed)
    lora_v = _lora_path(lora_of, f"{prefix}.self_attn.v_proj", normed)
    q = apply_rotary(_frozen(attn.q_proj, normed, lora_q).view(num_tokens, heads, head_dim), cos, sin)
    keys = torch.cat((key_past, key_window)) if start else key_window           # [end, kv_heads, head_dim]
    values = torch.cat((value_past, value_window)) if start else value_window
    q = q.requires_grad_(True)
    keys = keys.to(dtype).detach().requires_grad_(True)
    values = values.to(dtype).detach().requires_grad_(True)
    mask = _visible_mask(start, start + num_tokens, sliding_window, x.device)
    with torch.enable_grad():
        attended = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
            attn_mask=mask, is_causal=mask is None, scale=attn.scale, enable_gqa=True)
    out = attended.detach()[0].transpose(0, 1).reshape(num_tokens, heads * head_dim)
    lora_o = _lora_path(lora_of, f"{prefix}.self_attn.o_proj", out)
    hidden = _frozen(attn.o_proj, out, lora_o).add_(x)
    normed_mlp, inv_rms_mlp = _rms_norm(layer.post_attention_layernorm, hidden)
    lora_gate = _lora_path(lora_of, f"{prefix}.mlp.gate_proj", normed_mlp)
    lora_up = _lora_path(lora_of, f"{prefix}.mlp.up_proj", normed_mlp)
    gate = _frozen(mlp.gate_proj, normed_mlp, lora_gate)
    up = _frozen(mlp.up_proj, normed_mlp, lora_up)
    silu = F.silu(gate)
    act = silu * up                                                             # [w, intermediate]
    lora_down = _lora_path(lora_of, f"{prefix}.mlp.down_proj", act)

    # Gradients, top-down. down_proj's output is never needed: only its input gradient.
    grad_out = grad_out.to(dtype)
    grad_act = _input_grad(mlp.down_proj, grad_out, lora_down)
    grad_up = grad_act * silu
    grad_gate = torch.ops.aten.silu_backward(grad_act.mul_(up), gate)
    grad_normed_mlp = _input_grad(mlp.gate_proj, grad_gate, lora_gate).add_(
        _input_grad(mlp.up_proj, grad_up, lora_up))
    grad_hidden = _rms_norm_input_grad(layer.post_attention_layernorm, hidden, inv_rms_mlp,
                                       grad_normed_mlp).add_(grad_out)
    grad_attended = _input_grad(attn.o_proj, grad_hidden, lora_o)
    grad_q, grad_keys, grad_values = torch.autograd.grad(
        attended, (q, keys, values), grad_attended.view(num_tokens, heads, head_dim).transpose(0, 1)[None])
    grad_q = _rotary_input_grad(grad_q, cos, sin).reshape(num_tokens, heads * head_dim)
    grad_k = _rotary_input_grad(grad_keys[start:] + grad_key.to(dtype), cos, sin)
    grad_k = grad_k.reshape(num_tokens, kv_heads * head_dim)
    grad_v = (grad_values[start:] + grad_value.to(dtype)).reshape(num_tokens, kv_heads * head_dim)
    grad_x = None
    if need_input_grad:
        grad_normed = _input_grad(attn.q_proj, grad_q, lora_q).add_(_input_grad(attn.k_proj, grad_k, lora_k))
        grad_normed.add_(_input_grad(attn.v_proj, grad_v, lora_v))
        grad_x = _rms_norm_input_grad(layer.input_layernorm, x, inv_rms, grad_normed).add_(grad_hidden)
    else:       # the bottom layer: only the LoRA gradients of q/k/v are wanted
        for lora, grad in ((lora_q, grad_q), (lora_k, grad_k), (lora_v, grad_v)):
            if lora is not None:
                lora.backward(grad, False)
    if not start:
        return grad_x, None, None
    return grad_x, grad_keys[:start], grad_values[:start]


def sequence_backward_window(model, lora: TrainableLoRA, buffers: SequenceBuffers, kv_caches: list[LayerKVCache],
                             slots: torch.Tensor, start: int, end: int, layer_start: int = 0,
                             layer_end: int | None = None, resume_cut: int | None = None,
                             stop_cut: int | None = None) -> None:
    """Backward of tokens [start, end) of one sequence through layers [layer_start, layer_end), top-down.

    A window may run in pieces over several calls, top piece first (layer_end None), each piece
    starting where the previous one stopped; a piece may also cut a layer by tokens, later tokens
    first (`resume_cut`, `stop_cut`: see `BackwardWindow`). Between pieces the gradients wait in
    `buffers.pending_grad` and `buffers.partial_grad`. Pieces of one window must finish before the
    next window starts.

    Args:
        slots: [>= end] long, KV-cache slot of each position of the sequence.
    """
    layers = model.model.layers
    steps = piece_steps(len(layers), start, end, layer_start, layer_end, resume_cut, stop_cut)
    if layer_end is None and resume_cut is None:
        buffers.start_backward(first_window_start=start)
        buffers.pending_grad = buffers.partial_grad = None
    dtype = buffers.layer_inputs.dtype
    cos_all, sin_all = model.rotary(torch.arange(start, end, device=slots.device), dtype)
    for index, first, last in steps:
        cache = kv_caches[index]
        kv_heads, head_dim = cache.key.shape[2], cache.key.shape[3]
        keys, values = cache.key.view(-1, kv_heads, head_dim), cache.value.view(-1, kv_heads, head_dim)
        past_slots, step_slots = slots[:first], slots[first:last]
        rows = slice(first - start, last - start)
        if index == len(layers) - 1:
            grad_out = buffers.grad_final[first:last]
        elif buffers.pending_grad is None or buffers.pending_grad.shape[0] != end - start:
            raise RuntimeError(f"layer {index} of tokens [{start}, {end}) has no gradient from the layer above it")
        else:
            grad_out = buffers.pending_grad[rows]
        if first:
            buffers.cover_kv_grads(first)
        grad_x, grad_key_past, grad_value_past = layer_backward(
            layers[index], f"model.layers.{index}", lora.get, buffers.layer_inputs[index, first:last], grad_out,
            cos_all[rows], sin_all[rows], keys.index_select(0, past_slots), values.index_select(0, past_slots),
            keys.index_select(0, step_slots), values.index_select(0, step_slots),
            *buffers.kv_grads(index, first, last), model.sliding_window, need_input_grad=index > 0)
        if first:
            buffers.grad_key[index, :first] += grad_key_past
            buffers.grad_value[index, :first] += grad_value_past
        if grad_x is not None and (first, last) == (start, end):
            buffers.partial_grad = grad_x        # a whole layer in one step: no copy
        elif grad_x is not None:
            if buffers.partial_grad is None:
                buffers.partial_grad = grad_x.new_zeros(end - start, grad_x.shape[1])
            buffers.partial_grad[rows] = grad_x
        if first == start:   # the layer is done: its input gradient feeds the layer below
            buffers.pending_grad, buffers.partial_grad = buffers.partial_grad, None
