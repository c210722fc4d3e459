"""The machine side of a benchmark: device choice, the fp32 GEMM peak, and model FLOP counts.

The GEMM peak is measured in the same run as the figures it bounds (the
machines are shared, so a number from another day means little). Model FLOPs
are counted analytically from the Hugging Face config: see `model_flops`.
"""
from __future__ import annotations

import platform
import time

import torch


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def gemm_gflops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` fp32 [size x size] @ [size x size] matmul throughput, in GFLOP/s."""
    if device.type == "cuda":
        size, repeats = max(size, 4096), max(repeats, 10)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device)
    b = torch.randn(size, size, generator=gen).to(device)
    out = torch.empty(size, size, device=device)
    torch.mm(a, b, out=out)  # warm-up
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _linear_params_per_layer(cfg) -> tuple[int, list[tuple[int, int]]]:
    """Weights of one decoder layer's linears, and their (in, out) shapes (for LoRA FLOPs)."""
    hidden = cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    q_out = cfg.num_attention_heads * head_dim
    kv_out = cfg.num_key_value_heads * head_dim
    inter = cfg.intermediate_size
    shapes = [(hidden, q_out), (hidden, kv_out), (hidden, kv_out), (q_out, hidden),
              (hidden, inter), (hidden, inter), (inter, hidden)]
    return sum(i * o for i, o in shapes), shapes


def model_flops(cfg, prompt_lens: list[int], output_lens: list[int], ranks: list[int | None]) -> float:
    """Useful forward FLOPs of serving these requests (no padding, no recomputation).

    Per request the model runs prompt + output - 1 tokens (the last sampled
    token is never fed back) and computes output-many logit rows. Counted:
    2 x decoder linear weights per token; 2 x hidden x vocab per logit row;
    causal attention 4 x heads x head_dim x (position + 1) per token and layer
    (QK^T and PV); LoRA 2 x r x (in + out) per adapted linear and token on all
    linear layers. Norms, rotary, activations and softmax are left out (< 1%).
    """
    layers = cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    linear_params, shapes = _linear_params_per_layer(cfg)
    lora_per_rank = sum(i + o for i, o in shapes) * layers * 2
    total = 0.0
    for prompt_len, out_len, rank in zip(prompt_lens, output_lens, ranks):
        num_tokens = prompt_len + out_len - 1
        total += 2 * linear_params * layers * num_tokens
        total += 2 * cfg.hidden_size * cfg.vocab_size * out_len
        total += 4 * cfg.num_attention_heads * head_dim * layers * num_tokens * (num_tokens + 1) / 2
        if rank:
            total += lora_per_rank * rank * num_tokens
    return total
