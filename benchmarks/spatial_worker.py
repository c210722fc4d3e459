"""The spatial-sharing baseline of the co-serving benchmark: two engines in two processes.

One process serves the trace on an inference-only engine, the other trains on
a finetuning-only engine; the cores are split by each process's torch thread
count (oversubscribed splits included). Both processes are spawned once, load
and warm up their engine, and then run one window per split: the split is set,
each warms up again, and a barrier starts both windows together.
"""
from __future__ import annotations

import multiprocessing as mp
import time

from benchmarks.coserving import (
    BenchContext,
    WindowResult,
    build_engine,
    run_window,
    start_job,
    warm_up,
)
from benchmarks.finetune import progress
from benchmarks.trace import TraceRequest

_STARTUP_TIMEOUT_S = 300.0


def worker_main(role: str, conn, barrier, ctx: BenchContext, trace: list[TraceRequest], budget: int) -> None:
    """Process entry point: build the engine of `role` ("inference" or "finetune"), then serve commands.

    Each command is (threads, window_s, tag); the reply is the window's WindowResult. None ends the loop.
    """
    import torch

    torch.set_num_threads(1)
    try:
        engine = build_engine(ctx, budget)
        job = start_job(engine, ctx) if role == "finetune" else None
        warm_up(engine, ctx, job, tag="load")
        conn.send("ready")
        while (command := conn.recv()) is not None:
            threads, window_s, tag = command
            torch.set_num_threads(threads)
            warm_up(engine, ctx, None, tag=f"{tag}-warmup")  # a short request at the new thread count
            barrier.wait(timeout=_STARTUP_TIMEOUT_S)
            conn.send(run_window(engine, trace if role == "inference" else [], window_s, job, prefix=f"{tag}-"))
    except Exception as exc:  # reported to the parent, which fails the benchmark with it
        conn.send(f"{role} worker failed: {type(exc).__name__}: {exc}")
        raise


def _receive(conn, role: str, timeout_s: float):
    if not conn.poll(timeout_s):
        raise RuntimeError(f"the spatial {role} worker sent nothing for {timeout_s:.0f} s")
    reply = conn.recv()
    if isinstance(reply, str) and reply != "ready":
        raise RuntimeError(reply)
    return reply


def _combine(inference: WindowResult, finetune: WindowResult) -> WindowResult:
    """The two processes' windows as one mode: requests and step times from one, finetuning from the other."""
    kinds = {**inference.tokens_by_kind}
    for kind, count in finetune.tokens_by_kind.items():
        kinds[kind] = kinds.get(kind, 0) + count
    return WindowResult(inference.timings, max(inference.wall_s, finetune.wall_s), finetune.finetune_tokens,
                        finetune.sequence_tokens, kinds, inference.num_iterations + finetune.num_iterations,
                        inference.step_seconds, None, inference.cpu_s + finetune.cpu_s)


def run_spatial(ctx: BenchContext, trace: list[TraceRequest], window_s: float, splits, inference_budget: int,
                finetune_budget: int) -> dict[str, WindowResult]:
    """One window per (inference threads, finetuning threads) split; results keyed "threads_<a>_<b>"."""
    context = mp.get_context("spawn")
    barrier = context.Barrier(2)
    workers = {}
    start = time.perf_counter()
    for role, budget in (("inference", inference_budget), ("finetune", finetune_budget)):
        parent, child = context.Pipe()
        process = context.Process(target=worker_main, args=(role, child, barrier, ctx, trace, budget), daemon=True)
        process.start()
        workers[role] = (process, parent)
    results = {}
    try:
        for role, (_, conn) in workers.items():
            _receive(conn, role, _STARTUP_TIMEOUT_S)
        progress(f"spatial workers ready in {time.perf_counter() - start:.1f} s")
        for a, b in splits:
            tag = f"threads_{a}_{b}"
            workers["inference"][1].send((a, window_s, tag))
            workers["finetune"][1].send((b, window_s, tag))
            replies = {role: _receive(conn, role, window_s + _STARTUP_TIMEOUT_S) for role, (_, conn) in workers.items()}
            results[tag] = _combine(replies["inference"], replies["finetune"])
            progress(f"spatial {tag}: {results[tag].finetune_tokens / window_s:.1f} finetune tokens/s")
    finally:
        for process, conn in workers.values():
            if process.is_alive():
                conn.send(None)
        for process, _ in workers.values():
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
    return results
