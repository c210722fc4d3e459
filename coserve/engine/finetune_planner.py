"""Finetuning's share of each iteration: which forward chunks and backward windows run.

Pure Python, part of the scheduler. Jobs hand in the training sequences of
their current optimizer step; the planner admits them (KV blocks for the whole
sequence, at most `max_in_flight` per job, finetuning never holding more than
`finetune_kv_fraction` of the cache), then fills the cost budget the inference
part left: per job, backward windows first (they free memory), then forward
chunks. Jobs share the leftover budget fairly, the first job rotating each
iteration.
"""
from __future__ import annotations

from collections import OrderedDict, deque

from coserve.config import SchedulerConfig
from coserve.engine.cost_model import CostModel, IterationShape
from coserve.engine.kv_cache import BlockManager
from coserve.engine.outputs import ScheduledSequence, SchedulerOutput
from coserve.engine.training_sequence import BackwardWindow, PieceCut, TrainingSequence, next_piece, piece_steps


def _window_size(remaining: int, fits_alone: int) -> int:
    """Size of the next backward window: equal windows, none larger than an iteration holds.

    e.g. 1024 tokens with room for 341: windows of 256, not 341 + 341 + 341 + 1.
    """
    if remaining <= fits_alone or fits_alone <= 0:
        return remaining
    num_windows = -(-remaining // fits_alone)
    return -(-remaining // num_windows)


LAYER_PIECE_SHARE = 0.5
"""With measured costs a backward window is sized so that one layer of it costs about this share of
the iteration limit. Each layer of a window pays a fixed cost (its weights read again, its recompute
set up), so bigger windows pay less of it per token, but a one-layer piece must still fit beside an
iteration's decodes. On bench-small (8 layers) in the co-serving benchmark, back to back: windows
worth 2 limits (about 70 tokens) trained 102 to 104 tokens/s, 4 limits (170 to 256 tokens) 142 to
173; 8 limits (whole 512-token sequences, a layer of which rarely fits) 93 to 114 against 146 to 255."""


def _window_limit(unit: str, limit: float, num_layers: int) -> float:
    """What one backward window may cost through every layer: at least two iteration limits, and
    `LAYER_PIECE_SHARE` of a limit per layer (token units model no fixed cost: one limit)."""
    if unit == "tokens":
        return limit
    return max(2.0, LAYER_PIECE_SHARE * num_layers) * limit


def _price(cost: CostModel, parts) -> float:
    """Marginal cost of backward work given as (tokens, share of the layers, first position) parts."""
    return sum(share * cost.backward_cost(n, first) for n, share, first in parts)


class _Job:
    def __init__(self, adapter: str, max_in_flight: int) -> None:
        self.adapter = adapter
        self.max_in_flight = max_in_flight
        self.pending: deque[TrainingSequence] = deque()
        self.admitted: list[TrainingSequence] = []
        self.waited = 0
        """Iterations in a row in which this job had work but got none of the budget."""


class FinetunePlanner:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.num_layers = 1
        """Decoder layers of the model (set by the engine): a window may run in pieces of these."""
        self.jobs: OrderedDict[str, _Job] = OrderedDict()
        self.sequences: dict[str, TrainingSequence] = {}   # admitted ones, by id
        self.completed: list[TrainingSequence] = []        # backward done; drained by the engine
        self._num_blocks_held = 0

    # ---- jobs ---------------------------------------------------------------------------------

    def add_job(self, job_id: str, adapter: str, max_in_flight: int) -> None:
        if job_id in self.jobs:
            raise ValueError(f"finetuning job {job_id!r} already exists")
        self.jobs[job_id] = _Job(adapter, max_in_flight)

    def add_sequences(self, job_id: str, sequences: list[TrainingSequence]) -> None:
        for seq in sequences:
            num_blocks = self.block_manager.num_blocks_needed(seq.length)
            if num_blocks > self._block_cap():
                raise ValueError(f"a training sequence of {seq.length} tokens needs {num_blocks} KV blocks; "
                                 f"finetuning may hold {self._block_cap()} (raise num_kv_blocks or "
                                 f"finetune_kv_fraction, or lower max_seq_len)")
        self.jobs[job_id].pending.extend(sequences)

    def remove_job(self, job_id: str) -> list[str]:
        """Forget a job and free its KV blocks; returns the ids of its admitted sequences."""
        job = self.jobs.pop(job_id, None)
        if job is None:
            return []
        for seq in job.admitted:
            self._release(seq)
        return [seq.seq_id for seq in job.admitted]

    def has_work(self) -> bool:
        return any(job.pending or job.admitted for job in self.jobs.values())

    def active_adapters(self) -> set[str]:
        """Adapters of jobs with work: each needs a device slot for its forward chunks."""
        return {job.adapter for job in self.jobs.values() if job.pending or job.admitted}

    def num_in_flight(self) -> int:
        return len(self.sequences)

    # ---- planning -----------------------------------------------------------------------------

    def plan(self, cost: CostModel, limit: float, inference: IterationShape = IterationShape(),
             adapters_in_use: set[str] = frozenset(),
             reserve: float = 0.0) -> tuple[list[ScheduledSequence], list[BackwardWindow]]:
        """Chunks and windows that fit in `limit` after this iteration's inference rows (`inference`).

        `adapters_in_use`: adapters of this iteration's inference rows; a job whose adapter
        would exceed max_loras runs only backward windows this time (they need no slot).
        `reserve`: part of the limit finetuning must leave free this time (windows are still
        sized by the whole limit).
        """
        chunks: list[ScheduledSequence] = []
        windows: list[BackwardWindow] = []
        active = [job_id for job_id, job in self.jobs.items() if job.pending or job.admitted]
        if not active:
            return chunks, windows
        num_inference = inference.decode_tokens + inference.prefill_tokens
        state = {"forward": num_inference, "left": limit - reserve - cost.margin - cost.predict(inference),
                 "limit": limit,
                 "base_paid": not inference.is_empty, "planned": set(), "adapters": set(adapters_in_use)}
        for index, job_id in enumerate(active):
            share = state["left"] / (len(active) - index)
            planned_before = len(chunks) + len(windows)
            spent = self._plan_job(job_id, cost, share, state, chunks, windows)
            state["left"] -= spent
            job = self.jobs[job_id]
            job.waited = 0 if len(chunks) + len(windows) > planned_before else job.waited + 1
        # Rotate so a different job goes first (and gets the rounding) next time.
        self.jobs.move_to_end(active[0])
        return chunks, windows

    def _plan_job(self, job_id: str, cost: CostModel, share: float, state: dict,
                  chunks: list[ScheduledSequence], windows: list[BackwardWindow]) -> float:
        job = self.jobs[job_id]
        spent = 0.0
        # Never ask for more than a whole iteration could hold, and always allow one token in an
        # iteration with nothing else in it, so finetuning progresses under any budget.
        idle = state["forward"] == 0 and not chunks and not windows
        # A job that got nothing for `finetune_starvation_iterations` iterations in a row (inference
        # filling the budget, or a budget below one backward window) gets one small piece anyway:
        # at most one iteration in that many runs over its target, and the job still finishes.
        starving = job.waited >= self.config.finetune_starvation_iterations
        took = False
        min_backward = max(1, min(self.config.min_finetune_tokens, cost.max_backward_tokens(state["limit"])))
        min_forward = max(1, min(self.config.min_finetune_tokens, cost.max_train_tokens(state["limit"])))
        for seq in job.admitted:
            if not seq.is_forward_done or seq.backward_end == 0:
                continue
            force = (idle and not windows) or (starving and not took)
            base = 0.0 if state["base_paid"] else cost.iteration_base
            window = self._plan_window(seq, cost, share - spent - base, state["limit"], min_backward, force)
            if window is None:
                continue
            windows.append(window)
            spent += base + self.piece_cost(cost, window)
            state["base_paid"] = True
            took = True
        planned: set[str] = state["planned"]
        adapters: set[str] = state["adapters"]
        if job.adapter not in adapters and len(adapters) >= self.config.max_loras:
            return spent
        while True:
            seq = self._next_forward(job, planned)
            if seq is None:
                break
            remaining = seq.length - seq.num_forward_done
            extra = (0.0 if state["base_paid"] else cost.iteration_base) + (
                0.0 if job.adapter in adapters else cost.adapter_cost)
            n = min(remaining, cost.max_train_tokens(share - spent - extra))
            if idle and not windows and state["forward"] == 0:
                n = max(n, 1)
            elif starving and not took:
                n = max(n, min(self.config.min_finetune_tokens, remaining))
            elif n <= 0 or n < min(min_forward, remaining):
                break
            if seq.seq_id not in self.sequences and not self._admit(job, seq):
                break
            start = seq.num_forward_done
            chunks.append(ScheduledSequence(
                request_id=seq.seq_id, token_ids=seq.token_ids[start:start + n], start_position=start,
                block_ids=self.block_manager.block_ids(seq.seq_id), adapter=seq.adapter, needs_sample=False,
                is_training=True))
            spent += extra + cost.train_forward_cost(n)
            state["forward"] += n
            state["base_paid"] = True
            planned.add(seq.seq_id)
            adapters.add(job.adapter)
            took = True
        return spent

    def _plan_window(self, seq: TrainingSequence, cost: CostModel, budget: float, limit: float,
                     min_backward: int, force: bool) -> BackwardWindow | None:
        """The sequence's next backward piece within `budget`: a whole window through every layer
        when one worth running fits, else the top layers of one (a layer window; with measured
        costs also the later tokens of the next layer), continued by later iterations; `force`
        takes the smallest piece even when nothing fits."""
        blocks = self.block_manager.block_ids(seq.seq_id)
        layers = self.num_layers
        if seq.window_start is not None:          # continue a part-done window from its cursor
            return self._cut_piece(cost, seq, seq.window_start, seq.backward_end, seq.layer_top, seq.token_cut,
                                   budget, force)
        end = seq.backward_end
        target = _window_size(end, cost.max_backward_tokens(_window_limit(cost.unit, limit, layers), end))
        n = min(target, cost.max_backward_tokens(budget, end))
        # With measured costs a smaller whole window is a poor use of the budget: each window pays a
        # fixed cost (every layer's weights are read again), so layer pieces of the big window do more
        # work per second, and forward chunks fill what a piece leaves. Token units know no fixed cost,
        # and there a smaller whole window measured faster (finetuning alone: 563 against 514 tokens/s).
        if n > 0 and (n == target or (cost.unit == "tokens" and n >= min(min_backward, target))):
            return BackwardWindow(seq.seq_id, end - n, end, blocks)
        # The window does not fit: run its top layers now and the rest in later iterations.
        size = min(end, max(target, 4 * self.config.min_finetune_tokens))
        piece = self._cut_piece(cost, seq, end - size, end, layers, None, budget, force=False)
        if piece is not None:
            return piece
        # Not even one layer of it fits: a smaller whole window, if a worthwhile one does.
        if n > 0 and n >= min(min_backward, target):
            return BackwardWindow(seq.seq_id, end - n, end, blocks)
        if not force:
            return None
        if layers == 1:
            n = min(end, max(1, n, self.config.min_finetune_tokens))
            return BackwardWindow(seq.seq_id, end - n, end, blocks)
        n = min(end, max(1, self.config.min_finetune_tokens))
        return BackwardWindow(seq.seq_id, end - n, end, blocks,
                              layer_start=layers - 1, layer_end=None, fraction=1 / layers)

    def _cut_piece(self, cost: CostModel, seq: TrainingSequence, start: int, end: int, layer_top: int,
                   token_cut: int | None, budget: float, force: bool) -> BackwardWindow | None:
        """The biggest piece of window [start, end) from its cursor that `budget` pays for: the rest of
        the current layer, whole layers, then (with measured costs) the later tokens of the next
        layer. A layer is cut only in parts of at least `min_finetune_tokens` and an eighth of the
        window, as each part pays a layer's fixed cost; token units price no such cost, and there
        pieces keep to whole layers. `force`: the rest of the current layer even over budget."""
        layers, width = self.num_layers, end - start
        min_cut = width if cost.unit == "tokens" else max(self.config.min_finetune_tokens, width // 8)
        per_layer_token = cost.backward_cost(width, start) / (layers * width)
        most = layers * width if per_layer_token <= 0 else min(layers * width, int(budget / per_layer_token))
        # The per-token estimate leaves each cut part's fixed cost out: bisect the layer work for the
        # biggest piece whose priced cost fits.
        best, low, high = None, 1, most
        while low <= high:
            mid = (low + high) // 2
            cut = next_piece(start, end, layers, layer_top, token_cut, mid, min_cut)
            if cut is not None and _price(cost, self._parts(start, end, cut)) > budget:
                high = mid - 1
                continue
            best = cut or best
            low = mid + 1
        if best is None and force:
            left_in_layer = (end if token_cut is None else token_cut) - start
            best = next_piece(start, end, layers, layer_top, token_cut, left_in_layer)
        if best is None:
            return None
        return BackwardWindow(seq.seq_id, start, end, self.block_manager.block_ids(seq.seq_id),
                              layer_start=best.layer_start, layer_end=best.layer_end,
                              fraction=best.layer_tokens / (layers * width), resume_cut=best.resume_cut,
                              stop_cut=best.stop_cut, cost_parts=self._parts(start, end, best))

    def _parts(self, start: int, end: int, cut: PieceCut) -> tuple[tuple[int, float, int], ...]:
        """A piece as the cost model prices it: its whole layers as one part, each token-cut layer apart."""
        layers, width = self.num_layers, end - start
        steps = piece_steps(layers, start, end, cut.layer_start, cut.layer_end, cut.resume_cut, cut.stop_cut)
        whole = sum(1 for _, first, last in steps if (first, last) == (start, end))
        parts = [(width, whole / layers, start)] if whole else []
        parts += [(last - first, 1 / layers, first) for _, first, last in steps if (first, last) != (start, end)]
        return tuple(parts)

    @staticmethod
    def piece_cost(cost: CostModel, window: BackwardWindow) -> float:
        """What a backward piece adds to an iteration (the iteration's fixed cost apart)."""
        return _price(cost, window.parts)

    def _next_forward(self, job: _Job, planned: set[str]) -> TrainingSequence | None:
        """The next sequence needing forward work this iteration (one chunk per sequence)."""
        for seq in job.admitted:
            if not seq.is_forward_done and seq.seq_id not in planned:
                return seq
        if job.pending and len(job.admitted) < job.max_in_flight:
            return job.pending[0]
        return None

    def _block_cap(self) -> int:
        return max(1, int(self.config.finetune_kv_fraction * self.block_manager.num_blocks))

    def _admit(self, job: _Job, seq: TrainingSequence) -> bool:
        num_blocks = self.block_manager.num_blocks_needed(seq.length)
        if self._num_blocks_held + num_blocks > self._block_cap():
            return False
        if not self.block_manager.can_allocate(seq.seq_id, seq.length):
            return False
        self.block_manager.allocate(seq.seq_id, seq.length)
        self._num_blocks_held += num_blocks
        job.pending.popleft()
        job.admitted.append(seq)
        self.sequences[seq.seq_id] = seq
        return True

    # ---- progress -----------------------------------------------------------------------------

    def update(self, output: SchedulerOutput) -> None:
        """Confirm the planned forward chunks and apply the backward windows that ran."""
        for chunk in output.sequences:
            seq = self.sequences.get(chunk.request_id) if chunk.is_training else None
            if seq is None:
                continue
            seq.num_forward_done += chunk.num_tokens
            if seq.is_forward_done and seq.backward_end is None:
                seq.backward_end = seq.length
        for window in output.backward_windows:
            seq = self.sequences.get(window.seq_id)
            if seq is None:
                continue
            if not window.finishes_window:        # upper layers done; the rest in later iterations
                seq.window_start, seq.layer_top, seq.token_cut = window.start, window.layer_start, window.stop_cut
                continue
            seq.backward_end, seq.window_start, seq.layer_top, seq.token_cut = window.start, None, 0, None
            if seq.is_done:
                self._release(seq)
                job = self.jobs.get(seq.job_id)
                if job is not None:
                    job.admitted = [s for s in job.admitted if s is not seq]
                self.completed.append(seq)

    def pop_completed(self) -> list[TrainingSequence]:
        completed, self.completed = self.completed, []
        return completed

    def _release(self, seq: TrainingSequence) -> None:
        if self.sequences.pop(seq.seq_id, None) is not None:
            self._num_blocks_held -= self.block_manager.num_blocks_needed(seq.length)
            self.block_manager.free(seq.seq_id)
