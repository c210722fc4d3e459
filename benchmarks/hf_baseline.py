"""Hugging Face baselines for the inference benchmark, on the same model files and tokens.

- `hf_generate`: transformers `generate` on a peft `PeftModel` holding every
  adapter, mixed-adapter batches (`adapter_names=`, "__base__" for the base
  model), left padding, batches in request order, greedy, each batch run for
  its longest output; only useful tokens are counted.
- `raw_forward`: one plain forward per prompt (`logits_to_keep=1`, no cache)
  of a transformers LlamaForCausalLM: the prefill reference.
"""
from __future__ import annotations

import gc
import time

import torch

from benchmarks.machine import synchronize
from benchmarks.workload import Workload

BASE_ADAPTER = "__base__"


def _load_causal_lm(model_dir: str, device: torch.device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.to(device).eval()


def load_peft_model(model_dir: str, adapter_paths: dict[str, str], device: torch.device):
    from peft import PeftModel

    base = _load_causal_lm(model_dir, device)
    names = list(adapter_paths)
    model = PeftModel.from_pretrained(base, adapter_paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_paths[name], adapter_name=name)
    return model.to(device).eval()


def _generate_batch(model, workload: Workload, indices: list[int], pad_id: int, device: torch.device) -> None:
    from transformers import GenerationConfig

    prompts = [workload.prompts[i] for i in indices]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):  # left padding
        input_ids[row, width - len(p):] = torch.tensor(p)
        attention_mask[row, width - len(p):] = 1
    max_new = max(workload.output_lens[i] for i in indices)
    # NOTE: min_new_tokens = max_new_tokens with no EOS id, so random weights cannot stop a batch early.
    config = GenerationConfig(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                              pad_token_id=pad_id, eos_token_id=None)
    adapter_names = [workload.adapters[i] or BASE_ADAPTER for i in indices]
    kwargs = {"adapter_names": adapter_names} if any(a != BASE_ADAPTER for a in adapter_names) else {}
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         generation_config=config, **kwargs)
    if out.shape[1] != width + max_new:
        raise RuntimeError(f"HF generate made {out.shape[1] - width} tokens, expected {max_new}")


def hf_generate(model_dir: str, adapter_paths: dict[str, str], runs: list[Workload], warmup: Workload,
                device: torch.device, batch_size: int = 16) -> dict:
    """Time HF generate over each workload in `runs` (same shapes) after one warm-up; the best run counts."""
    model = load_peft_model(model_dir, adapter_paths, device)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    walls = []
    with torch.inference_mode():
        _generate_batch(model, warmup, list(range(warmup.num_requests)), pad_id, device)
        for workload in runs:
            synchronize(device)
            start = time.perf_counter()
            for first in range(0, workload.num_requests, batch_size):
                indices = list(range(first, min(first + batch_size, workload.num_requests)))
                _generate_batch(model, workload, indices, pad_id, device)
            synchronize(device)
            walls.append(time.perf_counter() - start)
    del model
    gc.collect()
    return {"wall_s": min(walls), "tokens_per_s": runs[0].num_tokens / min(walls), "all_wall_s": walls,
            "batch_size": batch_size}


def raw_forward(model_dir: str, runs: list[Workload], device: torch.device) -> dict:
    """Time one plain forward per prompt of each workload in `runs` after a warm-up; the best run counts."""
    model = _load_causal_lm(model_dir, device)
    walls = []
    with torch.inference_mode():
        model(input_ids=torch.tensor([runs[0].prompts[0][:32]], device=device), logits_to_keep=1, use_cache=False)
        for workload in runs:
            prompts = [torch.tensor([p], dtype=torch.long, device=device) for p in workload.prompts]
            synchronize(device)
            start = time.perf_counter()
            for ids in prompts:
                model(input_ids=ids, logits_to_keep=1, use_cache=False)
            synchronize(device)
            walls.append(time.perf_counter() - start)
    del model
    gc.collect()
    return {"wall_s": min(walls), "tokens_per_s": runs[0].num_prompt_tokens / min(walls), "all_wall_s": walls}
