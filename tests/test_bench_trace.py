"""The co-serving benchmark's pure parts: trace generation and SLO accounting (no model, no torch)."""
import pytest

from benchmarks.trace import (
    RequestTiming,
    Slo,
    best_setting,
    burst_trace,
    mean_request_tokens,
    percentile,
    poisson_trace,
    slo_attainment,
    slo_from_baseline,
)

ADAPTERS = [f"a{i}" for i in range(8)]


def _trace(seed=0, rate=5.0, duration=20.0):
    return poisson_trace(rate, duration, (32, 256), (16, 64), ADAPTERS, vocab_size=1000, seed=seed)


def test_trace_is_deterministic_per_seed():
    assert _trace(seed=3) == _trace(seed=3)
    assert _trace(seed=3) != _trace(seed=4)


def test_trace_ranges_and_order():
    trace = _trace()
    arrivals = [r.arrival_s for r in trace]
    assert arrivals == sorted(arrivals) and 0 < arrivals[0] and arrivals[-1] < 20.0
    assert len({r.request_id for r in trace}) == len(trace)
    for r in trace:
        assert 32 <= len(r.prompt_token_ids) <= 256 and 16 <= r.output_len <= 64
        assert all(10 <= t < 1000 for t in r.prompt_token_ids)
        assert r.adapter in ADAPTERS
    assert len({r.adapter for r in trace}) == len(ADAPTERS)


def test_trace_rate_is_about_right():
    # 5/s for 400 s: 2000 expected arrivals, standard deviation about 45.
    n = len(poisson_trace(5.0, 400.0, (1, 1), (1, 1), ["a"], vocab_size=100, seed=1))
    assert 1850 < n < 2150


def test_burst_trace_arrives_at_once():
    burst = burst_trace(16, (32, 256), (16, 64), ADAPTERS, vocab_size=1000, seed=1)
    assert len(burst) == 16 and all(r.arrival_s == 0.0 for r in burst)
    assert burst == burst_trace(16, (32, 256), (16, 64), ADAPTERS, vocab_size=1000, seed=1)
    assert all(32 <= len(r.prompt_token_ids) <= 256 and 16 <= r.output_len <= 64 for r in burst)


def test_trace_rejects_bad_arguments():
    with pytest.raises(ValueError):
        poisson_trace(0.0, 1.0, (1, 2), (1, 2), ["a"], 100)
    with pytest.raises(ValueError):
        poisson_trace(1.0, 1.0, (1, 2), (1, 2), [], 100)


def test_mean_request_tokens():
    assert mean_request_tokens((32, 256), (16, 64)) == 144 + 40


def test_percentile_nearest_rank():
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.99) == 4.0
    assert percentile([5.0], 0.0) == 5.0


def _timing(arrival, first, finish, num_out):
    return RequestTiming(arrival=arrival, num_tokens=100, first_token=first, finish=finish, num_output_tokens=num_out)


def test_timing_latencies():
    t = _timing(1.0, 1.5, 2.5, 11)
    assert t.ttft == pytest.approx(0.5) and t.tpot == pytest.approx(0.1)
    assert _timing(1.0, 1.5, 1.5, 1).tpot == 0.0
    unfinished = RequestTiming(arrival=1.0, num_tokens=10, first_token=1.2)
    assert unfinished.tpot is None and not unfinished.is_finished


def test_slo_from_baseline_uses_p50_of_finished():
    timings = [_timing(0.0, ttft, ttft + 0.1 * 10, 11) for ttft in (0.1, 0.2, 0.3)]
    timings.append(RequestTiming(arrival=0.0, num_tokens=10))  # unfinished: ignored
    slo = slo_from_baseline(timings)
    assert slo.ttft_s == pytest.approx(0.8) and slo.tpot_s == pytest.approx(0.2)
    with pytest.raises(ValueError):
        slo_from_baseline([RequestTiming(arrival=0.0, num_tokens=10)])


def test_slo_attainment_counts_unfinished_as_misses():
    slo = Slo(ttft_s=1.0, tpot_s=0.1)
    timings = [
        _timing(0.0, 0.5, 1.5, 11),              # meets both
        _timing(0.0, 1.5, 2.5, 11),              # TTFT too long
        _timing(0.0, 0.5, 3.5, 11),              # TPOT too long
        RequestTiming(arrival=0.0, num_tokens=10, first_token=0.2),  # never finished
    ]
    assert slo_attainment(timings, slo) == 0.25
    assert slo_attainment([], slo) == 1.0


def test_slo_latest_finish():
    trace = _trace()
    slo = Slo(ttft_s=1.0, tpot_s=0.1)
    r = trace[0]
    assert slo.latest_finish(r) == pytest.approx(r.arrival_s + 1.0 + 0.1 * (r.output_len - 1))


def test_best_setting_picks_fastest_meeting_the_slo():
    settings = {
        "k16": {"slo_attainment": 1.0, "finetune_tokens_per_s": 10.0},
        "k64": {"slo_attainment": 0.99, "finetune_tokens_per_s": 30.0},
        "k256": {"slo_attainment": 0.95, "finetune_tokens_per_s": 90.0},
    }
    assert best_setting(settings) == "k64"
    assert best_setting({"k256": settings["k256"]}) is None
    assert best_setting(settings, min_attainment=0.9) == "k256"
