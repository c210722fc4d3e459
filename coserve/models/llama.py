"""Compact Llama-family decoder (Llama, Mistral, Qwen2) over a flat token batch.

Parameter names equal Hugging Face's, so checkpoints load by name and PEFT
adapters address the same module paths (`model.layers.0.self_attn.q_proj`).
The forward takes a flat [num_tokens] batch of many sequences with their
positions and the iteration's `AttentionMetadata`; logits are computed only for
the rows that need a sample (`compute_logits`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from coserve.models.attention import AttentionMetadata, LayerKVCache, paged_attention
from coserve.models.frozen_linear import FrozenLinear, input_grad, packs
from coserve.models.layers import RMSNorm, RotaryEmbedding, apply_rotary
from peft_methods.lora.cpu_kernel import few_rows_linear, kernel_applies

SUPPORTED_ARCHITECTURES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config) -> int | None:
    if config.model_type == "mistral":
        return getattr(config, "sliding_window", None)
    if config.model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        raise ValueError("Qwen2 with use_sliding_window=True (per-layer windows) is not supported")
    return None


class Attention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        # Qwen2 always has q/k/v bias; Llama/Mistral only when attention_bias is set.
        qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        o_bias = config.model_type != "qwen2" and bool(getattr(config, "attention_bias", False))
        hidden = config.hidden_size
        self.q_proj = FrozenLinear(hidden, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = FrozenLinear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = FrozenLinear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = FrozenLinear(self.num_heads * self.head_dim, hidden, bias=o_bias)
        self.scale = self.head_dim ** -0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerKVCache, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = paged_attention(q, k, v, cache, meta, self.scale)              # [num_tokens, heads, head_dim]
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}; supported: silu")
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = FrozenLinear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = FrozenLinear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = FrozenLinear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class ActivationCapture:
    """Rows of a forward whose activations finetuning keeps: filled by `CausalLM.forward`."""

    rows: torch.Tensor                                              # [n] long, rows of the flat batch
    layer_inputs: list[torch.Tensor] = field(default_factory=list)  # per layer: [n, hidden]
    final_hidden: torch.Tensor | None = None                        # [n, hidden], before the final norm


_TALL_LOGITS_MAX_ROWS = 32
_KERNEL_LOGITS_MAX_ROWS = 128   # CPU kernel for the vocabulary projection: faster than the GEMM up to here
_KERNEL_GRAD_MAX_ROWS = 64      # ... and for its input gradient (from the transposed copy of the head)
"""Up to this many rows the CPU computes logits as W @ h^T (see CausalLM.compute_logits)."""


class CausalLM(nn.Module):
    """Llama / Mistral / Qwen2 for causal LM; one class, the differences are config flags."""

    # Sibling linears that read the same input (LoRA layers on them can share one shrink GEMM).
    SHARED_INPUT_LINEARS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

    def __init__(self, config) -> None:
        super().__init__()
        if config.model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture model_type {config.model_type!r}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES.values())}")
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = FrozenLinear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config, head_dim_of(config))
        self.sliding_window = sliding_window_of(config)
        self._head_transposed: torch.Tensor | None = None   # [hidden, vocab], see logits_input_grad
        self._logits_buffer: torch.Tensor | None = None     # flat, see compute_logits(reuse_buffer=True)
        self.cpu_kernel = None   # peft_methods.lora.cpu_kernel's module, set by the engine on CPU

    def use_cpu_kernel(self, kernel) -> None:
        """Let the vocabulary projection use the CPU kernel (or not, with None) for few rows."""
        self.cpu_kernel = kernel

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[LayerKVCache],
                meta: AttentionMetadata, capture: ActivationCapture | None = None) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> final hidden states [num_tokens, hidden].

        With `capture`, the input of every layer and the final pre-norm hidden state of the
        capture's rows are recorded (finetuning keeps them for its backward).
        """
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for layer, cache in zip(self.model.layers, kv_caches):
            if capture is not None:
                capture.layer_inputs.append(x.index_select(0, capture.rows))
            x = layer(x, cos, sin, cache, meta)
        if capture is not None:
            capture.final_hidden = x.index_select(0, capture.rows)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor, reuse_buffer: bool = False) -> torch.Tensor:
        """hidden: [n, hidden] after the final norm -> logits [n, vocab].

        With `reuse_buffer`, large CPU results are written into one buffer kept by the model: the
        result is only valid until the next such call (the loss uses it chunk by chunk).
        """
        weight = self.lm_head.weight
        rows = hidden.shape[0] if hidden.dim() == 2 else 0
        if packs(hidden, weight):
            # NOTE: the packed head beats every path below at any row count (bench-small: 2.8 ms
            # for 1 row, 5.6 for 32, 40 for 256); large results come from the heap (see loss.py).
            return self.lm_head(hidden)
        if (0 < rows <= _KERNEL_LOGITS_MAX_ROWS and self.lm_head.bias is None and weight.is_contiguous()
                and self._kernel_takes(hidden)):
            # NOTE: bench-small's 32000 x 512 head: 4.7 against 10.5 ms for 8 rows, 9.3 against 15.3
            # for 32, 27 against 34 for 128 (the GEMM library packs the whole weight first).
            return few_rows_linear(self.cpu_kernel, hidden, weight)
        if hidden.device.type == "cpu" and 1 < rows <= _TALL_LOGITS_MAX_ROWS and self.lm_head.bias is None:
            # NOTE: without the kernel, W @ h^T streams the [vocab, hidden] weight once where h @ W^T
            # first packs all of it (2.0 against 12.9 ms for 2 rows, 4.6 against 11.0 ms for 8, 14.1
            # against 17.4 ms for 32, the copy below included; from 64 rows on the copy costs more
            # than it saves). The copy keeps the logits row-major for the softmax and the loss.
            return (weight @ hidden.T).T.contiguous()
        if reuse_buffer and hidden.device.type == "cpu" and self.lm_head.bias is None and rows > 0:
            # NOTE: a fresh [rows, vocab] result over glibc's mmap threshold (32 MB) comes back as new
            # pages on every call: 16 ms of page faults for 524 x 32000 fp32, 1/6 of its GEMM.
            needed = rows * weight.shape[0]
            if self._logits_buffer is None or self._logits_buffer.numel() < needed \
                    or self._logits_buffer.dtype != hidden.dtype:
                self._logits_buffer = torch.empty(needed, dtype=hidden.dtype)
            out = self._logits_buffer[:needed].view(rows, weight.shape[0])
            return torch.mm(hidden, weight.T, out=out)
        return self.lm_head(hidden)

    def _kernel_takes(self, rows: torch.Tensor) -> bool:
        return self.cpu_kernel is not None and rows.dim() == 2 and kernel_applies(rows, rows)

    def logits_input_grad(self, grad_logits: torch.Tensor) -> torch.Tensor:
        """Gradient at compute_logits' input: grad_logits [n, vocab] @ W [vocab, hidden] -> [n, hidden]."""
        weight = self.lm_head.weight
        grad_logits = grad_logits.to(weight.dtype)
        if packs(grad_logits, weight):
            return input_grad(grad_logits, weight)   # the packed transposed head, built on first use
        if weight.device.type != "cpu":
            return grad_logits @ weight
        # NOTE: on CPU, W^T @ g^T from a kept row-major copy of W^T is never slower than g @ W and
        # much faster for the few rows of a co-serving iteration (bench-small's head: 3.4 against
        # 11.1 ms for 2 rows, 9.2 against 12.9 for 32, 90 against 92 for 512). The copy costs one
        # more head's memory; it is made when finetuning first needs it (base weights never change).
        head_t = self._head_transposed
        if head_t is None or head_t.shape != weight.T.shape or head_t.dtype != weight.dtype:
            head_t = self._head_transposed = weight.detach().T.contiguous()
        if grad_logits.shape[0] <= _KERNEL_GRAD_MAX_ROWS and self._kernel_takes(grad_logits):
            # NOTE: 3.6 against 7.5 ms for 6 rows, 8.2 against 9.9 for 32; even at 64.
            return few_rows_linear(self.cpu_kernel, grad_logits, head_t)
        return (head_t @ grad_logits.T).T
