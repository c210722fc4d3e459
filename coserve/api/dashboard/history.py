"""Dashboard history: per-second samples derived from the backend's cumulative stats.

Engines count tokens by kind, iterations and busy seconds cumulatively and keep
latency percentiles over recent requests; they keep no time series. A sample
is the difference of two reads divided by the time between them (rates), plus
the gauges read at that moment (queues, KV use, percentiles). With several
engines the rates and queues are summed and the gauges take the worst engine,
so a chart never hides one overloaded worker behind an average.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

from coserve.engine.cost_model import DEFAULT_BACKWARD_TOKEN_RATIO
from coserve.finetune.job import TERMINAL_STATUSES

SAMPLE_PERIOD_S = 1.0
HISTORY_SECONDS = 15 * 60
TOKEN_KINDS = ("decode", "prefill", "finetune_forward", "finetune_backward")
MAX_LOSS_POINTS = 400   # a loss curve is drawn a few hundred pixels wide: more points only cost bytes


@dataclass
class _Counters:
    time: float
    num_iterations: int
    tokens: dict
    busy_seconds: float


class History:
    """Ring buffer of samples plus the latest full stats; fed by one sampler, read by any request."""

    def __init__(self, max_samples: int = int(HISTORY_SECONDS / SAMPLE_PERIOD_S)) -> None:
        self.samples: deque[dict] = deque(maxlen=max_samples)
        self.latest: dict | None = None     # the last backend.stats() that succeeded
        self.sampled_at: float | None = None
        self.error: str | None = None       # why the last read failed; None once one succeeds again
        self.started_at: float | None = None
        self._previous: dict[str, _Counters] = {}
        self._ended: dict[str, dict] = {}   # job id -> its last state, once it reached a terminal status

    def record_error(self, message: str) -> None:
        self.error = message

    def add(self, stats: dict, now: float | None = None) -> dict:
        """Fold one `backend.stats()` read into a sample and keep it; returns the sample."""
        now = time.time() if now is None else now
        engines = stats.get("engines") or {}
        rates = dict.fromkeys(TOKEN_KINDS, 0.0)
        per_iteration = dict.fromkeys(TOKEN_KINDS, 0)
        num_iterations = 0
        seconds = busy = 0.0
        has_rates = False
        current = {}
        for name, engine in engines.items():
            counters = _Counters(now, int(engine.get("num_iterations", 0)),
                                 {k: int((engine.get("tokens_by_kind") or {}).get(k, 0)) for k in TOKEN_KINDS},
                                 float(engine.get("busy_seconds", 0.0)))
            current[name] = counters
            before = self._previous.get(name)
            # NOTE: counters that went down mean a restarted worker: its first read only primes.
            if before is None or counters.num_iterations < before.num_iterations or now <= before.time:
                continue
            dt = now - before.time
            has_rates = True
            seconds = max(seconds, dt)
            num_iterations += counters.num_iterations - before.num_iterations
            busy = max(busy, (counters.busy_seconds - before.busy_seconds) / dt)
            for kind in TOKEN_KINDS:
                delta = max(0, counters.tokens[kind] - before.tokens[kind])
                rates[kind] += delta / dt
                per_iteration[kind] += delta
        self._previous = current
        sample = {
            "t": now,
            "tokens_per_s": rates if has_rates else None,
            "iterations_per_s": num_iterations / seconds if has_rates and seconds else None,
            "tokens_per_iteration": ({k: v / num_iterations for k, v in per_iteration.items()}
                                     if num_iterations else None),
            "busy": min(1.0, busy) if has_rates else None,
            "ttft_ms": _worst_percentiles(engines.values(), "ttft_s"),
            "tpot_ms": _worst_percentiles(engines.values(), "tpot_s"),
            "running": sum(int(e.get("num_running", 0)) for e in engines.values()),
            "waiting": sum(int(e.get("num_waiting", 0)) for e in engines.values()),
            "kv_usage": max((float(e.get("kv_cache_usage", 0.0)) for e in engines.values()), default=None),
        }
        self.samples.append(sample)
        self.latest = {**stats, "jobs": [self._final(job) for job in stats.get("jobs") or []]}
        self.sampled_at = now
        self.error = None
        if self.started_at is None:
            self.started_at = now
        return sample

    def update_job(self, job: dict) -> None:
        """Put one job's fresh state (e.g. just cancelled) into the latest stats before the next read."""
        if self.latest is None:
            return
        fresh = self._final(job)
        jobs = [({**old, **fresh} if old.get("job_id") == fresh.get("job_id") else old)
                for old in self.latest.get("jobs") or []]
        self.latest = {**self.latest, "jobs": jobs}

    def _final(self, job: dict) -> dict:
        # NOTE: a terminal status is final. A read that started before a cancel can still report the job
        # running; without this the page would flip it back to "running" for a second.
        job_id = job.get("job_id")
        if job.get("status") in TERMINAL_STATUSES:
            self._ended[job_id] = job
            return job
        return self._ended.get(job_id, job)

    def since(self, t: float | None) -> list[dict]:
        if t is None:
            return list(self.samples)
        return [s for s in self.samples if s["t"] > t]


def _worst_percentiles(engines, key: str) -> dict:
    out = {"p50": None, "p99": None}
    for engine in engines:
        values = engine.get(key) or {}
        for q in out:
            v = values.get(q)
            if v is not None and (out[q] is None or 1e3 * v > out[q]):
                out[q] = 1e3 * v
    return out


def build_snapshot(history: History, settings, backend_kind: str, since: float | None) -> dict:
    """The JSON the page renders: server facts, new samples, and the latest engines/workers/jobs."""
    now = time.time()
    latest = history.latest or {}
    snapshot = {
        "server": {"model_id": getattr(settings, "model_id", None), "backend": backend_kind,
                   "auth": bool(getattr(settings, "api_key", None))},
        "now": now,
        "sample_period_s": SAMPLE_PERIOD_S,
        "history_seconds": HISTORY_SECONDS,
        "history_started_at": history.started_at,
        "sampled_at": history.sampled_at,
        "error": history.error,
        "history": history.since(since),
        "engines": {name: _engine_view(stats) for name, stats in (latest.get("engines") or {}).items()},
        "workers": latest.get("workers") or [],
        "jobs": [_job_view(job) for job in latest.get("jobs") or []],
    }
    return jsonable(snapshot)


def _engine_view(stats: dict) -> dict:
    keep = ("num_iterations", "num_finished", "num_shared_iterations", "tokens_by_kind", "finish_reasons",
            "mean_tokens_per_iteration", "mean_tokens_per_iteration_by_kind", "ttft_s", "tpot_s",
            "iteration_seconds", "num_running", "num_waiting", "kv_cache_usage", "busy_seconds", "budget",
            "adapters")
    view = {k: stats.get(k) for k in keep}
    finetune = stats.get("finetune") or {}
    view["finetune"] = {k: finetune.get(k) for k in ("num_sequences_in_flight", "held_bytes")}
    view["latency_profile"] = _profile_view(stats.get("latency_profile"), stats.get("budget") or {})
    return view


def _profile_view(profile: dict | None, budget: dict) -> dict | None:
    """The profile's coefficients and measured points. Backward windows were timed at a sequence's
    start (`backward`) and at the end of one `late_sequence_length`-token sequence (`late_backward`),
    where every window token also attends to the keys before it (`backward_per_key`)."""
    keys = ("forward_base", "forward_per_token", "backward_base", "backward_per_token")
    if profile is not None:
        points = profile.get("points") or {}
        late = points.get("late_backward") or {}
        return {**{k: profile.get(k) for k in keys}, "backward_per_key": profile.get("backward_per_key", 0.0),
                "unit": profile.get("unit", "s"), "late_sequence_length": late.get("sequence_length"),
                "points": {"forward": points.get("forward") or [], "backward": points.get("backward") or [],
                           "late_backward": late.get("points") or []}}
    if budget.get("unit") == "tokens":
        # NOTE: without an SLO the engine budgets in token units (CostModel.token_units): the "latency" of
        # an iteration is its token count, a backward token weighing DEFAULT_BACKWARD_TOKEN_RATIO.
        return {"forward_base": 0.0, "forward_per_token": 1.0, "backward_base": 0.0,
                "backward_per_token": DEFAULT_BACKWARD_TOKEN_RATIO, "backward_per_key": 0.0, "unit": "tokens",
                "late_sequence_length": None, "points": {"forward": [], "backward": [], "late_backward": []}}
    return None


def _job_view(job: dict) -> dict:
    losses = list(job.get("losses") or [])
    steps = list(range(1, len(losses) + 1))
    if len(losses) > MAX_LOSS_POINTS:
        stride = len(losses) / MAX_LOSS_POINTS
        picked = sorted({int(i * stride) for i in range(MAX_LOSS_POINTS)} | {len(losses) - 1})
        steps = [i + 1 for i in picked]
        losses = [losses[i] for i in picked]
    keep = ("job_id", "adapter", "status", "error", "step", "max_steps", "last_loss", "tokens_trained",
            "worker", "created_at", "started_at", "finished_at", "output_dir")
    return {**{k: job.get(k) for k in keep}, "loss_steps": steps, "losses": losses,
            "num_checkpoints": len(job.get("checkpoints") or [])}


def jsonable(value):
    """Plain JSON: non-finite floats become null (JSON.parse rejects NaN), unknown objects their str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset, deque)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):   # numpy / torch scalars
        try:
            return jsonable(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)
