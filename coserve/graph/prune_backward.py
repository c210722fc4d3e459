"""Graph pass 2: decide what finetuning keeps between a token's forward and its backward.

Base weights are frozen, so nothing is kept for their weight gradients, and
each decoder layer's forward is recomputed in the backward from its saved
input (`coserve/finetune/backward.py`). Kept per token: every layer's input,
its K/V (already in the paged cache), the fp32 dK/dV accumulators the
backward fills, the fp32 loss gradient at the final hidden state (the
vocabulary projection never runs again) and the target id. The report's
`bytes_per_token` is that sum, the worst case (accumulators exist only for
tokens before a sequence's first backward window); tests check it against the
real tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from coserve.finetune.buffers import grad_dtype
from coserve.models.attention import kv_cache_bytes_per_block
from coserve.models.llama import CausalLM, head_dim_of

RECOMPUTED = ("norms, q/o projections with LoRA, rotary, attention, gate/up projections and the activation "
              "are recomputed from each layer's saved input; the window's K/V are read back from the KV cache "
              "(their projections are only differentiated), and the down projection's output and the "
              "vocabulary projection are not needed (their gradients need neither)")


@dataclass
class PruneReport:
    bytes_per_token: int
    """Everything kept for backward per training token, K/V included."""
    breakdown: dict[str, int] = field(default_factory=dict)
    """bytes per token by what is kept."""
    kv_bytes_per_block: int = 0
    recomputed: str = RECOMPUTED


def prune_backward(model: CausalLM, dtype: torch.dtype, block_size: int) -> PruneReport:
    """Attach the backward plan to `model` (as `model.backward_plan`) and report its byte budget."""
    cfg = model.config
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    kv_width = cfg.num_key_value_heads * head_dim_of(cfg)
    size = torch.empty((), dtype=dtype).element_size()
    grad_size = torch.empty((), dtype=grad_dtype(dtype)).element_size()
    breakdown = {
        "layer_inputs": layers * hidden * size,
        "kv_cache": 2 * layers * kv_width * size,
        "kv_grad_accumulators": 2 * layers * kv_width * grad_size,
        "final_hidden_grad": hidden * grad_size,
        "target_id": torch.empty((), dtype=torch.long).element_size(),
    }
    kv_per_block = kv_cache_bytes_per_block(layers, block_size, cfg.num_key_value_heads, head_dim_of(cfg), dtype)
    report = PruneReport(sum(breakdown.values()), breakdown, kv_per_block)
    model.backward_plan = report
    return report
