"""The scheduler simulation: deterministic, scores like the benchmark, and shows what the headroom does."""
from dataclasses import replace

from benchmarks.scheduler_sim import SimMachine, SimSetting, alone_slo, compare, simulate, simulate_alone
from benchmarks.trace import Slo

SHORT = SimSetting(trace_s=12.0)


def test_the_same_seed_gives_the_same_run():
    assert simulate(SHORT, seed=3) == simulate(SHORT, seed=3)
    assert simulate(SHORT, seed=3) != simulate(SHORT, seed=4)


def test_a_loose_slo_is_met_by_every_request_and_finetuning_runs_beside_them():
    result = simulate(replace(SHORT, slo=Slo(ttft_s=1.5, tpot_s=0.15)), SimMachine(jitter_sd=0.0, drift_sd=0.0))
    assert result.slo_attainment == 1.0 and result.unfinished == 0
    assert result.finetune_tokens_per_s > 0


def test_an_slo_below_an_iteration_fixed_cost_is_missed():
    result = simulate(replace(SHORT, slo=Slo(ttft_s=0.476, tpot_s=0.02)))
    assert result.tpot_misses > 0 and result.slo_attainment < 0.5


def test_headroom_keeps_decodes_faster_and_costs_finetuning():
    without = [simulate(replace(SHORT, headroom=0.0), seed=s) for s in range(3)]
    with_headroom = [simulate(replace(SHORT, headroom=0.3), seed=s) for s in range(3)]
    for a, b in zip(without, with_headroom):
        assert b.tpot_p50_ms < a.tpot_p50_ms - 3.0
        assert b.finetune_tokens_per_s < a.finetune_tokens_per_s
    summary = compare(SHORT, [0.0, 0.3], seeds=2)
    assert set(summary) == {"0.0", "0.3"}
    assert summary["0.3"]["finetune_tokens_per_s_mean"] < summary["0.0"]["finetune_tokens_per_s_mean"]


def test_slow_episodes_slow_the_iterations_they_cover():
    calm = SimMachine(jitter_sd=0.0, drift_sd=0.0)
    stormy = replace(calm, episodes_per_s=2.0, episode_s=(0.5, 1.0), episode_factor=(1.5, 1.5))
    calm_run, stormy_run = simulate(SHORT, calm, seed=0), simulate(SHORT, stormy, seed=0)
    assert simulate(SHORT, stormy, seed=0) == stormy_run
    # The engine's online fit sees the slower iterations and leaves finetuning less of each; the
    # iterations still run long where an episode starts, so some requests miss.
    assert stormy_run.finetune_tokens_per_s < 0.5 * calm_run.finetune_tokens_per_s
    assert stormy_run.slo_attainment < calm_run.slo_attainment


def test_inference_alone_sets_the_slo_and_co_serving_spends_its_slack():
    timings = simulate_alone(SHORT, seed=0)
    assert timings and all(t.is_finished for t in timings)
    slo = alone_slo(SHORT, seed=0)
    alone_tpot_p50_ms = slo.tpot_s * 1e3 / 2   # the SLO is twice inference alone's median
    co_serving = simulate(replace(SHORT, slo=slo), seed=0)
    # Finetuning fills each iteration up to the engine's target, so decodes run slower than alone.
    assert alone_tpot_p50_ms < co_serving.tpot_p50_ms < 0.9 * slo.tpot_s * 1e3
    assert co_serving.finetune_tokens_per_s > 0
    assert simulate(replace(SHORT, slo=None), seed=0) == co_serving
