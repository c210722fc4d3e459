"""Scheduler tests with hand-made runner outputs and no model (style of vLLM tests/v1/core).

`FakeRunner` stands in for the model: it writes each scheduled token into a fake
paged KV cache through the block table, reads the whole context back through the
same table, and samples a token that is a deterministic function of that
context. Wrong positions, stale or shared blocks therefore change the outputs.
"""
import pytest

from coserve.config import SchedulerConfig
from coserve.engine.kv_cache import BlockManager
from coserve.engine.outputs import RunnerOutput, SchedulerOutput
from coserve.engine.request import Request, RequestStatus
from coserve.engine.scheduler import Scheduler
from coserve.sampling_params import SamplingParams


def fake_next_token(context: list[int]) -> int:
    # Depends on every token and its position; never below 10 so tests can pick EOS < 10.
    return sum((i + 1) * t for i, t in enumerate(context)) * 2654435761 % 1000 + 10


class FakeRunner:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.kv: dict[int, list] = {}  # block_id -> one slot per position in the block

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        result = RunnerOutput()
        for seq in out.sequences:
            assert len(seq.block_ids) * self.block_size >= seq.context_len
            for offset, token in enumerate(seq.token_ids):
                pos = seq.start_position + offset
                block = self.kv.setdefault(seq.block_ids[pos // self.block_size], [None] * self.block_size)
                block[pos % self.block_size] = (seq.request_id, token)
            if seq.needs_sample:
                context = []
                for pos in range(seq.context_len):
                    owner, token = self.kv[seq.block_ids[pos // self.block_size]][pos % self.block_size]
                    assert owner == seq.request_id, "read another request's KV"
                    context.append(token)
                result.sampled_token_ids[seq.request_id] = fake_next_token(context)
        return result


def make_scheduler(budget=256, max_num_seqs=64, max_loras=8, chunked=True, num_blocks=1000, block_size=4):
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                             max_loras=max_loras, enable_chunked_prefill=chunked)
    return Scheduler(config, BlockManager(num_blocks, block_size))


def make_request(rid, num_prompt=5, max_tokens=4, adapter=None, eos=None, first_token=1, **params):
    prompt = [first_token + i for i in range(num_prompt)]
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **params), adapter=adapter,
                   eos_token_id=eos)


def step(scheduler: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[Request]]:
    out = scheduler.schedule()
    config = scheduler.config
    assert out.num_scheduled_tokens <= config.max_num_batched_tokens
    assert scheduler.num_running <= config.max_num_seqs
    assert len(scheduler.running_adapters()) <= config.max_loras
    for seq in out.sequences:
        request = scheduler.get_request(seq.request_id)
        assert seq.start_position == request.num_computed_tokens
        assert seq.token_ids == request.all_token_ids[seq.start_position:seq.context_len]
        assert seq.num_tokens > 0 and seq.adapter == request.adapter
    return out, scheduler.update(out, runner.execute(out))


def run_to_completion(scheduler: Scheduler, runner: FakeRunner | None = None,
                      max_steps=2000) -> dict[str, Request]:
    runner = runner or FakeRunner(scheduler.block_manager.block_size)
    finished = {}
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            break
        _, done = step(scheduler, runner)
        finished.update((r.request_id, r) for r in done)
    assert not scheduler.has_unfinished_requests(), "requests left after max_steps"
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks
    return finished


def scheduled_counts(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.request_id, s.num_tokens) for s in out.sequences]


def test_scheduler_config_validation():
    assert SchedulerConfig().max_num_batched_tokens == 256
    for bad in (dict(max_num_batched_tokens=0), dict(max_num_seqs=-1), dict(max_loras=0),
                dict(max_num_seqs=2.0), dict(enable_chunked_prefill=1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SchedulerConfig(**bad)


def test_budget_and_order_decodes_then_prefills_then_new():
    scheduler = make_scheduler(budget=10)
    runner = FakeRunner(4)
    scheduler.add_request(make_request("a", num_prompt=3))
    scheduler.add_request(make_request("b", num_prompt=20))
    out, _ = step(scheduler, runner)
    assert scheduled_counts(out) == [("a", 3), ("b", 7)]

    scheduler.add_request(make_request("c", num_prompt=6))
    out, _ = step(scheduler, runner)   # a decodes, b takes the rest, c does not fit
    assert scheduled_counts(out) == [("a", 1), ("b", 9)]
    assert scheduler.num_waiting == 1

    out, _ = step(scheduler, runner)   # b's last 4 prompt tokens, then c's first chunk
    assert scheduled_counts(out) == [("a", 1), ("b", 4), ("c", 5)]
    out, _ = step(scheduler, runner)   # decodes (admission order) before c's prefill
    assert scheduled_counts(out) == [("a", 1), ("b", 1), ("c", 1)]
    assert out.sequences[2].needs_sample


def test_chunked_prefill_positions_and_sampling():
    scheduler = make_scheduler(budget=16, block_size=4)
    runner = FakeRunner(4)
    request = make_request("a", num_prompt=50, max_tokens=2)
    scheduler.add_request(request)
    chunks = []
    for _ in range(4):
        out, _ = step(scheduler, runner)
        (seq,) = out.sequences
        chunks.append((seq.start_position, seq.num_tokens, seq.needs_sample, len(seq.block_ids)))
    assert chunks == [(0, 16, False, 4), (16, 16, False, 8), (32, 16, False, 12), (48, 2, True, 13)]
    assert request.num_output_tokens == 1 and request.num_computed_tokens == 50
    assert request.output_token_ids == [fake_next_token(request.prompt_token_ids)]
    out, done = step(scheduler, runner)
    assert scheduled_counts(out) == [("a", 1)] and out.sequences[0].start_position == 50
    assert done == [request] and request.status is RequestStatus.FINISHED_LENGTH


def test_without_chunking_a_prompt_must_fit_whole():
    scheduler = make_scheduler(budget=10, chunked=False)
    runner = FakeRunner(4)
    for rid, n in (("a", 6), ("b", 6), ("c", 2)):
        scheduler.add_request(make_request(rid, num_prompt=n))
    out, _ = step(scheduler, runner)
    # b does not fit the 4 tokens left; c fits but FIFO keeps it behind b.
    assert scheduled_counts(out) == [("a", 6)]
    out, _ = step(scheduler, runner)
    assert scheduled_counts(out) == [("a", 1), ("b", 6), ("c", 2)]


def test_without_chunking_a_prompt_over_the_budget_errors():
    scheduler = make_scheduler(budget=10, chunked=False)
    big, small = make_request("big", num_prompt=11), make_request("small", num_prompt=3)
    scheduler.add_request(big)
    scheduler.add_request(small)
    finished = run_to_completion(scheduler)
    assert big.status is RequestStatus.FINISHED_ERROR
    assert "the budget is 10 tokens" in big.error and "max_num_batched_tokens" in big.error
    assert finished["small"].status is RequestStatus.FINISHED_LENGTH


def test_max_num_seqs_limits_running_requests():
    scheduler = make_scheduler(max_num_seqs=2)
    runner = FakeRunner(4)
    for rid in "abc":
        scheduler.add_request(make_request(rid, max_tokens=3))
    out, _ = step(scheduler, runner)
    assert [s.request_id for s in out.sequences] == ["a", "b"]
    assert scheduler.num_running == 2 and scheduler.num_waiting == 1
    finished = run_to_completion(scheduler, runner)
    assert set(finished) == {"a", "b", "c"}


def test_max_loras_limits_distinct_adapters_and_base_takes_no_slot():
    scheduler = make_scheduler(max_loras=2)
    runner = FakeRunner(4)
    adapters = {"a1": "x", "b1": "y", "c1": "z", "a2": "x", "base": None}
    for rid, adapter in adapters.items():
        scheduler.add_request(make_request(rid, max_tokens=3, adapter=adapter))
    out, _ = step(scheduler, runner)
    # z finds no slot; the x request and the base request behind it still go.
    assert [s.request_id for s in out.sequences] == ["a1", "b1", "a2", "base"]
    assert scheduler.running_adapters() == {"x", "y"}
    assert [r.request_id for r in scheduler.waiting] == ["c1"]
    finished = run_to_completion(scheduler, runner)
    assert finished["c1"].num_output_tokens == 3


def test_adapter_slot_frees_only_when_every_request_of_it_finishes():
    scheduler = make_scheduler(max_loras=1)
    runner = FakeRunner(4)
    scheduler.add_request(make_request("x-short", max_tokens=1, adapter="x"))
    scheduler.add_request(make_request("x-long", max_tokens=3, adapter="x"))
    scheduler.add_request(make_request("y", max_tokens=1, adapter="y"))
    _, done = step(scheduler, runner)
    assert [r.request_id for r in done] == ["x-short"]
    out, _ = step(scheduler, runner)
    assert [s.request_id for s in out.sequences] == ["x-long"]   # x still holds the only slot
    step(scheduler, runner)
    out, _ = step(scheduler, runner)
    assert [s.request_id for s in out.sequences] == ["y"]


def _workload():
    return [make_request(f"r{i}", num_prompt=5 + 3 * i, max_tokens=6 + i, first_token=10 * i + 1,
                         adapter=("x", "y", None)[i % 3]) for i in range(6)]


def test_preemption_resumes_and_matches_an_unconstrained_run():
    reference = make_scheduler(budget=32, num_blocks=1000)
    for request in _workload():
        reference.add_request(request)
    expected = {rid: r.output_token_ids for rid, r in run_to_completion(reference).items()}

    scheduler = make_scheduler(budget=32, num_blocks=12, block_size=4)
    runner = FakeRunner(4)
    workload = _workload()
    for request in workload:
        scheduler.add_request(request)
    preempted_ids, finished = [], {}
    while scheduler.has_unfinished_requests():
        out, done = step(scheduler, runner)
        preempted_ids += out.preempted_request_ids
        for rid in out.preempted_request_ids:
            assert rid not in {s.request_id for s in out.sequences}
            assert scheduler.block_manager.block_ids(rid) == []
        finished.update((r.request_id, r) for r in done)

    assert preempted_ids, "the pool was meant to be too small for the whole batch"
    assert sum(r.num_preemptions for r in workload) == len(preempted_ids)
    assert {rid: r.output_token_ids for rid, r in finished.items()} == expected
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in finished.values())
    assert scheduler.block_manager.num_free_blocks == 12


def test_preempts_most_recent_and_puts_it_at_the_front_of_waiting():
    scheduler = make_scheduler(budget=64, num_blocks=4, block_size=4)
    runner = FakeRunner(4)
    a, b = make_request("a", num_prompt=8, max_tokens=6), make_request("b", num_prompt=8, max_tokens=2)
    c = make_request("c", num_prompt=2, max_tokens=2)
    for request in (a, b, c):
        scheduler.add_request(request)
    out, _ = step(scheduler, runner)   # a and b fill all 4 blocks; c cannot be admitted
    assert scheduled_counts(out) == [("a", 8), ("b", 8)]
    out, _ = step(scheduler, runner)   # a's decode needs a 3rd block: b (newest) is preempted
    assert out.preempted_request_ids == ["b"] and scheduled_counts(out) == [("a", 1)]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and b.num_output_tokens == 1
    assert [r.request_id for r in scheduler.waiting] == ["b", "c"]
    out, _ = step(scheduler, runner)
    # b's recompute (prompt + 1 output = 3 blocks) does not fit the 1 free block,
    # and c, which would fit, does not overtake it.
    assert scheduled_counts(out) == [("a", 1)] and out.preempted_request_ids == []
    assert [r.request_id for r in scheduler.waiting] == ["b", "c"]
    while not a.is_finished:
        step(scheduler, runner)
    out, done = step(scheduler, runner)   # b recomputes prompt + its output token, then c
    assert scheduled_counts(out) == [("b", 9), ("c", 2)]
    assert done == [b] and b.num_output_tokens == 2
    assert out.sequences[0].token_ids == b.all_token_ids[:9] and out.sequences[0].needs_sample
    assert set(run_to_completion(scheduler, runner)) == {"c"} and a.num_output_tokens == 6


def test_a_request_may_preempt_itself():
    scheduler = make_scheduler(budget=64, num_blocks=2, block_size=4)
    runner = FakeRunner(4)
    a, b = make_request("a", num_prompt=3, max_tokens=3), make_request("b", num_prompt=4, max_tokens=3)
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler, runner)            # one block each
    out, _ = step(scheduler, runner)
    # a's decode still fits its block; b's needs a 2nd block and b is the newest itself.
    assert out.preempted_request_ids == ["b"] and scheduled_counts(out) == [("a", 1)]
    assert [r.request_id for r in scheduler.waiting] == ["b"]
    assert set(run_to_completion(scheduler, runner)) == {"a", "b"}
    assert a.num_output_tokens == b.num_output_tokens == 3 and b.num_preemptions == 1


@pytest.mark.parametrize("kwargs, eos, status, num_outputs", [
    (dict(), "first", RequestStatus.FINISHED_STOPPED, 1),
    (dict(ignore_eos=True), "first", RequestStatus.FINISHED_LENGTH, 5),
    (dict(stop_token_ids=["second"]), None, RequestStatus.FINISHED_STOPPED, 2),
    (dict(), None, RequestStatus.FINISHED_LENGTH, 5),
])
def test_stop_conditions(kwargs, eos, status, num_outputs):
    probe = make_scheduler()
    probe.add_request(make_request("p", max_tokens=5))
    tokens = run_to_completion(probe)["p"].output_token_ids
    pick = {"first": tokens[0], "second": tokens[1], None: None}
    kwargs = {k: [pick[x] for x in v] if k == "stop_token_ids" else v for k, v in kwargs.items()}

    scheduler = make_scheduler()
    request = make_request("r", max_tokens=5, eos=pick[eos], **kwargs)
    scheduler.add_request(request)
    run_to_completion(scheduler)
    assert request.status is status and request.output_token_ids == tokens[:num_outputs]
    assert request.finish_time is not None and request.first_token_time <= request.finish_time


def test_max_model_len_stops_with_length():
    scheduler = make_scheduler()
    request = make_request("r", num_prompt=5, max_tokens=50)
    request.max_model_len = 8
    scheduler.add_request(request)
    run_to_completion(scheduler)
    assert request.status is RequestStatus.FINISHED_LENGTH and request.num_tokens == 8


def test_logprobs_are_recorded():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("r", max_tokens=2))
    out = scheduler.schedule()
    entry = {"token_logprob": -0.5, "top": {7: -0.5}}
    scheduler.update(out, RunnerOutput(sampled_token_ids={"r": 7}, logprobs={"r": entry}))
    assert scheduler.get_request("r").output_logprobs == [entry]


def test_missing_sample_is_an_error():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("r"))
    out = scheduler.schedule()
    with pytest.raises(RuntimeError, match="sampled no token"):
        scheduler.update(out, RunnerOutput())


def test_add_request_rejects_duplicates_and_empty_prompts():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("r"))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("r"))
    with pytest.raises(ValueError, match="empty prompt"):
        scheduler.add_request(make_request("e", num_prompt=0))


def test_abort_frees_blocks_of_running_and_waiting_requests():
    scheduler = make_scheduler(max_num_seqs=1)
    runner = FakeRunner(4)
    scheduler.add_request(make_request("a", max_tokens=10))
    scheduler.add_request(make_request("b"))
    out = scheduler.schedule()
    assert scheduler.block_manager.num_used_blocks == 2
    aborted = scheduler.abort_request("a")
    assert aborted.status is RequestStatus.FINISHED_ABORTED and aborted.finish_time is not None
    assert scheduler.block_manager.num_used_blocks == 0 and scheduler.num_running == 0
    assert scheduler.update(out, runner.execute(out)) == []   # aborted in flight: ignored
    assert aborted.num_output_tokens == 0
    assert scheduler.abort_request("b").status is RequestStatus.FINISHED_ABORTED
    assert scheduler.abort_request("b") is None and scheduler.abort_request("zzz") is None
    assert not scheduler.has_unfinished_requests() and scheduler.num_waiting == 0


def test_finish_request_for_stop_strings():
    scheduler = make_scheduler()
    runner = FakeRunner(4)
    scheduler.add_request(make_request("a", max_tokens=10))
    step(scheduler, runner)
    with pytest.raises(ValueError, match="finished status"):
        scheduler.finish_request("a", RequestStatus.RUNNING)
    request = scheduler.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert request.finish_reason == "stop"
    assert scheduler.block_manager.num_used_blocks == 0 and not scheduler.has_unfinished_requests()


def test_a_request_too_large_for_the_pool_errors_alone():
    # 8 blocks of 4 tokens = 32 positions in the whole cache.
    scheduler = make_scheduler(budget=16, num_blocks=8, block_size=4)
    huge = make_request("huge", num_prompt=33)                 # never fits
    grows = make_request("grows", num_prompt=20, max_tokens=20)  # fits, then outgrows the pool
    others = [make_request(f"ok{i}", num_prompt=4, max_tokens=3) for i in range(3)]
    for request in (huge, grows, *others):
        scheduler.add_request(request)
    finished = run_to_completion(scheduler)
    assert set(finished) == {"huge", "grows", "ok0", "ok1", "ok2"}
    assert huge.status is RequestStatus.FINISHED_ERROR and huge.finish_reason == "error"
    assert huge.error == ("request 'huge' needs 9 KV blocks, the cache has 8; "
                          "raise num_kv_blocks or lower max_tokens")
    assert grows.status is RequestStatus.FINISHED_ERROR and "needs 9 KV blocks" in grows.error
    assert grows.num_tokens == 33 and grows.num_output_tokens == 13
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in others)


def test_error_finished_request_is_reported_by_the_next_update():
    scheduler = make_scheduler(num_blocks=2, block_size=4)
    scheduler.add_request(make_request("huge", num_prompt=9))
    out = scheduler.schedule()
    assert out.is_empty and scheduler.has_unfinished_requests()
    (request,) = scheduler.update(out, RunnerOutput())
    assert request.request_id == "huge" and request.status is RequestStatus.FINISHED_ERROR
    assert not scheduler.has_unfinished_requests()
