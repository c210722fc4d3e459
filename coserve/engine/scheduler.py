"""Iteration-level scheduler: hands out a token budget and KV blocks each step.

`schedule()` builds a `SchedulerOutput` (the runner's only input) and
`update()` folds the runner's `RunnerOutput` back into the requests. Pure
Python, no torch: tested with hand-made runner outputs and no model.

NOTE: there is no prefill or decode phase. Every request simply needs
`num_tokens_to_compute` more tokens of work (1 for a decode, the rest of the
prompt for a prefill, prompt + output after a preemption), and the budget is
filled in the order: running decodes, running prefill chunks, new requests,
then finetuning work (`finetune_planner.py`) with what the cost model says is left.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable

from coserve.config import SchedulerConfig
from coserve.engine.cost_model import CostModel, IterationShape
from coserve.engine.finetune_planner import FinetunePlanner
from coserve.engine.kv_cache import BlockManager
from coserve.engine.outputs import RunnerOutput, ScheduledSequence, SchedulerOutput
from coserve.engine.request import Request, RequestStatus


class Scheduler:
    """Decides which tokens of which requests run in the next iteration."""

    def __init__(self, scheduler_config: SchedulerConfig, block_manager: BlockManager,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = scheduler_config
        self.clock = clock
        """Seconds, on the clock of the requests' arrival_time (a simulation passes a virtual one)."""
        self.block_manager = block_manager
        # FIFO of requests holding no KV blocks; preempted ones go back at the front.
        self.waiting: deque[Request] = deque()
        # Requests holding KV blocks, in admission order: the last is preempted first.
        self.running: list[Request] = []
        # Every unfinished request (waiting or running) by id.
        self.requests: dict[str, Request] = {}
        # Failed in schedule(); the next update() returns them so none is dropped silently.
        self._finished_with_error: list[Request] = []
        self.finetune = FinetunePlanner(scheduler_config, block_manager)
        # Without an SLO the budget is counted in tokens, limited by max_num_batched_tokens.
        self.cost_model = CostModel.token_units()
        self.limit: float = float(scheduler_config.max_num_batched_tokens)
        self._inference_since_turn = 0
        self.turn_cost_model = CostModel.token_units(1.0)
        """Temporal sharing: what a turn's K tokens of finetuning work count (`set_turn_costs`)."""
        self._token_budget = scheduler_config.max_num_batched_tokens
        """This iteration's inference token budget (`_iteration_token_budget`)."""
        self._catch_up = 0.0
        """This iteration's `_catch_up_reserve`: shortens both its prefill chunks and its finetuning."""
        self._finetune_reserve = 0.0
        """This iteration's reserve for finetuning alone: the catch-up to the headroom pace."""
        self._prompts_held_back = False
        """This iteration's inference used its whole token budget with prompt work still left."""

    def set_budget(self, cost_model: CostModel, limit: float) -> None:
        """Plan iterations with this latency model under this limit (the TPOT SLO, in its unit)."""
        self.cost_model, self.limit = cost_model, float(limit)

    def set_turn_costs(self, cost_model: CostModel) -> None:
        """Temporal sharing: count a turn's work with this token-unit model (a backward window's fixed
        cost included, so a small K runs a layer piece of a window, not a whole small window)."""
        self.turn_cost_model = cost_model

    @property
    def inference_token_budget(self) -> int:
        """Most inference tokens per iteration: max_num_batched_tokens (see `_iteration_token_budget`)."""
        return self.config.max_num_batched_tokens

    def _iteration_token_budget(self, decodes: list[Request], prefills: list[Request]) -> int:
        """Inference tokens this iteration may hold.

        Without an SLO: max_num_batched_tokens. With one, and decodes running, a prefill chunk
        is cut so the iteration's predicted latency stays under the limit (as Sarathi-Serve's
        stall-free batching does): a 256-token chunk costs several times the limit on a CPU, and
        the decodes beside it would miss their TPOT. A decode behind its SLO shortens the target
        further (`_catch_up_reserve`). The chunk never falls below `min_prefill_chunk`, nor below
        what keeps every prompt within `ttft_slo_ms`. The time a cut chunk leaves returns as
        finetuning budget.
        """
        budget = self.inference_token_budget
        cost = self.cost_model
        if cost.unit != "s" or not decodes or not self.config.enable_chunked_prefill:
            return budget
        adapters = {r.adapter for r in decodes if r.adapter is not None}
        # One adapter more: a prefill may bring one the decodes do not use.
        decode_cost = cost.predict(IterationShape(decode_tokens=len(decodes), num_adapters=len(adapters) + 1))
        target = self.limit - self._catch_up - cost.margin
        prefill = max(self.config.min_prefill_chunk, self._ttft_chunk(prefills, decode_cost),
                      int((target - decode_cost) / cost.prefill_token_cost))
        return min(budget, len(decodes) + prefill)

    def _ttft_chunk(self, prefills: list[Request], decode_cost: float) -> int:
        """Smallest prefill chunk per iteration with which every prompt, running or waiting in FIFO
        order, still gets its first token within `ttft_slo_ms`; 0 without that SLO.

        An iteration lasts the limit, or longer when the chunk itself pushes it past (`decode_cost`
        plus the chunk's tokens): the chunk is sized for the limit, then once more for that length.
        One iteration of the time left is kept back, as margin for iterations that run longer than
        planned. `arrival_time` is when the request reached the server (`Engine.add_request`), not
        when the engine thread added it, which can be an iteration later.
        """
        if self.config.ttft_slo_ms is None:
            return 0
        now, deadline = self.clock(), self.config.ttft_slo_ms / 1000.0
        prompts = [r for r in (*prefills, *self.waiting) if r.first_token_time is None]  # not preempted ones

        def chunk_for(iteration_s: float) -> int:
            queued, chunk = 0, 0
            for request in prompts:
                queued += request.num_tokens_to_compute
                iterations_left = int((deadline - (now - request.arrival_time)) / iteration_s) - 1
                chunk = max(chunk, -(-queued // max(1, iterations_left)))
            return chunk

        chunk = chunk_for(self.limit)
        return chunk_for(max(self.limit, decode_cost + chunk * self.cost_model.prefill_token_cost))

    # ------------------------------------------------------------------ queue

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if not request.prompt_token_ids:
            raise ValueError(f"request {request.request_id!r} has an empty prompt")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> Request | None:
        """Cancel a request and free its blocks; None if it is unknown or already finished."""
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request from outside (e.g. the engine found a stop string) and free its blocks.

        Returns:
            The finished request, or None if it is unknown or already finished.
        """
        if not status.is_finished:
            raise ValueError(f"finish_request needs a finished status, got {status}")
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._finish(request, status)
        return request

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self.requests.get(request_id)

    def has_unfinished_requests(self) -> bool:
        # NOTE: requests that failed in schedule() count until update() returns
        # them, so an engine loop `while has_unfinished_requests(): step()` reports them.
        return bool(self.requests) or bool(self._finished_with_error) or self.finetune.has_work()

    def has_inference_work(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def running_adapters(self) -> set[str]:
        """Distinct adapters held by running requests (each takes one of max_loras slots)."""
        return {r.adapter for r in self.running if r.adapter is not None}

    # --------------------------------------------------------------- schedule

    def schedule(self) -> SchedulerOutput:
        """Plan one iteration: inference first, finetuning in what is left (or in its own turn)."""
        if self.config.sharing == "temporal":
            return self._schedule_temporal()
        output = self._schedule_inference()
        adapters = {s.adapter for s in output.sequences if s.adapter is not None}
        # NOTE: prompt tokens left out because the iteration's token budget ran out are better served
        # by the next iteration starting sooner than by finetuning lengthening this one (with a
        # loose SLO the token budget binds before the latency limit). The planner still runs, with
        # nothing to spend, so a starving job gets its guaranteed piece.
        reserve = self.limit if self._prompts_held_back else self._finetune_reserve
        chunks, windows = self.finetune.plan(self.cost_model, self.limit, IterationShape.of(output), adapters,
                                             reserve=reserve)
        output.sequences += chunks
        output.backward_windows = windows
        return output

    def _catch_up_reserve(self, decodes: list[Request], pace: float | None = None) -> float:
        """Part of the limit this iteration must leave unused for a decoding request behind `pace`.

        The SLO bounds each request's mean time per output token. A decode whose tokens so far took
        longer on average than `pace` (the limit by default; a burst of prefills ran beside it) may
        only see an iteration short enough to bring its mean back to that pace, so finetuning
        yields, and prefill chunks shrink, until it has caught up. Never negative: a request ahead
        of its pace does not allow iterations longer than the limit.
        """
        if self.cost_model.unit != "s":
            return 0.0
        pace = self.limit if pace is None else pace
        now, reserve = self.clock(), 0.0
        for request in decodes:
            if request.first_token_time is None:
                continue
            # After this iteration: num_output_tokens tokens since the first, in (now - first) + t.
            allowed = pace * request.num_output_tokens - (now - request.first_token_time)
            reserve = max(reserve, self.limit - allowed)
        return reserve

    def _schedule_temporal(self) -> SchedulerOutput:
        """Temporal sharing: `temporal_turn_every` inference iterations, then a finetuning turn of K tokens."""
        finetune_turn = self.finetune.has_work() and (
            not self.requests or self._inference_since_turn >= self.config.temporal_turn_every)
        self._inference_since_turn = 0 if finetune_turn else self._inference_since_turn + 1
        if not finetune_turn:
            return self._schedule_inference()
        # K tokens of finetuning work: forward tokens, and backward work in forward-token units.
        chunks, windows = self.finetune.plan(self.turn_cost_model, self.config.temporal_turn_tokens)
        return SchedulerOutput(sequences=chunks, backward_windows=windows)

    def _schedule_inference(self) -> SchedulerOutput:
        """Fill the inference token budget: running decodes, running prefills, then new requests."""
        # request_id -> tokens scheduled this iteration, in fill order. A request
        # preempted later in this call is removed again and its budget reused.
        scheduled: dict[str, int] = {}
        preempted: list[str] = []

        decodes = [r for r in self.running if r.num_tokens_to_compute == 1]
        prefills = [r for r in self.running if r.num_tokens_to_compute > 1]
        self._catch_up = self._catch_up_reserve(decodes)
        # Finetuning keeps decodes at the slower headroom pace; prompts may still use the whole limit.
        # (A slower pace never reserves less than the limit's catch-up.)
        headroom = self.config.finetune_slo_headroom
        self._finetune_reserve = (self._catch_up_reserve(decodes, (1 - headroom) * self.limit) if headroom
                                  else self._catch_up)
        self._token_budget = self._iteration_token_budget(decodes, prefills)
        for request in decodes + prefills:
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop to make room for another
            budget_left = self._budget_left(scheduled)
            if budget_left == 0:
                break
            if self._fail_if_unservable(request):
                continue
            num_tokens = self._num_tokens_this_iteration(request, budget_left)
            if num_tokens == 0:
                continue
            if self._allocate_or_preempt(request, num_tokens, scheduled, preempted):
                scheduled[request.request_id] = num_tokens

        # NOTE: after a preemption the cache is full; admitting new work now would
        # only evict it again next step (vLLM's scheduler makes the same choice).
        if not preempted:
            self._admit_waiting(scheduled)
        self._prompts_held_back = self._budget_left(scheduled) <= 0 and (
            bool(self.waiting) or any(r.num_tokens_to_compute > scheduled.get(r.request_id, 0) for r in self.running))

        return SchedulerOutput(
            sequences=[self._build_sequence(rid, n) for rid, n in scheduled.items()],
            preempted_request_ids=preempted,
        )

    def _admit_waiting(self, scheduled: dict[str, int]) -> None:
        """Move waiting requests to running, FIFO, while budget, seats and blocks allow."""
        # Adapters being trained hold a slot too (their forward chunks need one).
        active_adapters = self.running_adapters() | self.finetune.active_adapters()
        passed_over: list[Request] = []  # no adapter slot; they keep their place in line
        while self.waiting:
            budget_left = self._budget_left(scheduled)
            if budget_left == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            if self._fail_if_unservable(request):
                continue
            if (request.adapter is not None and request.adapter not in active_adapters
                    and len(active_adapters) >= self.config.max_loras):
                # NOTE: the one exception to FIFO: requests behind it whose adapter is
                # already loaded cost no slot, so they may go ahead.
                passed_over.append(self.waiting.popleft())
                continue
            num_tokens = self._num_tokens_this_iteration(request, budget_left)
            num_total_tokens = request.num_computed_tokens + num_tokens
            if num_tokens == 0 or not self.block_manager.can_allocate(request.request_id, num_total_tokens):
                break  # FIFO: nobody overtakes the head of the line
            self.waiting.popleft()
            self.block_manager.allocate(request.request_id, num_total_tokens)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled[request.request_id] = num_tokens
            if request.adapter is not None:
                active_adapters.add(request.adapter)
        self.waiting.extendleft(reversed(passed_over))

    def _budget_left(self, scheduled: dict[str, int]) -> int:
        return self._token_budget - sum(scheduled.values())

    def _num_tokens_this_iteration(self, request: Request, budget_left: int) -> int:
        """Tokens of this request that fit the budget left; 0 if it must wait."""
        num_remaining = request.num_tokens_to_compute
        if num_remaining <= budget_left:
            return num_remaining
        return budget_left if self.config.enable_chunked_prefill else 0

    def _allocate_or_preempt(self, request: Request, num_tokens: int,
                             scheduled: dict[str, int], preempted: list[str]) -> bool:
        """Give a running request blocks for its tokens, preempting the newest running ones.

        Returns:
            False if the request itself was preempted (it is then not scheduled).
        """
        num_total_tokens = request.num_computed_tokens + num_tokens
        while not self.block_manager.can_allocate(request.request_id, num_total_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            scheduled.pop(victim.request_id, None)
            preempted.append(victim.request_id)
            if victim is request:
                return False
        self.block_manager.allocate(request.request_id, num_total_tokens)
        return True

    def _preempt(self, request: Request) -> None:
        """Preempt by recompute: drop the KV blocks; the request reruns prompt + output later."""
        self.block_manager.free(request.request_id)
        self.running = [r for r in self.running if r is not request]
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def _fail_if_unservable(self, request: Request) -> bool:
        """Finish with an error a request that could never be scheduled, whatever else runs."""
        num_blocks = self.block_manager.num_blocks_needed(request.num_tokens)
        if num_blocks > self.block_manager.num_blocks:
            error = (f"request {request.request_id!r} needs {num_blocks} KV blocks, the cache has "
                     f"{self.block_manager.num_blocks}; raise num_kv_blocks or lower max_tokens")
        elif (not self.config.enable_chunked_prefill
              and request.num_tokens_to_compute > self.inference_token_budget):
            error = (f"request {request.request_id!r} needs {request.num_tokens_to_compute} tokens in "
                     f"one iteration, the budget is {self.inference_token_budget} tokens; "
                     f"enable chunked prefill or raise max_num_batched_tokens (or the SLO)")
        else:
            return False
        request.error = error
        self._finish(request, RequestStatus.FINISHED_ERROR)
        self._finished_with_error.append(request)
        return True

    def _build_sequence(self, request_id: str, num_tokens: int) -> ScheduledSequence:
        request = self.requests[request_id]
        start = request.num_computed_tokens
        return ScheduledSequence(
            request_id=request_id,
            token_ids=request.all_token_ids[start:start + num_tokens],
            start_position=start,
            block_ids=self.block_manager.block_ids(request_id),
            adapter=request.adapter,
            needs_sample=start + num_tokens == request.num_tokens,
        )

    # ----------------------------------------------------------------- update

    def update(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> list[Request]:
        """Record the iteration's progress and sampled tokens.

        Returns:
            Requests finished by this iteration (stop, length) plus any that
            failed in the last schedule() (status FINISHED_ERROR, see `error`).
        """
        finished, self._finished_with_error = self._finished_with_error, []
        self.finetune.update(scheduler_output)
        for seq in scheduler_output.sequences:
            if seq.is_training:
                continue
            request = self.requests.get(seq.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # aborted or finished between schedule() and update()
            request.num_computed_tokens += seq.num_tokens
            if not seq.needs_sample:
                continue
            token_id = runner_output.sampled_token_ids.get(seq.request_id)
            if token_id is None:
                raise RuntimeError(f"the runner sampled no token for request {seq.request_id!r}, "
                                   f"which was scheduled with needs_sample=True")
            request.output_token_ids.append(token_id)
            if seq.request_id in runner_output.logprobs:
                request.output_logprobs.append(runner_output.logprobs[seq.request_id])
            if request.first_token_time is None:
                request.first_token_time = self.clock()
            status = self._stop_status(request, token_id)
            if status is not None:
                self._finish(request, status)
                finished.append(request)
        return finished

    @staticmethod
    def _stop_status(request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if token_id == request.eos_token_id and not params.ignore_eos:
            return RequestStatus.FINISHED_STOPPED
        if token_id in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.max_model_len is not None and request.num_tokens >= request.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """Mark finished, free the blocks and forget the request (identity, not ==, to find it)."""
        self.block_manager.free(request.request_id)
        self.running = [r for r in self.running if r is not request]
        if any(r is request for r in self.waiting):
            self.waiting = deque(r for r in self.waiting if r is not request)
        self.requests.pop(request.request_id, None)
        request.status = status
        request.finish_time = self.clock()
