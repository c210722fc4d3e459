"""The co-serving benchmark's per-mode figures from a hand-made window result (no engine)."""
from benchmarks.coserving import WindowResult, figures
from benchmarks.trace import RequestTiming, Slo


def _result(step_seconds, wall_s=10.0):
    timings = [RequestTiming(arrival=0.0, num_tokens=100, first_token=0.2, finish=1.2, num_output_tokens=11),
               RequestTiming(arrival=1.0, num_tokens=50, first_token=1.9, finish=3.0, num_output_tokens=11)]
    return WindowResult(timings=timings, wall_s=wall_s, finetune_tokens=400, sequence_tokens=256,
                        tokens_by_kind={"decode": 20}, num_iterations=len(step_seconds), step_seconds=step_seconds)


def test_figures_rates_attainment_and_busy_share():
    # Request 1: TTFT 0.2 s, TPOT 0.1 s (meets); request 2: TTFT 0.9 s (misses a 0.5 s TTFT SLO).
    out = figures(_result([0.05] * 120), Slo(ttft_s=0.5, tpot_s=0.15), window_s=8.0)
    assert out["slo_attainment"] == 0.5
    assert out["inference_tokens_per_s"] == 15.0 and out["finetune_tokens_per_s"] == 40.0
    assert out["busy_share"] == 0.6            # 120 steps of 50 ms in a 10 s wall (longer than the window)


def test_busy_share_is_over_the_window_when_the_run_was_shorter():
    out = figures(_result([0.5] * 4, wall_s=2.0), Slo(ttft_s=1.0, tpot_s=1.0), window_s=8.0)
    assert out["busy_share"] == 0.25 and out["finetune_tokens_per_s"] == 50.0


def test_a_window_reports_the_machine_speed_measured_before_it():
    from dataclasses import replace

    assert figures(_result([0.05]), Slo(1.0, 1.0), window_s=8.0)["gemm_gflops_before"] is None
    probed = replace(_result([0.05]), gemm_gflops_before=183.456)
    assert figures(probed, Slo(1.0, 1.0), window_s=8.0)["gemm_gflops_before"] == 183.5
