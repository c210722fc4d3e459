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
        self.tokens_by_kind = {"decode": 0, "prefill": 0, "finetune_forward": 0, "finetune_backward": 0}
        self.iteration_seconds: deque[float] = deque(maxlen=_WINDOW)
        self.iteration_kinds: deque[dict] = deque(maxlen=256)   # tokens by kind of recent iterations
        self.num_shared_iterations = 0   # iterations holding both inference and finetuning work
        self.num_finished = 0
        self.finish_reasons: dict[str, int] = {}
        self.busy_seconds = 0.0
        self.iteration_tokens: deque[int] = deque(maxlen=_WINDOW)
        self.ttft: deque[float] = deque(maxlen=_WINDOW)
        self.tpot: deque[float] = deque(maxlen=_WINDOW)

    def record_iteration(self, scheduler_output: SchedulerOutput, seconds: float) -> None:
        self.num_iterations += 1
        self.busy_seconds += seconds
        kinds = dict.fromkeys(self.tokens_by_kind, 0)
        for seq in scheduler_output.sequences:
            if seq.is_training:
                kind = "finetune_forward"
            else:
                kind = "decode" if seq.num_tokens == 1 and seq.start_position > 0 else "prefill"
            kinds[kind] += seq.num_tokens
        # A layer window's tokens count once, when the piece reaching the first layer runs.
        kinds["finetune_backward"] += sum(w.num_tokens for w in scheduler_output.backward_windows
                                          if w.finishes_window)
        for kind, count in kinds.items():
            self.tokens_by_kind[kind] += count
        if (kinds["decode"] or kinds["prefill"]) and (kinds["finetune_forward"] or kinds["finetune_backward"]):
            self.num_shared_iterations += 1
        self.iteration_tokens.append(scheduler_output.num_scheduled_tokens)
        self.iteration_seconds.append(seconds)
        self.iteration_kinds.append(kinds)

    def record_finished(self, request: Request) -> None:
        self.num_finished += 1
        reason = request.finish_reason or "unknown"
        self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + 1
        if request.first_token_time is not None:
            self.ttft.append(request.first_token_time - request.arrival_time)
            if request.finish_time is not None and request.num_output_tokens > 1:
                self.tpot.append((request.finish_time - request.first_token_time) / (request.num_output_tokens - 1))

    def _mean_by_kind(self) -> dict:
        if not self.iteration_kinds:
            return dict.fromkeys(self.tokens_by_kind, 0.0)
        return {kind: sum(it[kind] for it in self.iteration_kinds) / len(self.iteration_kinds)
                for kind in self.tokens_by_kind}

    def snapshot(self, scheduler, block_manager) -> dict:
        return {
            "num_iterations": self.num_iterations,
            "tokens_by_kind": dict(self.tokens_by_kind),
            "num_shared_iterations": self.num_shared_iterations,
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
            "iteration_seconds": _percentiles(self.iteration_seconds),
            "mean_tokens_per_iteration_by_kind": self._mean_by_kind(),
        }
