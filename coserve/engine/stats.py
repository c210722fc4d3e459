"""Counters and latency percentiles the engine keeps for `stats()` and, later, /metrics.

Updated once per iteration and once per finished request; `snapshot()` turns
them into a plain dict. Latencies are kept in bounded windows so a long-running
server does not grow without limit.
"""
from __future__ import annotations

from collections import deque

from coserve.engine.outputs import SchedulerOutput
from coserve.engine.request import Request

_WINDOW = 4096


def _percentiles(values) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


class EngineStats:
    def __init__(self) -> None:
        self.num_iterations = 0
        self.tokens_by_kind = {"decode": 0, "prefill": 0}
        self.num_finished = 0
        self.finish_reasons: dict[str, int] = {}
        self.busy_seconds = 0.0
        self.iteration_tokens: deque[int] = deque(maxlen=_WINDOW)
        self.ttft: deque[float] = deque(maxlen=_WINDOW)
        self.tpot: deque[float] = deque(maxlen=_WINDOW)

    def record_iteration(self, scheduler_output: SchedulerOutput, seconds: float) -> None:
        self.num_iterations += 1
        self.busy_seconds += seconds
        for seq in scheduler_output.sequences:
            kind = "decode" if seq.num_tokens == 1 and seq.start_position > 0 else "prefill"
            self.tokens_by_kind[kind] += seq.num_tokens
        self.iteration_tokens.append(scheduler_output.num_scheduled_tokens)

    def record_finished(self, request: Request) -> None:
        self.num_finished += 1
        reason = request.finish_reason or "unknown"
        self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + 1
        if request.first_token_time is not None:
            self.ttft.append(request.first_token_time - request.arrival_time)
            if request.finish_time is not None and request.num_output_tokens > 1:
                self.tpot.append((request.finish_time - request.first_token_time) / (request.num_output_tokens - 1))

    def snapshot(self, scheduler, block_manager) -> dict:
        return {
            "num_iterations": self.num_iterations,
            "tokens_by_kind": dict(self.tokens_by_kind),
            "mean_tokens_per_iteration": (sum(self.iteration_tokens) / len(self.iteration_tokens)
                                          if self.iteration_tokens else 0.0),
            "num_finished": self.num_finished,
            "finish_reasons": dict(self.finish_reasons),
            "ttft_s": _percentiles(self.ttft),
            "tpot_s": _percentiles(self.tpot),
            "num_running": scheduler.num_running,
            "num_waiting": scheduler.num_waiting,
            "kv_cache_usage": block_manager.usage,
            "busy_seconds": self.busy_seconds,
        }
