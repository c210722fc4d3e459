"""The cluster co-serving benchmark's replay and per-request timing, on fake outputs (no Ray, no model)."""
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from benchmarks.coserving_cluster import replay, replay_summary, request_timings
from benchmarks.trace import Slo, TraceRequest, slo_attainment


class FakeClock:
    """A clock that moves only when the replay sleeps."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


def _request(index: int, arrival: float, output_len: int = 5) -> TraceRequest:
    return TraceRequest(f"trace-{index}", arrival, [11, 12, 13], output_len, "a0")


def _output(sent: float, ttft: float, tpot: float, n: int, reason: str = "length"):
    first = sent + ttft
    return SimpleNamespace(finish_reason=reason, token_ids=list(range(n)),
                           metrics={"arrival_time": sent + 0.001, "first_token_time": first,
                                    "finish_time": first + tpot * (n - 1)})


def _done(value=None, error: BaseException | None = None) -> Future:
    future: Future = Future()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
    return future


def test_replay_sends_on_time_and_times_from_the_send():
    clock = FakeClock()
    trace = [_request(0, 0.0), _request(1, 0.25), _request(2, 0.5), _request(3, 5.0)]
    behaviour = {"trace-0": (0.1, 0.02, "length"), "trace-1": (0.1, 0.02, "abort"), "trace-2": (0.2, 1.0, "length")}

    def send(request):
        if request.request_id == "trace-3":
            raise AssertionError("a request arriving after the window must not be sent")
        ttft, tpot, reason = behaviour[request.request_id]
        return _done(_output(clock.now, ttft, tpot, request.output_len, reason))

    rep = replay(trace, 2.0, send, clock=clock, sleep=clock.sleep)
    assert rep.sent == {"trace-0": 100.0, "trace-1": 100.25, "trace-2": 100.5}
    assert rep.wall_s == pytest.approx(2.0)   # the window lasts its length while finetuning runs
    timings = request_timings(trace, rep)
    assert timings[0].ttft == pytest.approx(0.1) and timings[0].tpot == pytest.approx(0.02)
    assert timings[0].num_output_tokens == 5
    assert not timings[1].is_finished and timings[1].ttft == pytest.approx(0.1)   # aborted: first token only
    # trace-2 finishes at 0.5 + 0.2 + 4 s, after the window's end: unfinished, its first token counted.
    assert not timings[2].is_finished and timings[2].first_token == pytest.approx(0.7)
    assert not timings[3].is_finished and timings[3].first_token is None
    assert slo_attainment(timings, Slo(ttft_s=0.5, tpot_s=0.05)) == pytest.approx(0.25)
    summary = replay_summary(trace, rep)
    assert summary["num_sent"] == 3 and summary["num_answered"] == 3 and summary["num_errors"] == 0
    assert summary["send_lag_ms"]["max"] == pytest.approx(0.0) and summary["dispatch_ms"]["p50"] == pytest.approx(1.0)


def test_unanswered_and_failed_requests_miss():
    clock = FakeClock()
    trace = [_request(0, 0.0), _request(1, 0.0)]
    never: Future = Future()
    futures = {"trace-0": never, "trace-1": _done(error=RuntimeError("worker lost"))}
    rep = replay(trace, 0.05, lambda r: futures[r.request_id], clock=clock, sleep=clock.sleep)
    assert rep.outputs == {} and rep.errors == {"trace-1": "RuntimeError: worker lost"}
    assert rep.unanswered() == [never]
    assert [t.is_finished for t in request_timings(trace, rep)] == [False, False]


def test_drained_replay_ends_with_the_last_answer():
    clock = FakeClock()
    trace = [_request(0, 0.0), _request(1, 0.5)]
    rep = replay(trace, 600.0, lambda r: _done(_output(clock.now, 0.1, 0.01, r.output_len)), stop_when_drained=True,
                 clock=clock, sleep=clock.sleep)
    assert rep.wall_s == pytest.approx(0.5) and len(rep.outputs) == 2


def test_a_worker_on_another_clock_fails_loudly():
    clock = FakeClock()
    trace = [_request(0, 0.0)]
    wall_clock_output = _output(1.7e9, 0.1, 0.01, 5)   # time.time() stamps against a monotonic driver
    rep = replay(trace, 1.0, lambda r: _done(wall_clock_output), clock=clock, sleep=clock.sleep)
    with pytest.raises(RuntimeError, match="clock"):
        request_timings(trace, rep)
