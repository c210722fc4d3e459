"""Exact token-window backward for LoRA finetuning, recomputing each layer from its saved input.

A training sequence's backward runs over token windows in reverse order.
For one window [start, end) it walks the layers top-down: the layer's forward
is recomputed from its saved input (frozen base weights, trainable LoRA), the
window's queries attend to the cached K/V of earlier tokens, and autograd
returns the input gradient, the LoRA gradients and the gradient sent to
earlier keys and values, which is added to the per-layer dK/dV accumulators.
Each window's own K/V rows receive what later windows sent them. The result
equals a full-sequence backward (tests check it in fp64).

Recomputed: norms, q/o, attention, gate/up and the activation. Not
recomputed: the window's K and V (read back from the KV cache, where its
forward wrote them; their projections are only differentiated), down_proj's
output (the backward only needs its input gradient, formed from the frozen
weight directly) and the vocabulary projection (its gradient was kept at
forward time).
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


def _linear(module, x: torch.Tensor, lora: LoRAWeights | None) -> torch.Tensor:
    # NOTE: the LoRA scaling multiplies the rank-r intermediate, not the [w, out] result (and its gradient).
    base = _base(module)
    y = linear(x, base.weight, base.bias)
    if lora is not None:
        lora_a, lora_b, scaling = lora
        y = y + F.linear(scaling * F.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype))
    return y


class _GradOnlyLinear(torch.autograd.Function):
    """A frozen linear whose output value is known elsewhere: forward returns zeros, backward is exact.

    The K/V projections of a window were computed in its forward and sit in the KV cache; the
    backward only needs their input gradient (grad @ W), so their GEMMs are not run again.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return x.new_zeros(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return input_grad(grad, weight), None


def _cached_linear(module, x: torch.Tensor, lora: LoRAWeights | None) -> torch.Tensor:
    """`_linear`'s gradient graph without its value: the frozen part's output reads as zeros."""
    y = _GradOnlyLinear.apply(x, _base(module).weight)
    if lora is not None:
        lora_a, lora_b, scaling = lora
        y = y + F.linear(scaling * F.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype))
    return y


def _with_value(value: torch.Tensor, graph: torch.Tensor) -> torch.Tensor:
    """`value`, with `graph`'s gradient path (graph - graph.detach() is exactly zero)."""
    return value + (graph - graph.detach()) if graph.requires_grad else value


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
        (grad of x or None, grad of key_past, grad of value_past); LoRA gradients accumulate in .grad.
    """
    attn, mlp = layer.self_attn, layer.mlp
    num_tokens, start = x.shape[0], key_past.shape[0]
    dtype = x.dtype
    x = x.detach().requires_grad_(need_input_grad)
    key_past = key_past.detach().requires_grad_(start > 0)
    value_past = value_past.detach().requires_grad_(start > 0)
    with torch.enable_grad():
        normed = layer.input_layernorm(x)
        q = _linear(attn.q_proj, normed, lora_of(f"{prefix}.self_attn.q_proj"))
        k = _cached_linear(attn.k_proj, normed, lora_of(f"{prefix}.self_attn.k_proj"))
        v = _cached_linear(attn.v_proj, normed, lora_of(f"{prefix}.self_attn.v_proj"))
        q = apply_rotary(q.view(num_tokens, attn.num_heads, attn.head_dim), cos, sin)
        k = apply_rotary(k.view(num_tokens, attn.num_kv_heads, attn.head_dim), cos, sin)
        k = _with_value(key_window.detach().to(dtype), k)
        v = _with_value(value_window.detach().to(dtype), v.view(num_tokens, attn.num_kv_heads, attn.head_dim))
        keys = torch.cat((key_past, k)) if start else k          # [end, kv_heads, head_dim]
        values = torch.cat((value_past, v)) if start else v
        mask = _visible_mask(start, start + num_tokens, sliding_window, x.device)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
            attn_mask=mask, is_causal=mask is None, scale=attn.scale, enable_gqa=True)
        out = out[0].transpose(0, 1).reshape(num_tokens, attn.num_heads * attn.head_dim)
        hidden = x + _linear(attn.o_proj, out, lora_of(f"{prefix}.self_attn.o_proj"))
        normed_mlp = layer.post_attention_layernorm(hidden)
        gate = _linear(mlp.gate_proj, normed_mlp, lora_of(f"{prefix}.mlp.gate_proj"))
        up = _linear(mlp.up_proj, normed_mlp, lora_of(f"{prefix}.mlp.up_proj"))
        act = F.silu(gate) * up                                   # [w, intermediate]
        grad_out = grad_out.to(dtype)
        # down_proj: the frozen part's input gradient is one GEMM; its output is never needed.
        roots, grads = [act, hidden, k, v], [input_grad(grad_out, _base(mlp.down_proj).weight), grad_out,
                                             grad_key.to(dtype), grad_value.to(dtype)]
        down_lora = lora_of(f"{prefix}.mlp.down_proj")
        if down_lora is not None:
            lora_a, lora_b, scaling = down_lora
            roots.append(F.linear(scaling * F.linear(act, lora_a.to(dtype)), lora_b.to(dtype)))
            grads.append(grad_out)
        # Modules without LoRA leave some roots outside the graph (e.g. k in a q/v-only adapter).
        pairs = [(r, g) for r, g in zip(roots, grads) if r.requires_grad]
        if pairs:
            torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])
    def grad_of(t: torch.Tensor, needed: bool) -> torch.Tensor | None:
        if not needed:
            return None
        return t.grad if t.grad is not None else torch.zeros_like(t)

    return grad_of(x, need_input_grad), grad_of(key_past, start > 0), grad_of(value_past, start > 0)


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
