"""`coserve bench finetune`: the engine's LoRA finetuning alone against a plain PEFT training loop.

On "bench-small" (fp32), sequences of 512 random tokens, LoRA r=16 (alpha 32)
on all linear layers, AdamW, the same batch size on both sides:

- saved_bytes_ratio: bytes the engine keeps between a token's forward and its
  backward (its K/V included) over what autograd saves in a plain peft forward.
- speedup_vs_peft: engine training tokens/s over the plain peft loop's, both
  timed over whole optimizer steps after one warm-up step, runs alternating.
"""
from __future__ import annotations

import gc
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch

from benchmarks.inference import bench_small_dir
from benchmarks.machine import _linear_params_per_layer as linear_params_per_layer
from benchmarks.machine import gemm_gflops, machine_info, resolve_device
from benchmarks.peft_reference import measure_peft_saved_bytes, peft_train_throughput
from benchmarks.trace import MIN_TOKEN_ID
from coserve.graph.prune_backward import RECOMPUTED


def progress(message: str) -> None:
    """One progress line on stderr (stdout carries only the JSON)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


TARGETS = {"saved_bytes_ratio": 0.125, "speedup_vs_peft": 0.8}
"""saved_bytes_ratio is a ceiling (at most 1/8 of peft's), speedup_vs_peft a floor."""
LORA_R, LORA_ALPHA = 16, 32
FINETUNE_ADAPTER = "ft"



@dataclass(frozen=True)
class Setting:
    batch_size: int
    seq_len: int
    timed_steps: int
    """Optimizer steps timed per run, after one untimed warm-up step."""
    repeats: int
    """Runs of each side, alternating engine and peft; the fastest run of each counts."""
    max_num_batched_tokens: int = 1024


FULL = Setting(batch_size=2, seq_len=512, timed_steps=6, repeats=2)
QUICK = Setting(batch_size=2, seq_len=512, timed_steps=2, repeats=2)


def random_rows(vocab_size: int, num_rows: int, seq_len: int, seed: int = 0) -> list[dict]:
    """Pre-tokenized finetuning rows of `seq_len` random ids (every token is a training target)."""
    rng = random.Random(seed)
    return [{"input_ids": [rng.randrange(MIN_TOKEN_ID, vocab_size) for _ in range(seq_len)]}
            for _ in range(num_rows)]


def finetune_config(rows: list[dict], batch_size: int, seq_len: int, max_steps: int = 10_000):
    """The job every co-serving and finetuning benchmark trains: a fresh all-linear LoRA r=16.

    NOTE: the job plans all `max_steps` up front; 10,000 outlasts any benchmark window.
    """
    from peft import LoraConfig

    from coserve.config import FinetuneConfig

    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear", lora_dropout=0.0)
    return FinetuneConfig(adapter=FINETUNE_ADAPTER, peft=lora, dataset=rows, max_steps=max_steps,
                          batch_size=batch_size, max_seq_len=seq_len, shuffle=False, learning_rate=1e-4)


def _step_until(engine, job, done) -> None:
    while not done():
        if job.status in ("failed", "cancelled", "succeeded"):
            raise RuntimeError(f"finetuning job ended early: status {job.status}, error {getattr(job, 'error', None)}")
        engine.step()


def engine_finetune_run(model_dir: str, setting: Setting, device: torch.device) -> dict:
    """Train alone on a fresh engine: one warm-up optimizer step, then `timed_steps` timed ones."""
    from coserve.config import EngineConfig
    from coserve.engine.engine import Engine
    from coserve.models.checkpoint import load_hf_config

    vocab = load_hf_config(model_dir).vocab_size
    num_steps = setting.timed_steps + 1
    rows = random_rows(vocab, setting.batch_size * num_steps, setting.seq_len)
    engine = Engine(EngineConfig(model=model_dir, dtype="float32", device=str(device), max_loras=1,
                                 max_num_batched_tokens=setting.max_num_batched_tokens,
                                 max_model_len=max(1024, setting.seq_len), kv_cache_memory_gb=0.5))
    try:
        profile = _latency_profile(engine)
        job = engine.add_finetune_job(finetune_config(rows, setting.batch_size, setting.seq_len, num_steps))
        _step_until(engine, job, lambda: len(job.losses) >= 1)
        tokens_before, stats_before = job.tokens_trained, engine.get_stats()
        start = time.perf_counter()
        _step_until(engine, job, lambda: len(job.losses) >= num_steps)
        wall = time.perf_counter() - start
        stats = engine.get_stats()
    finally:
        del engine
        gc.collect()
    tokens = job.tokens_trained - tokens_before
    kinds = {k: stats["tokens_by_kind"].get(k, 0) - stats_before["tokens_by_kind"].get(k, 0)
             for k in stats["tokens_by_kind"]}
    return {"tokens_per_s": tokens / wall, "seconds_per_step": wall / setting.timed_steps, "wall_s": wall,
            "tokens_trained": tokens, "losses": [round(x, 4) for x in job.losses],
            "tokens_by_kind": kinds, "num_iterations": stats["num_iterations"] - stats_before["num_iterations"],
            "finetune_stats": stats.get("finetune", {}), "latency_profile": profile}


def _saved_bytes_per_token(finetune_stats: dict) -> float | None:
    """The engine's measured bytes per token, wherever its stats keep them."""
    if "saved_bytes_per_token" in finetune_stats:
        return finetune_stats["saved_bytes_per_token"]
    for value in finetune_stats.values():
        if isinstance(value, dict) and "saved_bytes_per_token" in value:
            return value["saved_bytes_per_token"]
    return None


def _latency_profile(engine) -> dict | None:
    """The engine's own start-up latency profile (forward and backward iterations), measured idle."""
    try:
        from coserve.engine.profiler import profile_latency
    except ImportError:
        return None
    return profile_latency(engine)


def _backward_cost_ratio(profile: dict | None) -> float | None:
    """Measured cost of a backward token (recompute + backward) over a forward token."""
    if profile and profile.get("forward_per_token") and profile.get("backward_per_token"):
        return round(profile["backward_per_token"] / profile["forward_per_token"], 3)
    return None


def recompute_flop_share(cfg) -> float:
    """Analytic share of a trained token's FLOPs spent recomputing.

    Per token: forward 2 x linears + 2 x hidden x vocab (logits), the logits' gradient at the final
    state 2 x hidden x vocab, input gradients through every frozen linear 2 x linears, and the
    recompute 2 x (linears - k/v/down projections). Attention and LoRA are left out (small at 512 tokens).
    """
    per_layer, shapes = linear_params_per_layer(cfg)
    linears = per_layer * cfg.num_hidden_layers
    # not recomputed: k_proj and v_proj (their outputs are in the KV cache) and down_proj
    skipped = sum(shapes[i][0] * shapes[i][1] for i in (1, 2, 6)) * cfg.num_hidden_layers
    vocab = cfg.hidden_size * cfg.vocab_size
    recompute = 2 * (linears - skipped)
    return recompute / (2 * linears + 2 * vocab + 2 * vocab + 2 * linears + recompute)


NOTES = [
    ("tokens/s counts every token of a step (random unpadded sequences: all are targets) over the wall time "
     "of `timed_steps` whole optimizer steps after one warm-up step; engine and peft runs alternate and the "
     "fastest of each counts."),
    ("saved_bytes_per_token (engine): measured by the engine when a sequence's forward completes: its saved "
     "layer inputs, final-state loss gradient, targets and KV blocks, over its length."),
    ("peft_saved_bytes_per_token: storages autograd keeps in one plain peft training forward + loss "
     "(batch 1), model weights excluded (benchmarks.peft_reference.measure_peft_saved_bytes)."),
    ("backward_cost_ratio: per-token slope of backward-window latency over that of forward iterations, "
     "from the engine's latency profiler run on the idle engine before training (a backward token "
     "recomputes its layers' forward and then runs the backward); recompute_flop_share: analytic share "
     "of a trained token's FLOPs spent recomputing (see recompute_flop_share)."),
]


def run_finetune_benchmark(quick: bool, device: str = "auto") -> dict:
    """Run the benchmark and return one JSON-serialisable dict (see the module docstring)."""
    start = time.perf_counter()
    from transformers.utils import logging as hf_logging

    from coserve.models.checkpoint import load_hf_config

    hf_logging.disable_progress_bar()
    dev = resolve_device(device)
    # NOTE: other jobs on these shared cores slow every figure; the load average says if there were any.
    load_at_start = round(os.getloadavg()[0], 2)
    setting = QUICK if quick else FULL
    model_dir = bench_small_dir()
    cfg = load_hf_config(model_dir)
    peft_bytes = measure_peft_saved_bytes(model_dir, seq_len=setting.seq_len, lora_r=LORA_R, lora_alpha=LORA_ALPHA)
    ours, peft = [], []
    for _ in range(setting.repeats):
        ours.append(engine_finetune_run(model_dir, setting, dev))
        progress(f"engine finetuning: {ours[-1]['tokens_per_s']:.1f} tokens/s")
        peft.append(peft_train_throughput(model_dir, setting.batch_size, setting.seq_len, setting.timed_steps,
                                          lora_r=LORA_R, lora_alpha=LORA_ALPHA, device=dev))
        gc.collect()
        progress(f"peft finetuning: {peft[-1]['tokens_per_s']:.1f} tokens/s")
    best_ours = max(ours, key=lambda r: r["tokens_per_s"])
    best_peft = max(peft, key=lambda r: r["tokens_per_s"])
    saved = _saved_bytes_per_token(best_ours["finetune_stats"])
    figures = {
        "saved_bytes_ratio": saved / peft_bytes["saved_bytes_per_token"] if saved is not None else None,
        "speedup_vs_peft": best_ours["tokens_per_s"] / best_peft["tokens_per_s"],
    }
    return {
        "benchmark": "finetune", "model": "bench-small", "quick": quick,
        "machine": {**machine_info(dev), "load_average_at_start": load_at_start},
        "saved_bytes_per_token": saved,
        "peft_saved_bytes_per_token": peft_bytes["saved_bytes_per_token"],
        **{k: (round(v, 4) if v is not None else None) for k, v in figures.items()},
        "tokens_per_s": {"engine": round(best_ours["tokens_per_s"], 1), "peft": round(best_peft["tokens_per_s"], 1)},
        "all_tokens_per_s": {"engine": [round(r["tokens_per_s"], 1) for r in ours],
                             "peft": [round(r["tokens_per_s"], 1) for r in peft]},
        "seconds_per_step": {"engine": round(best_ours["seconds_per_step"], 3),
                             "peft": round(best_peft["seconds_per_step"], 3)},
        "recomputed": best_ours["finetune_stats"].get("recomputed", RECOMPUTED),
        "backward_cost_ratio": _backward_cost_ratio(best_ours["latency_profile"]),
        "recompute_flop_share": round(recompute_flop_share(cfg), 3),
        "engine_run": {k: best_ours[k] for k in ("tokens_by_kind", "num_iterations", "losses", "finetune_stats")},
        "gemm_gflops": round(gemm_gflops(dev, size=1024, repeats=10), 1),
        "config": {"model_dir": model_dir, **asdict(setting), "lora_r": LORA_R, "lora_alpha": LORA_ALPHA,
                   "target_modules": "all-linear", "dtype": "float32", "optimizer": "adamw"},
        "targets": {"saved_bytes_ratio_at_most": TARGETS["saved_bytes_ratio"],
                    "speedup_vs_peft_at_least": TARGETS["speedup_vs_peft"]},
        "meets_targets": {"saved_bytes_ratio": figures["saved_bytes_ratio"] is not None
                          and figures["saved_bytes_ratio"] <= TARGETS["saved_bytes_ratio"],
                          "speedup_vs_peft": figures["speedup_vs_peft"] >= TARGETS["speedup_vs_peft"]},
        "notes": NOTES,
        "total_wall_s": round(time.perf_counter() - start, 1),
    }
