"""`coserve bench coserving --cluster`: the co-serving benchmark through `cluster.Deployment` (Ray actors).

The same bench-small model, 8 serving adapters, seeded Poisson trace, finetuning
job, SLO rule and targets as `benchmarks/coserving.py`, but every engine runs in
a Ray actor of a Deployment on an embedded local Ray that gets all the
machine's cores, and the driver replays the trace against it: each request is
its own controller `generate` call, sent at its arrival time. Modes, each a
fresh Deployment:

- inference_only: 1 co-serving worker, no job. Gives the maximum throughput
  (a burst, through the deployment), the trace's rate (LOAD_FRACTION of it)
  and the SLO (TTFT <= 4x, TPOT <= 2x its p50 on the trace).
- coserving: 1 worker with all CPUs, `tpot_slo_ms` and `ttft_slo_ms` = tpot_safety x the
  SLO (latency profiled by the worker at start-up), the trace plus the job.
- spatial: Deployment mode "spatial": an inference-only and a finetuning-only
  actor, each half the CPUs; the trace goes to one, the job to the other.
- finetune_only: 1 worker, the job alone (training tokens/s).

Run: `coserve bench coserving --cluster [--quick]`. For a check that it works
end to end (an 8-second trace, one spatial setting, about 3 minutes on 2
cores; figures meaningless): `python -m benchmarks.coserving_cluster --smoke`.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from concurrent.futures import Future, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from benchmarks.coserving import (
    ADAPTER_RANKS,
    ADAPTERS_PER_RANK,
    FINETUNE_BATCH,
    FINETUNE_BUDGET,
    FINETUNE_SEQ_LEN,
    FLOP_FORMULA,
    FULL,
    INFERENCE_BUDGET,
    LOAD_FRACTION,
    OUTPUT_RANGE,
    PROMPT_RANGE,
    QUICK,
    TARGETS,
    BenchContext,
    Setting,
    WindowResult,
    coserving_gflops,
    coserving_slo_kwargs,
    coserving_tpot_slo_ms,
    draw_trace,
    engine_kwargs,
    figures,
    request_sampling,
    swept,
    throughput_burst,
    throughput_figures,
    verdict,
    window_for,
)
from benchmarks.finetune import LORA_R, finetune_config, progress, random_rows
from benchmarks.trace import RequestTiming, TraceRequest, percentile, slo_from_baseline

SMOKE = Setting(trace_s=8.0, burst_requests=8, temporal_turns=(), spatial_splits=())
"""Only to check the benchmark runs end to end: a small burst, one spatial setting; its figures mean nothing.
(At the rate a small burst gives on 2 cores, a trace much shorter than 8 s can hold no request.)"""
SPATIAL_BUDGETS = ((INFERENCE_BUDGET, FINETUNE_BUDGET), (INFERENCE_BUDGET, INFERENCE_BUDGET))
"""(inference actor, finetuning actor) max_num_batched_tokens settings of the spatial deployment; the first
is the in-process benchmark's (each engine gets the budget it is best at)."""
WARMUP_TIMEOUT_S = 600.0
DRAIN_TIMEOUT_S = 60.0
"""After a window, how long requests still running may take to finish before the deployment stops."""
CLOCK_TOLERANCE_S = 0.5


# ---- replaying a trace ---------------------------------------------------------------------


@dataclass
class Replay:
    """One replayed window, on the driver's clock (time.monotonic)."""

    start: float
    end: float
    """When the window ended: at start + window_s, or when the last request finished if drained."""
    sent: dict[str, float]
    """Request id -> when the driver sent it."""
    outputs: dict
    """Request id -> its RequestOutput, for requests answered by `end`."""
    errors: dict[str, str]
    """Request id -> the error its call raised (answered by `end`)."""
    futures: dict[str, Future]

    @property
    def wall_s(self) -> float:
        return self.end - self.start

    def unanswered(self) -> list[Future]:
        return [f for f in self.futures.values() if not f.done()]


def replay(trace: list[TraceRequest], window_s: float, send: Callable[[TraceRequest], Future], *,
           stop_when_drained: bool = False, clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep) -> Replay:
    """Send each request with `send` at its arrival time and collect answers until the window ends.

    `send` returns a Future of the request's RequestOutput. With `stop_when_drained` the window
    ends as soon as every request is answered, else it lasts `window_s` (finetuning keeps going).
    """
    start = clock()
    end = start + window_s
    sent: dict[str, float] = {}
    futures: dict[str, Future] = {}
    for request in trace:
        due = start + request.arrival_s
        if due >= end:
            break
        while (now := clock()) < due:
            sleep(due - now)
        sent[request.request_id] = clock()
        futures[request.request_id] = send(request)
    if futures:
        # Returns once every request is answered or at the window's end, whichever comes first.
        wait(list(futures.values()), timeout=max(0.0, end - clock()))
    if not stop_when_drained:
        while (left := end - clock()) > 0:
            sleep(left)
    finished_at = min(clock(), end)
    outputs, errors = {}, {}
    for request_id, future in futures.items():
        if not future.done():
            continue
        error = future.exception()
        if error is not None:
            errors[request_id] = f"{type(error).__name__}: {error}"
        else:
            outputs[request_id] = future.result()
    return Replay(start, finished_at, sent, outputs, errors, futures)


def request_timings(trace: list[TraceRequest], rep: Replay) -> list[RequestTiming]:
    """Per trace request, seconds from the window's start; arrival = the driver's send time.

    So TTFT = first token - send (Ray and the controller's routing included) and TPOT =
    (finish - first token) / (tokens - 1). A request not finished ("length") by the window's
    end counts as unfinished, as an aborted one does in the in-process benchmark.
    """
    timings = []
    for request in trace:
        sent = rep.sent.get(request.request_id)
        timing = RequestTiming(arrival=request.arrival_s if sent is None else sent - rep.start,
                               num_tokens=request.num_tokens)
        out = rep.outputs.get(request.request_id)
        if out is not None:
            _check_clock(out.metrics, sent, rep.end)
            first, finish = out.metrics.get("first_token_time"), out.metrics.get("finish_time")
            if first is not None and first <= rep.end:
                timing.first_token = first - rep.start
            if out.finish_reason == "length" and finish is not None and finish <= rep.end and first is not None:
                timing.finish = finish - rep.start
                timing.num_output_tokens = len(out.token_ids)
        timings.append(timing)
    return timings


def _check_clock(metrics: dict, sent: float, end: float) -> None:
    # NOTE: the engine stamps requests with time.monotonic() in the worker process. CLOCK_MONOTONIC is
    # one clock for every process of a machine, so it compares with the driver's; a worker on another
    # machine (or a change of the engine's clock) would make every latency garbage, so fail loudly.
    arrival = metrics.get("arrival_time")
    if arrival is None or not sent - CLOCK_TOLERANCE_S <= arrival <= end + CLOCK_TOLERANCE_S:
        raise RuntimeError(f"a worker's request clock ({arrival!r}) does not match the driver's time.monotonic() "
                           f"(sent at {sent:.3f}, window end {end:.3f}): workers must run on this machine")


def replay_summary(trace: list[TraceRequest], rep: Replay) -> dict:
    """How well the driver kept to the trace, and what a request spent before the worker had it."""
    lag = [rep.sent[r.request_id] - rep.start - r.arrival_s for r in trace if r.request_id in rep.sent]
    dispatch = [out.metrics["arrival_time"] - rep.sent[rid] for rid, out in rep.outputs.items()
                if out.metrics.get("arrival_time") is not None]

    def ms(values: list[float]) -> dict | None:
        if not values:
            return None
        return {"p50": round(1e3 * percentile(values, 0.5), 2), "max": round(1e3 * max(values), 2)}

    return {"num_sent": len(rep.sent), "num_answered": len(rep.outputs), "num_errors": len(rep.errors),
            "first_error": next(iter(rep.errors.values()), None), "send_lag_ms": ms(lag), "dispatch_ms": ms(dispatch)}


# ---- one deployment ------------------------------------------------------------------------


@contextmanager
def deployment(ctx: BenchContext, name: str, workdir: Path, mode: str, use_gpu: bool, cpus: int,
               budget: int = INFERENCE_BUDGET, role_engine_kwargs: dict | None = None, **overrides):
    """A fresh Deployment (1 device share of `cpus` CPUs) with the serving adapters registered."""
    from cluster import Deployment

    dep = Deployment.start(ctx.model_dir, num_workers=1, name=name, mode=mode, use_gpu=use_gpu,
                           cpus_per_worker=cpus, directory=workdir / name, role_engine_kwargs=role_engine_kwargs,
                           **engine_kwargs(ctx, budget, **overrides))
    try:
        for adapter, path in ctx.adapter_paths.items():
            dep.load_adapter(adapter, path)
        yield dep
    finally:
        dep.shutdown()


def placement(dep) -> list[dict]:
    """dep.workers() without the actor handles (not JSON)."""
    return [{k: v for k, v in w.items() if k != "actor"} for w in dep.workers()]


def _sender(dep) -> Callable[[TraceRequest], Future]:
    # NOTE: one controller call per request as `.remote` futures rather than dep.generate on a pool of
    # threads: nothing blocks per request, and requests still running when a window ends can be left
    # behind without threads stuck in Deployment's retry loop once the deployment is shut down.
    controller = dep._controller

    def send(request: TraceRequest) -> Future:
        ref = controller.generate.remote(None, [request_sampling(request.output_len)], [request.adapter],
                                         [list(request.prompt_token_ids)])
        return _first(ref.future())

    return send


def _first(batch: Future) -> Future:
    """A Future of the only RequestOutput of a one-prompt generate call."""
    single: Future = Future()

    def done(f: Future) -> None:
        error = f.exception()
        if error is not None:
            single.set_exception(error)
        else:
            single.set_result(f.result()[0])

    batch.add_done_callback(done)
    return single


def _warm_up(dep, ctx: BenchContext, job=None) -> None:
    """One short request on an adapter and, with a job, wait until its first backward window has run."""
    backward_at_start = _stats(dep)["totals"]["tokens_by_kind"].get("finetune_backward", 0)
    dep.generate(prompt_token_ids=[[11 + i for i in range(32)]], sampling_params=request_sampling(4),
                 adapter=next(iter(ctx.adapter_paths)))
    deadline = time.monotonic() + WARMUP_TIMEOUT_S
    while job is not None and _stats(dep)["totals"]["tokens_by_kind"].get("finetune_backward", 0) <= backward_at_start:
        record = job.progress()
        if record["status"] in ("failed", "cancelled", "succeeded"):
            raise RuntimeError(f"finetuning job {record['status']}: {record.get('error')}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the finetuning job trained nothing in {WARMUP_TIMEOUT_S:.0f} s")
        time.sleep(0.25)


def _stats(dep) -> dict:
    stats = dep.stats()
    failed = {name: s["error"] for name, s in stats["workers"].items() if "error" in s}
    if failed:
        raise RuntimeError(f"worker stats failed: {failed}")
    return stats


class _Meter:
    """Counters of a deployment's workers, read before and after a window."""

    def __init__(self, dep, job=None) -> None:
        import ray

        self.dep, self.job = dep, job
        self.handles = {w["name"]: w["actor"] for w in dep.workers()}
        # NOTE: the workers are processes on this machine, so their CPU time is read from here.
        self.pids = {name: ray.get(h.info.remote())["pid"] for name, h in self.handles.items()}

    def read(self) -> dict:
        import psutil
        import ray

        stats = _stats(self.dep)
        trained = 0
        if self.job is not None:
            record = self.job.progress()
            handle = self.handles.get(record["worker"])
            if handle is not None and record.get("engine_job_id"):
                job_progress = ray.get(handle.job_progress.remote(record["engine_job_id"]))
                trained = job_progress["tokens_trained"] if job_progress else 0
        cpu = 0.0
        for pid in self.pids.values():
            times = psutil.Process(pid).cpu_times()
            cpu += times.user + times.system
        workers = stats["workers"]
        return {"kinds": dict(stats["totals"]["tokens_by_kind"]), "iterations": stats["totals"]["num_iterations"],
                "busy": {n: s["busy_seconds"] for n, s in workers.items()},
                "worker_iterations": {n: s["num_iterations"] for n, s in workers.items()},
                "budget": {n: s.get("budget") for n, s in workers.items()}, "trained": trained, "cpu": cpu}


def run_window(dep, trace: list[TraceRequest], window_s: float, job=None,
               stop_when_drained: bool = False) -> tuple[WindowResult, dict, Replay]:
    """Replay `trace` against `dep` for one window; the result, its cluster-only figures and the raw replay."""
    meter = _Meter(dep, job)
    before = meter.read()
    rep = replay(trace, window_s, _sender(dep), stop_when_drained=stop_when_drained)
    after = meter.read()
    kinds = {k: after["kinds"].get(k, 0) - before["kinds"].get(k, 0) for k in after["kinds"]}
    sequence_tokens = after["trained"] - before["trained"]
    budgets = after["budget"]
    result = WindowResult(request_timings(trace, rep), rep.wall_s, kinds.get("finetune_backward", sequence_tokens),
                          sequence_tokens, kinds, after["iterations"] - before["iterations"], [],
                          budgets[next(iter(budgets))] if len(budgets) == 1 else budgets, after["cpu"] - before["cpu"])
    mean_iteration_ms = {}
    for name in after["busy"]:
        iterations = after["worker_iterations"][name] - before["worker_iterations"][name]
        busy = after["busy"][name] - before["busy"][name]
        mean_iteration_ms[name] = round(1e3 * busy / iterations, 1) if iterations else None
    return result, {"mean_iteration_ms": mean_iteration_ms, "replay": replay_summary(trace, rep)}, rep


def _finish(dep, rep: Replay | None, job=None) -> None:
    """Stop the job and let requests still running finish (they no longer count) before shutting down."""
    if job is not None:
        job.cancel()
    if rep is not None and rep.unanswered():
        wait(rep.unanswered(), timeout=DRAIN_TIMEOUT_S)


def _mode_figures(result: WindowResult, extra: dict, slo, window: float) -> dict:
    out = figures(result, slo, window)
    # NOTE: steps run inside the worker; its busy time per iteration stands in for step_ms.
    out["step_ms"] = None
    return {**out, **extra}


# ---- the modes -----------------------------------------------------------------------------


def _inference_alone(ctx, setting, vocab_size, workdir, use_gpu, cpus) -> tuple:
    with deployment(ctx, "bench-inference", workdir, "coserve", use_gpu, cpus) as dep:
        where = placement(dep)
        _warm_up(dep, ctx)
        burst = throughput_burst(ctx, setting.burst_requests, vocab_size)
        _, _, burst_replay = run_window(dep, burst, 600.0, stop_when_drained=True)
        if len(burst_replay.outputs) != len(burst):
            raise RuntimeError(f"the throughput burst failed: {replay_summary(burst, burst_replay)}")
        max_throughput = throughput_figures(burst, burst_replay.wall_s)
        rate, trace = draw_trace(ctx, setting, max_throughput["tokens_per_s"], vocab_size)
        progress(f"max throughput {max_throughput['tokens_per_s']} tokens/s through the deployment; "
                 f"trace: {len(trace)} requests at {rate:.2f}/s")
        alone, extra, rep = run_window(dep, trace, setting.trace_s + 120.0, stop_when_drained=True)
        _finish(dep, rep)
    return max_throughput, rate, trace, alone, extra, where


def _shared_mode(ctx, trace, window, workdir, name: str, mode: str, use_gpu: bool, cpus: int, budget: int,
                 role_engine_kwargs: dict | None = None, **overrides) -> tuple[WindowResult, dict, list[dict]]:
    """One deployment runs the job and replays `trace` (or nothing) for one window."""
    with deployment(ctx, name, workdir, mode, use_gpu, cpus, budget, role_engine_kwargs, **overrides) as dep:
        where = placement(dep)
        job = dep.finetune(finetune_config(ctx.rows, FINETUNE_BATCH, FINETUNE_SEQ_LEN))
        _warm_up(dep, ctx, job)
        result, extra, rep = run_window(dep, trace, window, job)
        extra["job_worker"] = job.worker
        _finish(dep, rep, job)
    return result, extra, where


NOTES = [
    ("Every mode is a fresh cluster.Deployment on an embedded local Ray (ray.init(address='local', "
     "num_cpus=<cores>)); the driver replays the same trace (same seed) for the same window as every other "
     "mode: the trace plus the time the last request needs if it just meets the SLO."),
    ("Each request is its own controller generate call sent at its arrival time; TTFT is measured from the "
     "driver's send time (time.monotonic, one clock for all processes of the machine) to the worker's first "
     "token, so it includes Ray and the controller's routing (replay.dispatch_ms: send to the worker's "
     "engine having the request; replay.send_lag_ms: send time behind the trace's arrival)."),
    ("Requests not finished when the window ends miss the SLO; the deployment has no abort, so they are left "
     f"to finish (up to {DRAIN_TIMEOUT_S:.0f} s, uncounted) before it stops."),
    ("max_throughput is measured through the deployment (a burst of requests sent at once), so the trace's "
     f"rate ({LOAD_FRACTION:.0%} of it) includes Ray's overhead and is not the in-process benchmark's."),
    ("finetune_tokens_per_s: finetuning backward tokens done in the window, from the workers' stats "
     "(tokens_by_kind deltas); finetune_sequence_tokens_per_s: the job's tokens_trained delta."),
    ("spatial: Deployment mode 'spatial' on the same CPUs: an inference-only and a finetuning-only actor, "
     "each half of them (torch threads max(1, int(cpus / 2)) each; no thread-split sweep, the placement "
     "fixes it). (inference, finetuning) max_num_batched_tokens are swept over "
     f"{SPATIAL_BUDGETS} (role_engine_kwargs) and the best setting meeting the SLO counts (finetuning 0 "
     "if none)."),
    "The only baseline is spatial (temporal sharing is the same engine as in-process; see coserving).",
    ("step_ms is null (steps run in the workers); mean_iteration_ms is each worker's busy time per "
     "iteration in the window; cpu_s_per_wall_s is the worker processes' CPU time (user + system) per "
     "wall second."),
    "Ray's own processes (GCS, raylet, the controller) share the cores with the workers.",
    "The machine is shared: see machine.load_average_at_start and gemm_gflops_at_end.",
]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_cluster_coserving_benchmark(quick: bool, device: str = "auto", smoke: bool = False) -> dict:
    """Run the benchmark through Deployments and return one JSON-serialisable dict (see the module docstring).

    smoke: SMOKE (an 8-request burst) and one spatial setting, to check the code end to end (figures meaningless).
    """
    import ray
    import torch
    from transformers.utils import logging as hf_logging

    from benchmarks.inference import bench_cache_root, bench_small_dir
    from benchmarks.machine import gemm_gflops, machine_info, resolve_device
    from benchmarks.workload import adapter_specs, make_peft_adapters
    from coserve.models.checkpoint import load_hf_config

    begin = time.perf_counter()
    # NOTE: other jobs on these shared cores slow every figure; the load average says if there were any.
    load_at_start = round(os.getloadavg()[0], 2)
    hf_logging.disable_progress_bar()
    dev = resolve_device(device)
    use_gpu = dev.type == "cuda"
    setting = SMOKE if smoke else QUICK if quick else FULL
    spatial_budgets = SPATIAL_BUDGETS[:1] if smoke else SPATIAL_BUDGETS
    cores = _cores()
    # Measured before Ray starts, in this process, as the in-process benchmark does.
    gemm = gemm_gflops(dev, size=1024, repeats=10)
    model_dir = bench_small_dir()
    cfg = load_hf_config(model_dir)
    specs = adapter_specs(list(ADAPTER_RANKS), ADAPTERS_PER_RANK)
    paths = make_peft_adapters(model_dir, specs, bench_cache_root() / "bench-small-adapters", seed=0)
    if ray.is_initialized():
        raise RuntimeError("this process already joined Ray; the benchmark starts its own local instance")
    # NOTE: address="local" always starts a private instance (a bare ray.init() would join a cluster
    # someone else started on this machine, where num_cpus is refused). Worker output stays in Ray's
    # session logs: forwarded, a worker's stdout would land in the JSON on this process's stdout.
    ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    modes, where = {}, {}
    try:
        with tempfile.TemporaryDirectory(prefix="coserve-bench-cluster-") as tmp:
            workdir = Path(tmp)
            profile_path = workdir / "latency_profile.json"
            ctx = BenchContext(model_dir, paths, random_rows(cfg.vocab_size, 64, FINETUNE_SEQ_LEN, seed=0), str(dev),
                               str(profile_path))
            burst, rate, trace, alone, alone_extra, where["inference_only"] = _inference_alone(
                ctx, setting, cfg.vocab_size, workdir, use_gpu, cores)
            slo = slo_from_baseline(alone.timings)
            window = window_for(setting, slo, trace)
            tpot_slo_ms = coserving_tpot_slo_ms(setting, slo)
            progress(f"SLO: TTFT {slo.ttft_s * 1e3:.0f} ms, TPOT {slo.tpot_s * 1e3:.0f} ms; window {window:.1f} s")

            coserve, extra, where["coserving"] = _shared_mode(ctx, trace, window, workdir, "bench-coserving",
                                                              "coserve", use_gpu, cores, INFERENCE_BUDGET,
                                                              **coserving_slo_kwargs(setting, slo))
            modes["coserving"] = {**_mode_figures(coserve, extra, slo, window), "engine_budget": coserve.budget}
            progress(f"coserving: {modes['coserving']['slo_attainment']:.3f} SLO, "
                     f"{modes['coserving']['finetune_tokens_per_s']} finetune tokens/s")

            spatial, where["spatial"] = {}, {}
            for inference_budget, finetune_budget in spatial_budgets:
                tag = f"budget_{inference_budget}_{finetune_budget}"
                per_role = {"inference": {"max_num_batched_tokens": inference_budget},
                            "finetune": {"max_num_batched_tokens": finetune_budget}}
                result, extra, where["spatial"][tag] = _shared_mode(ctx, trace, window, workdir, f"bench-spatial-{tag}",
                                                                   "spatial", use_gpu, cores, INFERENCE_BUDGET,
                                                                   per_role)
                spatial[tag] = _mode_figures(result, extra, slo, window)
                progress(f"spatial {tag}: {spatial[tag]['slo_attainment']:.3f} SLO, "
                         f"{spatial[tag]['finetune_tokens_per_s']} finetune tokens/s")
            modes["spatial"] = swept(spatial)

            result, extra, where["finetune_only"] = _shared_mode(ctx, [], window, workdir, "bench-finetune",
                                                                 "coserve", use_gpu, cores, FINETUNE_BUDGET)
            modes["finetune_only"] = _mode_figures(result, extra, slo, window)
            modes["finetune_only"].update(slo_attainment=None, latency=None)  # no requests to score
            progress(f"finetune alone: {modes['finetune_only']['finetune_tokens_per_s']} tokens/s")

            modes["inference_only"] = _mode_figures(alone, alone_extra, slo, window)
            profile = json.loads(profile_path.read_text()) if profile_path.is_file() else None
    finally:
        ray.shutdown()
    gemm_end = gemm_gflops(dev, size=1024, repeats=10)
    achieved = coserving_gflops(cfg, specs, trace, coserve, window)
    return {
        "benchmark": "coserving", "cluster": True, "model": "bench-small", "quick": quick, "smoke": smoke,
        "machine": {**machine_info(dev), "load_average_at_start": load_at_start, "cores": cores,
                    "ray": ray.__version__, "ray_num_cpus": cores},
        "modes": modes,
        **verdict(modes, baselines=("spatial",)),
        "mfu_vs_gemm_peak": round(achieved / gemm, 3), "coserving_model_gflops": round(achieved, 1),
        "gemm_gflops": round(gemm, 1), "gemm_gflops_at_end": round(gemm_end, 1), "flop_formula": FLOP_FORMULA,
        "slo": {"ttft_ms": round(slo.ttft_s * 1e3, 1), "tpot_ms": round(slo.tpot_s * 1e3, 1),
                "rule": "TTFT <= 4 x and TPOT <= 2 x the p50 of inference alone (through the deployment) on this "
                        "trace; unfinished = miss",
                "coserving_tpot_slo_ms": round(tpot_slo_ms, 1)},
        "max_throughput": {**burst, "counts": "prompt + output tokens, all requests sent at once through the "
                                              "deployment"},
        "rate_requests_per_s": round(rate, 3),
        "trace": {"num_requests": len(trace), "duration_s": setting.trace_s, "window_s": round(window, 2),
                  "prompt_range": PROMPT_RANGE, "output_range": OUTPUT_RANGE, "adapters": specs, "seed": 0,
                  "load_fraction": LOAD_FRACTION},
        "placement": where,
        "latency_profile": profile,
        "config": {"model_dir": model_dir, "setting": asdict(setting), "inference_budget": INFERENCE_BUDGET,
                   "finetune_budget": FINETUNE_BUDGET, "spatial_budgets": list(spatial_budgets),
                   "driver_torch_threads": torch.get_num_threads(),
                   "finetune": {"adapter_rank": LORA_R, "target_modules": "all-linear", "seq_len": FINETUNE_SEQ_LEN,
                                "batch_size": FINETUNE_BATCH, "dataset": "64 random sequences"}},
        "targets": TARGETS,
        "notes": NOTES,
        "total_wall_s": round(time.perf_counter() - begin, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.coserving_cluster [--quick | --smoke] [--device D]`: print the JSON."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.coserving_cluster", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="SMOKE, one spatial setting: checks the code, figures meaningless")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    print(json.dumps(run_cluster_coserving_benchmark(args.quick, args.device, smoke=args.smoke), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
