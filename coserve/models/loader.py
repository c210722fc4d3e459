"""Build a `CausalLM` from a checkpoint without extra copies of the weights.

The module tree is built on the meta device and the checkpoint's tensors are
assigned in place (`load_state_dict(assign=True)`), the way gpt-fast loads, so
peak memory is one copy of the weights.
"""
from __future__ import annotations

import torch

from coserve.models.checkpoint import ResolvedCheckpoint, iter_checkpoint_tensors, load_hf_config
from coserve.models.llama import CausalLM

# Buffers some checkpoints carry that are recomputed here.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_model(checkpoint: ResolvedCheckpoint, dtype: torch.dtype, device: torch.device) -> CausalLM:
    config = load_hf_config(checkpoint.model_dir)
    with torch.device("meta"):
        model = CausalLM(config)
    expected = set(model.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, tensor in iter_checkpoint_tensors(checkpoint):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name not in expected:
            unexpected.append(name)
            continue
        state[name] = tensor.to(device=device, dtype=dtype)
    if model.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing = sorted(expected - state.keys())
    if missing or unexpected:
        raise ValueError(f"checkpoint {checkpoint.model_dir} does not match the {config.model_type} "
                         f"architecture: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    model.load_state_dict(state, strict=False, assign=True)
    if model.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary.to(device)  # its table was computed on the CPU, not on meta
    return model.eval().requires_grad_(False)
