"""The co-serving benchmark's inference trace and its SLO accounting, in pure Python (no torch).

`poisson_trace` draws seeded requests with exponential inter-arrival gaps;
`RequestTiming` records when each request arrived, got its first token and
finished; `slo_from_baseline` turns the p50 latencies of inference alone into
TTFT/TPOT limits and `slo_attainment` scores a run against them (requests that
did not finish in the window miss). `best_setting` picks a swept baseline's
figure: its best finetuning throughput among settings that meet the SLO.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

MIN_TOKEN_ID = 10
"""Random prompt ids are drawn from [MIN_TOKEN_ID, vocab): clear of the special tokens."""
MIN_ATTAINMENT = 0.99
"""A setting meets the SLO when at least this share of its requests does."""


@dataclass(frozen=True)
class TraceRequest:
    request_id: str
    arrival_s: float
    """Seconds after the start of the run."""
    prompt_token_ids: list[int]
    output_len: int
    adapter: str | None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + self.output_len


def poisson_trace(rate: float, duration_s: float, prompt_range: tuple[int, int], output_range: tuple[int, int],
                  adapters: list[str], vocab_size: int, seed: int = 0) -> list[TraceRequest]:
    """Requests arriving as a Poisson process of `rate` per second during [0, duration_s).

    Lengths are uniform in the inclusive ranges, adapters uniform over `adapters`,
    token ids uniform in [MIN_TOKEN_ID, vocab_size). The same arguments give the same trace.
    """
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate and duration_s must be positive, got {rate!r} and {duration_s!r}")
    if not adapters:
        raise ValueError("give at least one adapter name")
    rng = random.Random(seed)
    trace: list[TraceRequest] = []
    now = rng.expovariate(rate)
    while now < duration_s:
        trace.append(_draw_request(rng, len(trace), now, prompt_range, output_range, adapters, vocab_size))
        now += rng.expovariate(rate)
    return trace


def burst_trace(num_requests: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
                adapters: list[str], vocab_size: int, seed: int = 0) -> list[TraceRequest]:
    """`num_requests` requests all arriving at 0, drawn like `poisson_trace`'s."""
    if not adapters:
        raise ValueError("give at least one adapter name")
    rng = random.Random(seed)
    return [_draw_request(rng, i, 0.0, prompt_range, output_range, adapters, vocab_size) for i in range(num_requests)]


def _draw_request(rng: random.Random, index: int, arrival_s: float, prompt_range: tuple[int, int],
                  output_range: tuple[int, int], adapters: list[str], vocab_size: int) -> TraceRequest:
    prompt = [rng.randrange(MIN_TOKEN_ID, vocab_size) for _ in range(rng.randint(*prompt_range))]
    return TraceRequest(f"trace-{index}", arrival_s, prompt, rng.randint(*output_range), rng.choice(adapters))


def mean_request_tokens(prompt_range: tuple[int, int], output_range: tuple[int, int]) -> float:
    """Expected prompt + output tokens of one request with lengths uniform in the inclusive ranges."""
    return (sum(prompt_range) + sum(output_range)) / 2


@dataclass
class RequestTiming:
    """One request's life in a run, in seconds on one clock (the trace's arrival, not the engine's)."""

    arrival: float
    num_tokens: int
    """Prompt plus output tokens, credited to inference throughput if the request finished."""
    first_token: float | None = None
    finish: float | None = None
    num_output_tokens: int = 0

    @property
    def is_finished(self) -> bool:
        return self.finish is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; 0 for a one-token output."""
        if self.finish is None or self.first_token is None:
            return None
        if self.num_output_tokens <= 1:
            return 0.0
        return (self.finish - self.first_token) / (self.num_output_tokens - 1)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]) of a non-empty list."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q * len(ordered)))) - 1]


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float

    def is_met(self, timing: RequestTiming) -> bool:
        return timing.is_finished and timing.ttft <= self.ttft_s and timing.tpot <= self.tpot_s

    def latest_finish(self, request: TraceRequest) -> float:
        """Seconds after the run's start by which `request` finishes if it just meets the SLO."""
        return request.arrival_s + self.ttft_s + (request.output_len - 1) * self.tpot_s


def slo_from_baseline(timings: list[RequestTiming], ttft_factor: float = 4.0, tpot_factor: float = 2.0) -> Slo:
    """SLO limits as multiples of the p50 TTFT and p50 TPOT of the finished requests of a baseline run."""
    finished = [t for t in timings if t.is_finished]
    if not finished:
        raise ValueError("the baseline run finished no request: no latency to derive an SLO from")
    return Slo(ttft_s=ttft_factor * percentile([t.ttft for t in finished], 0.5),
               tpot_s=tpot_factor * percentile([t.tpot for t in finished], 0.5))


def slo_attainment(timings: list[RequestTiming], slo: Slo) -> float:
    """Share of all requests (unfinished ones included, as misses) that meet both limits."""
    if not timings:
        return 1.0
    return sum(slo.is_met(t) for t in timings) / len(timings)


def latency_summary(timings: list[RequestTiming]) -> dict:
    """p50/p99 TTFT and TPOT of finished requests, in milliseconds, and how many finished."""
    finished = [t for t in timings if t.is_finished]
    summary = {"num_requests": len(timings), "num_finished": len(finished)}
    for name in ("ttft", "tpot"):
        values = [getattr(t, name) for t in finished]
        for q in (0.5, 0.99):
            summary[f"{name}_p{round(q * 100)}_ms"] = round(1e3 * percentile(values, q), 2) if values else None
    return summary


def best_setting(settings: dict[str, dict], min_attainment: float = MIN_ATTAINMENT) -> str | None:
    """Name of the setting with the highest finetune_tokens_per_s among those whose
    slo_attainment is at least `min_attainment`; None when no setting meets the SLO."""
    meeting = {name: s for name, s in settings.items() if s["slo_attainment"] >= min_attainment}
    if not meeting:
        return None
    return max(meeting, key=lambda name: meeting[name]["finetune_tokens_per_s"])
