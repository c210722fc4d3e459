"""Finetuning in the scheduler, with no model: budget sharing, ordering, blocks, fairness, turns.

Iterations are simulated with plain runner outputs (a sampled token for every
inference sequence that asks for one); the checks are on the plans alone.
"""
import random
import time

import pytest

from coserve.config import SchedulerConfig
from coserve.engine.cost_model import CostModel, IterationShape
from coserve.engine.finetune_planner import FinetunePlanner
from coserve.engine.kv_cache import BlockManager
from coserve.engine.outputs import RunnerOutput
from coserve.engine.request import Request
from coserve.engine.scheduler import Scheduler
from coserve.engine.training_sequence import TrainingSequence
from coserve.sampling_params import SamplingParams


def make(budget=64, num_blocks=200, block_size=4, sharing="coserve", turn=32, max_loras=8, kv_fraction=0.5,
         min_tokens=4, starvation=256, ttft_slo_ms=None, every=1, headroom=0.0):
    config = SchedulerConfig(max_num_batched_tokens=budget, max_loras=max_loras, sharing=sharing,
                             temporal_turn_tokens=turn, temporal_turn_every=every, finetune_kv_fraction=kv_fraction,
                             min_finetune_tokens=min_tokens, finetune_starvation_iterations=starvation,
                             ttft_slo_ms=ttft_slo_ms, finetune_slo_headroom=headroom)
    return Scheduler(config, BlockManager(num_blocks, block_size))


def add_job(scheduler, job_id="job", lengths=(40, 30), adapter="train", in_flight=2):
    scheduler.finetune.add_job(job_id, adapter, in_flight)
    seqs = [TrainingSequence(f"{job_id}/{i}", job_id, adapter, list(range(1, n + 1))) for i, n in enumerate(lengths)]
    scheduler.finetune.add_sequences(job_id, seqs)
    return seqs


def run(scheduler, iterations=1000):
    """Step until idle; returns the outputs."""
    outputs = []
    for _ in range(iterations):
        if not scheduler.has_unfinished_requests():
            break
        out = scheduler.schedule()
        result = RunnerOutput(sampled_token_ids={s.request_id: 7 for s in out.sequences if s.needs_sample})
        scheduler.update(out, result)
        outputs.append(out)
    return outputs


def inference_tokens(out):
    return sum(s.num_tokens for s in out.sequences if not s.is_training)


def test_forward_chunks_then_reverse_windows_cover_each_token_once():
    scheduler = make(budget=16)
    seqs = add_job(scheduler, lengths=(40, 30))
    forward = {s.seq_id: [] for s in seqs}
    backward = {s.seq_id: [] for s in seqs}
    for out in run(scheduler):
        for chunk in out.sequences:
            forward[chunk.request_id].append((chunk.start_position, chunk.context_len))
        for w in out.backward_windows:
            assert sum(e - s for s, e in forward[w.seq_id]) == len(seqs[int(w.seq_id[-1])].token_ids), \
                "backward before the forward was complete"
            backward[w.seq_id].append((w.start, w.end))
    for seq in seqs:
        spans = forward[seq.seq_id]
        assert spans[0][0] == 0 and spans[-1][1] == seq.length
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))        # contiguous, in order
        windows = backward[seq.seq_id]
        assert windows[0][1] == seq.length and windows[-1][0] == 0
        assert all(a[0] == b[1] for a, b in zip(windows, windows[1:]))    # reverse order, no gap
    assert sorted(s.seq_id for s in scheduler.finetune.pop_completed()) == ["job/0", "job/1"]
    assert scheduler.block_manager.usage == 0                              # every block returned


def test_inference_comes_first_and_the_cost_limit_holds():
    # Seconds: 10 ms per iteration + 1 ms per forward token; a backward window 5 ms + 2 ms per token.
    cost = CostModel(0.010, 0.001, 0.005, 0.002)
    scheduler = make(budget=64)
    scheduler.set_budget(cost, 0.050)                 # 50 ms SLO: 40 forward tokens at most
    assert scheduler.inference_token_budget == 64     # prompts alone are never cut by the SLO
    add_job(scheduler, lengths=(60, 60))
    for i in range(6):
        scheduler.add_request(Request(f"r{i}", list(range(1, 9)), SamplingParams(max_tokens=6)))
    outs = run(scheduler)
    assert any(inference_tokens(o) and any(s.is_training for s in o.sequences) for o in outs)
    for out in outs:
        forward = sum(s.num_tokens for s in out.sequences)
        predicted = cost.predict(IterationShape.of(out))
        finetune = forward - inference_tokens(out) + sum(w.num_tokens for w in out.backward_windows)
        if finetune and inference_tokens(out):
            assert predicted <= 0.050 + 1e-12      # finetuning only fills what the SLO leaves
    # A burst of prompts over the SLO budget leaves finetuning nothing.
    first = outs[0]
    assert inference_tokens(first) == 48 and not any(s.is_training for s in first.sequences)


def _with_four_decodes(scheduler):
    for i in range(4):
        scheduler.add_request(Request(f"d{i}", list(range(1, 9)), SamplingParams(max_tokens=20, ignore_eos=True)))
    first = scheduler.schedule()
    assert inference_tokens(first) == 32               # no decodes yet: prompts are not cut
    scheduler.update(first, RunnerOutput(sampled_token_ids={f"d{i}": 7 for i in range(4)}))


def test_with_an_slo_a_prefill_beside_decodes_is_cut_to_the_limit():
    # 10 ms per iteration + 1 ms per forward token: a 50 ms SLO holds 40 tokens.
    cost = CostModel(0.010, 0.001, 0.005, 0.002)
    scheduler = make(budget=256)
    scheduler.set_budget(cost, 0.050)
    _with_four_decodes(scheduler)
    scheduler.add_request(Request("long", list(range(1, 201)), SamplingParams(max_tokens=4)))
    chunks = []
    while scheduler.get_request("long").num_computed_tokens < 200:
        out = scheduler.schedule()
        decodes = [s for s in out.sequences if s.num_tokens == 1]
        assert len(decodes) == 4                       # every decode runs in every iteration
        chunks += [s.num_tokens for s in out.sequences if s.request_id == "long"]
        assert cost.predict(IterationShape.of(out)) <= 0.050 + 1e-12
        scheduler.update(out, RunnerOutput(sampled_token_ids={s.request_id: 7 for s in out.sequences
                                                              if s.needs_sample}))
    # 50 ms - 10 ms - 4 decodes - one adapter's worth of slack (none here): 36 prompt tokens a time
    # (35 when the microseconds since the decodes' first token already count against them).
    assert all(35 <= n <= 36 for n in chunks[:5]) and sum(chunks) == 200
    # A decode behind its SLO (its tokens so far took 0.5 s) shrinks the chunk to the floor.
    scheduler.get_request("d0").first_token_time -= 0.5
    scheduler.add_request(Request("behind", list(range(1, 101)), SamplingParams(max_tokens=4)))
    out = scheduler.schedule()
    assert [s.num_tokens for s in out.sequences if s.request_id == "behind"] == [32]
    scheduler.update(out, RunnerOutput(sampled_token_ids={s.request_id: 7 for s in out.sequences
                                                          if s.needs_sample}))
    scheduler.get_request("d0").first_token_time += 0.5
    # The floor: under a limit the decodes alone fill, the prompt still moves by min_prefill_chunk.
    scheduler.set_budget(cost, 0.012)
    out = scheduler.schedule()
    assert [s.num_tokens for s in out.sequences if s.request_id == "behind"] == [32]


def test_a_prompt_behind_its_ttft_slo_gets_the_chunk_it_needs():
    cost = CostModel(0.010, 0.001, 0.005, 0.002)
    scheduler = make(budget=256, ttft_slo_ms=450)
    scheduler.set_budget(cost, 0.050)
    _with_four_decodes(scheduler)

    def fresh_chunk():
        out = scheduler.schedule()
        scheduler.update(out, RunnerOutput(sampled_token_ids={s.request_id: 7 for s in out.sequences
                                                              if s.needs_sample}))
        return [s.num_tokens for s in out.sequences if s.request_id == "fresh"]

    # 200 tokens at 36 a time: 6 iterations of 50 ms (and one kept back), on time for a prompt that
    # just arrived ...
    scheduler.add_request(Request("fresh", list(range(1, 201)), SamplingParams(max_tokens=4)))
    first = fresh_chunk()
    assert first in ([35], [36])                      # 35: see the test above
    left = 200 - first[0]
    # ... but not for one that has waited 200 ms already. 164 tokens left in 250 ms, one iteration
    # kept back: 3 of 50 ms would need 55 tokens each, but that makes them 69 ms long, so 2 of 82.
    scheduler.get_request("fresh").arrival_time -= 0.200
    assert fresh_chunk() == [-(-left // 2)]
    # Out of time: the rest at once.
    scheduler.get_request("fresh").arrival_time -= 0.200
    assert fresh_chunk() == [left - -(-left // 2)]


def test_jobs_share_the_leftover_budget_fairly():
    scheduler = make(budget=32, num_blocks=400)
    add_job(scheduler, "a", lengths=(100,) * 4, adapter="a", in_flight=1)
    add_job(scheduler, "b", lengths=(100,) * 4, adapter="b", in_flight=1)
    done = {"a": 0, "b": 0}
    for out in run(scheduler, iterations=40):
        for chunk in out.sequences:
            done[chunk.request_id.split("/")[0]] += chunk.num_tokens
        for w in out.backward_windows:
            done[w.seq_id.split("/")[0]] += w.num_tokens
    assert done["a"] > 0 and done["b"] > 0
    assert abs(done["a"] - done["b"]) <= 0.15 * (done["a"] + done["b"])


def test_finetuning_never_holds_more_than_its_share_of_the_cache():
    scheduler = make(budget=64, num_blocks=40, block_size=4, kv_fraction=0.5)   # finetuning: 20 blocks
    add_job(scheduler, lengths=(40, 40, 40), in_flight=3)                       # 10 blocks each
    out = scheduler.schedule()
    assert len({c.request_id for c in out.sequences}) == 2
    assert scheduler.block_manager.num_free_blocks == 20
    with pytest.raises(ValueError, match="KV blocks"):
        add_job(scheduler, "big", lengths=(200,))


def test_a_job_never_takes_a_slot_beyond_max_loras():
    scheduler = make(budget=64, max_loras=1)
    add_job(scheduler, lengths=(20,), adapter="train")
    scheduler.add_request(Request("r", [1, 2, 3], SamplingParams(max_tokens=3), adapter="other"))
    out = scheduler.schedule()
    # The job's adapter holds the only slot, so the request for another adapter waits.
    assert [s.adapter for s in out.sequences] == ["train"]
    assert scheduler.num_waiting == 1


@pytest.mark.parametrize("every", [1, 3])
def test_temporal_sharing_alternates_inference_and_finetuning_turns(every):
    scheduler = make(budget=64, sharing="temporal", turn=8, every=every)
    add_job(scheduler, lengths=(400,))                # outlives the requests
    for i in range(3):
        scheduler.add_request(Request(f"r{i}", [1, 2, 3, 4], SamplingParams(max_tokens=12)))
    outs = run(scheduler)
    kinds = []
    for out in outs:
        training = sum(s.num_tokens for s in out.sequences if s.is_training) + sum(
            w.num_tokens for w in out.backward_windows)
        assert not (training and inference_tokens(out)), "a turn mixed inference and finetuning"
        assert training <= 8
        kinds.append("f" if training else "i")
    pattern = "".join(kinds)
    while_both = pattern[:pattern.rindex("i") + 1]
    # `every` inference iterations, then one turn, while both have work; then finetuning runs alone.
    assert while_both.startswith("i" * every + "f" + "i" * every + "f")
    assert all(run == "i" * every for run in while_both.split("f")[:-1])
    assert set(pattern[len(while_both):]) == {"f"}


def test_a_small_temporal_turn_runs_layer_pieces_of_a_window():
    # Backward tokens cost 2 forward tokens, each window 80 more: a whole window never fits K=8.
    scheduler = make(budget=64, sharing="temporal", turn=8, min_tokens=4)
    scheduler.finetune.num_layers = 8
    scheduler.set_turn_costs(CostModel.token_units(2.0, 80.0))
    add_job(scheduler, lengths=(40,))
    outs = run(scheduler)
    pieces = [w for out in outs for w in out.backward_windows]
    assert pieces and all(w.fraction == 1 / 8 for w in pieces)
    assert all(sum(s.num_tokens for s in out.sequences) <= 8 for out in outs)
    covered = {}
    for w in pieces:
        covered.setdefault((w.start, w.end), []).append(w.layer_start)
    assert sorted(t for start, end in covered for t in range(start, end)) == list(range(40))
    assert all(layers == list(reversed(range(8))) for layers in covered.values())   # top-down, each once


@pytest.mark.parametrize("budget", [3, 5, 16, 24, 64])
@pytest.mark.parametrize("min_tokens", [1, 4, 16])
@pytest.mark.parametrize("with_inference", [False, True])
def test_every_job_finishes_under_any_budget(budget, min_tokens, with_inference):
    scheduler = make(budget=budget, min_tokens=min_tokens, num_blocks=400)
    seqs = add_job(scheduler, lengths=(30, 41, 48, 37), in_flight=2)
    if with_inference:
        for i in range(4):
            scheduler.add_request(Request(f"r{i}", list(range(1, 12)), SamplingParams(max_tokens=20)))
    run(scheduler, iterations=5000)
    assert not scheduler.has_unfinished_requests()
    assert {s.seq_id for s in scheduler.finetune.pop_completed()} == {s.seq_id for s in seqs}


def test_cost_model_learns_each_kind_of_work_online():
    # The profile says 10 ms + 1 ms per forward token; the machine really costs 20 ms per iteration,
    # 3 ms per decode, 1 ms per prefill token, 2.5 ms per finetuning forward token, 2 ms per adapter,
    # and backward windows 1.5x their profiled cost.
    cost = CostModel(0.010, 0.001, 0.005, 0.002)
    assert cost.max_forward_tokens(0.050) == 40 and cost.margin == 0.0

    def truth(shape):
        return (0.020 + 0.003 * shape.decode_tokens + 0.001 * shape.prefill_tokens + 0.0025 * shape.train_tokens
                + sum(f * 1.5 * (0.005 + 0.002 * n) for n, f, _ in shape.backward_windows) + 0.002 * shape.num_adapters)

    rng = random.Random(0)
    for _ in range(300):
        shape = IterationShape(decode_tokens=rng.randint(0, 16), prefill_tokens=rng.choice([0, 0, 32, 128]),
                               train_tokens=rng.choice([0, 16, 64]),
                               backward_windows=rng.choice([(), ((16, 1.0, 0),), ((32, 0.25, 64),)]),
                               num_adapters=rng.randint(0, 4))
        cost.observe(shape, truth(shape))
    probe = IterationShape(decode_tokens=10, train_tokens=16, backward_windows=((24, 0.5, 8),), num_adapters=3)
    assert cost.predict(probe) == pytest.approx(truth(probe), rel=0.05)   # the prior pulls a little
    assert cost.train_forward_cost(10) == pytest.approx(0.025, rel=0.05)
    assert cost.margin < 0.001                          # noise-free: predictions are right
    assert cost.max_forward_tokens(0.050) == pytest.approx(30, abs=1)   # (50 - 20) ms / 1 ms
    tokens = CostModel.token_units()
    tokens.observe(IterationShape(prefill_tokens=40), seconds=1.0)
    assert tokens.predict(IterationShape(prefill_tokens=40)) == 40   # token budgets are not time


def test_the_planner_keeps_the_learned_margin_free():
    cost = CostModel(0.010, 0.001, 0.005, 0.002)
    rng = random.Random(1)
    for _ in range(200):                               # noisy iterations: 10 ms spread around the profile
        shape = IterationShape(prefill_tokens=rng.randint(1, 64))
        cost.observe(shape, 0.010 + 0.001 * shape.prefill_tokens + rng.uniform(-0.01, 0.01))
    assert 0.001 < cost.margin < 0.005
    scheduler = make(budget=64)
    scheduler.set_budget(cost, 0.050)
    add_job(scheduler, lengths=(60,))
    out = scheduler.schedule()
    assert cost.predict(IterationShape.of(out)) <= 0.050 - cost.margin + 1e-12
    assert cost.predict(IterationShape.of(out)) > 0.050 - cost.margin - 0.002   # and it fills the rest


def test_finetuning_yields_while_a_request_is_behind_its_tpot_slo():
    cost = CostModel(0.010, 0.001, 0.005, 0.002)
    scheduler = make(budget=64)
    scheduler.set_budget(cost, 0.050)                 # 50 ms per output token
    request = Request("r", [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
    scheduler.add_request(request)
    run_one = lambda: scheduler.schedule()            # noqa: E731
    first = run_one()                                 # the prefill
    scheduler.update(first, RunnerOutput(sampled_token_ids={"r": 7}))
    add_job(scheduler, lengths=(60,))
    # 4 tokens so far, the first 0.5 s ago: 0.5 s for 4 tokens is far over 50 ms each.
    request.output_token_ids = [7] * 4
    request.num_computed_tokens = request.num_tokens - 1
    request.first_token_time -= 0.5
    out = run_one()
    assert inference_tokens(out) == 1 and not any(s.is_training for s in out.sequences)
    assert not out.backward_windows
    # Ahead of the SLO again (the first token just now): finetuning fills the iteration.
    scheduler.update(out, RunnerOutput(sampled_token_ids={"r": 7}))
    request.first_token_time = time.monotonic()
    out = run_one()
    assert any(s.is_training for s in out.sequences)


def test_finetuning_leaves_the_headroom_to_decodes_that_have_not_banked_it():
    cost = CostModel(0.010, 0.001, 0.005, 0.002)
    scheduler = make(budget=64, headroom=0.2)
    scheduler.set_budget(cost, 0.050)                 # 50 ms per output token; the headroom pace is 40 ms
    request = Request("r", [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
    scheduler.add_request(request)
    first = scheduler.schedule()
    scheduler.update(first, RunnerOutput(sampled_token_ids={"r": 7}))
    add_job(scheduler, lengths=(200,), in_flight=1)
    # A fresh decode: finetuning fills the iteration to the pace (40 ms), not to the limit.
    out = scheduler.schedule()
    predicted = cost.predict(IterationShape.of(out))
    assert any(s.is_training for s in out.sequences)
    assert 0.038 < predicted <= 0.040 + 1e-12
    scheduler.update(out, RunnerOutput(sampled_token_ids={"r": 7}))
    # Its 10 tokens so far took 10 ms each: well ahead of the pace, so finetuning may fill to the limit.
    request.output_token_ids = [7] * 10
    request.num_computed_tokens = request.num_tokens - 1
    request.first_token_time = time.monotonic() - 0.1
    out = scheduler.schedule()
    assert 0.048 < cost.predict(IterationShape.of(out)) <= 0.050 + 1e-12
    # Prompts keep the whole limit: a chunk beside a fresh decode is cut at 50 ms, not at the pace.
    scheduler = make(budget=256, headroom=0.2)
    scheduler.set_budget(cost, 0.050)
    _with_four_decodes(scheduler)
    add_job(scheduler, lengths=(200,), in_flight=1)
    scheduler.add_request(Request("long", list(range(1, 201)), SamplingParams(max_tokens=4)))
    out = scheduler.schedule()
    assert [s.num_tokens for s in out.sequences if s.request_id == "long"] == [35]
    assert not any(s.is_training for s in out.sequences) and not out.backward_windows


def test_finetuning_waits_while_prompts_are_held_back_by_the_token_budget():
    # A loose SLO: 64 prompt tokens cost 74 ms of a 500 ms limit, so the token budget binds first.
    cost = CostModel(0.010, 0.001, 0.005, 0.002)
    scheduler = make(budget=64)
    scheduler.set_budget(cost, 0.500)
    add_job(scheduler, lengths=(60,))
    scheduler.add_request(Request("long", list(range(1, 201)), SamplingParams(max_tokens=4)))
    while scheduler.get_request("long").num_tokens_to_compute > 64:
        out = scheduler.schedule()
        assert inference_tokens(out) == 64
        assert not any(s.is_training for s in out.sequences) and not out.backward_windows
        scheduler.update(out, RunnerOutput())
    out = scheduler.schedule()                          # the prompt's last chunk leaves room: finetuning fills it
    assert any(s.is_training for s in out.sequences)


def test_a_job_starved_by_inference_still_finishes_and_overruns_rarely():
    scheduler = make(budget=64, min_tokens=4, num_blocks=400, starvation=32)
    # Four decodes fit the limit with little room left, and a backward window alone never fits.
    scheduler.set_budget(CostModel(0.010, 0.001, 0.050, 0.002), 0.016)
    seqs = add_job(scheduler, lengths=(12,), in_flight=1)
    for i in range(4):
        scheduler.add_request(Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=4000, ignore_eos=True)))
    outputs = []
    for _ in range(3000):
        out = scheduler.schedule()
        scheduler.update(out, RunnerOutput(sampled_token_ids={s.request_id: 7 for s in out.sequences
                                                              if s.needs_sample}))
        outputs.append(out)
        if scheduler.finetune.completed:
            break
    assert {s.seq_id for s in scheduler.finetune.pop_completed()} == {s.seq_id for s in seqs}
    with_backward = [i for i, out in enumerate(outputs) if out.backward_windows]
    # Every backward window was forced after a full starvation wait, never two close together.
    gaps = [b - a for a, b in zip([-1] + with_backward, with_backward)]
    assert min(gaps) >= scheduler.config.finetune_starvation_iterations
    assert all(inference_tokens(outputs[i]) == 4 for i in with_backward)   # inference kept its share


def run_one_sequence(cost, limit=0.020):
    """One 40-token training sequence through an 8-layer model alone; returns the outputs and the
    backward pieces that ran."""
    scheduler = make(budget=64, min_tokens=4, num_blocks=400)
    scheduler.finetune.num_layers = 8
    scheduler.set_budget(cost, limit)
    seqs = add_job(scheduler, lengths=(40,), in_flight=1)
    outputs = run(scheduler)
    assert {s.seq_id for s in scheduler.finetune.pop_completed()} == {seqs[0].seq_id}
    return outputs, [w for out in outputs for w in out.backward_windows]


def test_windows_too_big_for_an_iteration_run_in_layer_pieces_top_down():
    # A backward window's fixed cost alone (40 ms) is twice the limit: only layer pieces fit.
    cost = CostModel(0.001, 0.0001, 0.040, 0.001)
    outputs, pieces = run_one_sequence(cost)
    assert pieces and all(w.fraction < 1 for w in pieces)
    done_tokens, top, window = [], None, None
    for piece in pieces:
        if piece.layer_end is None:                    # a window's first piece starts at the top layer
            assert top is None
            window, top = (piece.start, piece.end), 8
        assert (piece.start, piece.end) == window and (piece.layer_end or 8) == top
        assert piece.fraction == pytest.approx((top - piece.layer_start) / 8)
        top = piece.layer_start
        if top == 0:
            done_tokens.append(window)
            top = None
    assert top is None
    # Token windows go in reverse order and cover every token once.
    assert [end for _, end in done_tokens] == sorted((end for _, end in done_tokens), reverse=True)
    assert sum(end - start for start, end in done_tokens) == 40 and done_tokens[-1][0] == 0
    for out in outputs:
        assert cost.predict(IterationShape.of(out)) <= 0.020 + 1e-12


def test_pieces_cut_layers_by_tokens_to_fill_the_budget_and_cover_each_layer_token_once():
    # A whole window costs far more than the limit, and a layer of it 8 ms against 19 ms left:
    # two whole layers leave 3 ms, which the later tokens of the next layer fill.
    cost = CostModel(0.001, 0.0001, 0.0, 0.0016)
    outputs, pieces = run_one_sequence(cost)
    assert any(p.stop_cut is not None for p in pieces) and any(p.resume_cut is not None for p in pieces)
    done = []
    for piece in pieces:
        for layer, first, last in piece.steps(8):
            done += [(piece.start, piece.end, layer, token) for token in reversed(range(first, last))]
    # Windows in reverse order; within one, layers top-down and each layer's tokens last to first.
    windows = sorted({(start, end) for start, end, _, _ in done}, reverse=True)
    assert sum(end - start for start, end in windows) == 40 and windows[-1][0] == 0
    assert done == [(start, end, layer, token) for start, end in windows for layer in reversed(range(8))
                    for token in reversed(range(start, end))]
    for out in outputs:
        assert cost.predict(IterationShape.of(out)) <= 0.020 + 1e-12
    # A piece that stops inside a layer left less of the budget than a minimum cut (5 tokens) costs.
    budget, per_layer_token = 0.020 - cost.iteration_base, cost.backward_cost(40) / (8 * 40)
    cut = [FinetunePlanner.piece_cost(cost, p) for p in pieces if p.stop_cut is not None]
    assert cut and all(budget - 5 * per_layer_token < spent <= budget + 1e-12 for spent in cut)


def test_a_part_done_layer_is_finished_when_each_cut_part_pays_a_layers_fixed_cost():
    scheduler = make(budget=64, min_tokens=4, num_blocks=400)
    planner = scheduler.finetune
    planner.num_layers = 8
    # 80 ms of fixed cost per window: 10 ms for each layer part, on top of 0.2 ms per layer-token.
    cost = CostModel(0.001, 0.0001, 0.080, 0.0016)
    (seq,) = add_job(scheduler, lengths=(40,), in_flight=1)
    planner._admit(planner.jobs["job"], seq)
    seq.num_forward_done, seq.backward_end = 40, 40
    seq.window_start, seq.layer_top, seq.token_cut = 0, 3, 8     # layer 2 has tokens [0, 8) left
    piece = planner._plan_window(seq, cost, budget=0.019, limit=0.020, min_backward=4, force=False)
    # Layer 2's rest costs 11.6 ms (10 fixed, 8 x 0.2); cutting layer 1 too would add 10 ms more.
    assert (piece.layer_start, piece.layer_end, piece.resume_cut, piece.stop_cut) == (2, 3, 8, None)
    assert FinetunePlanner.piece_cost(cost, piece) == pytest.approx(0.0116)
    # 40 ms: layer 2's rest and all of layer 1 (18 ms); a cut of layer 0 (11 ms or more) does not fit.
    piece = planner._plan_window(seq, cost, budget=0.040, limit=0.050, min_backward=4, force=False)
    assert (piece.layer_start, piece.layer_end, piece.resume_cut, piece.stop_cut) == (1, 3, 8, None)
    assert FinetunePlanner.piece_cost(cost, piece) == pytest.approx(0.0296)
    # 45 ms: also the last 27 tokens of layer 0 (15.4 ms).
    piece = planner._plan_window(seq, cost, budget=0.045, limit=0.050, min_backward=4, force=False)
    assert (piece.layer_start, piece.resume_cut, piece.stop_cut) == (1, 8, 13)
    assert FinetunePlanner.piece_cost(cost, piece) == pytest.approx(0.0296 + 0.010 + 27 * 0.0002)


def test_a_window_late_in_a_sequence_costs_its_keys_and_gets_fewer_layers():
    # 5 ms + 2 ms per token + 10 us per (token x key it attends to), per whole window of 8 layers.
    cost = CostModel(0.010, 0.001, 0.005, 0.002, backward_per_key=1e-5)
    assert cost.backward_cost(16) == pytest.approx(0.005 + 0.032 + 1e-5 * 16 * 17 / 2)
    assert cost.backward_cost(16, start=48) == pytest.approx(0.005 + 0.032 + 1e-5 * (16 * 48 + 16 * 17 / 2))
    # Ending at position 64, a window pays for the keys before it: it holds fewer tokens.
    n = cost.max_backward_tokens(0.050, end=64)
    assert cost.backward_cost(n, 64 - n) <= 0.040 < cost.backward_cost(n + 1, 63 - n)
    assert n < cost.max_backward_tokens(0.050)
    assert IterationShape(backward_windows=((16, 0.5, 48),)) != IterationShape(backward_windows=((16, 0.5, 0),))
    assert cost.predict(IterationShape(backward_windows=((16, 0.5, 48),))) == pytest.approx(
        0.010 + 0.5 * cost.backward_cost(16, 48))

    # The planner sizes layer pieces with the window's own position: a 64-token sequence's last
    # 32 tokens attend to all 64 keys, so fewer of its layers fit than the position-free cost says.
    scheduler = make(budget=64)
    scheduler.finetune.num_layers = 8
    scheduler.set_budget(cost, 0.030)
    add_job(scheduler, lengths=(64,), in_flight=1)
    for _ in range(40):
        out = scheduler.schedule()
        scheduler.finetune.update(out)
        if out.backward_windows:
            break
    (window,) = out.backward_windows
    budget = 0.030 - cost.iteration_base
    assert FinetunePlanner.piece_cost(cost, window) <= budget + 1e-12
    position_free_share = budget / cost.backward_cost(window.num_tokens)
    assert window.fraction < min(1.0, position_free_share)


@pytest.mark.parametrize("num_layers, window_tokens", [(4, 27), (8, 64), (16, 128)])
def test_backward_windows_grow_with_the_layers_they_run_in(num_layers, window_tokens):
    # 10 ms per window + 1 ms per token through every layer; a 20 ms limit of which 2 ms are fixed.
    # Whole windows may cost max(2, layers / 2) limits: 40 ms (28 tokens), 80 ms (68) or 160 ms
    # (148), split evenly over the 512 tokens: 19 windows of 27, 8 of 64 or 4 of 128.
    cost = CostModel(0.002, 0.0001, 0.010, 0.001)
    scheduler = make(budget=64, num_blocks=400)
    scheduler.finetune.num_layers = num_layers
    scheduler.set_budget(cost, 0.020)
    add_job(scheduler, lengths=(512,), in_flight=1)
    windows = [w for out in run(scheduler, iterations=5000) for w in out.backward_windows]
    token_windows = sorted({(w.start, w.end) for w in windows}, reverse=True)
    assert token_windows[0] == (512 - window_tokens, 512)
    assert sum(end - start for start, end in token_windows) == 512
    # One layer of a window always fits an iteration, whatever the model's depth.
    assert all(cost.iteration_base + cost.backward_cost(end - start) / num_layers <= 0.020
               for start, end in token_windows)
