"""What crosses the scheduler/runner boundary, in both directions.

`SchedulerOutput` is the only object the runner receives; it holds plain Python
values so the scheduler is tested with no model. `RunnerOutput` carries what
the runner computed back to `Scheduler.update`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from coserve.engine.training_sequence import BackwardWindow


@dataclass
class ScheduledSequence:
    """One sequence's share of an iteration."""

    request_id: str
    token_ids: list[int]
    """Tokens fed this iteration: all_token_ids[start_position:start_position + n]."""
    start_position: int
    """Position of token_ids[0]; equals num_computed_tokens before this iteration."""
    block_ids: list[int]
    """Block table covering positions [0, start_position + len(token_ids))."""
    adapter: str | None
    needs_sample: bool
    """True when this chunk reaches the sequence's last known token: sample the next one."""
    is_training: bool = False
    """A finetuning forward chunk: its activations are kept and its loss computed, nothing sampled."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        """Tokens in the KV cache after this iteration."""
        return self.start_position + len(self.token_ids)


@dataclass
class SchedulerOutput:
    sequences: list[ScheduledSequence] = field(default_factory=list)
    """Inference sequences and finetuning forward chunks, all in one fused forward."""
    preempted_request_ids: list[str] = field(default_factory=list)
    """Requests whose KV blocks were freed this iteration (they recompute later)."""
    backward_windows: list[BackwardWindow] = field(default_factory=list)
    """Finetuning backward windows, run after the forward."""

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_tokens for s in self.sequences) + sum(w.num_tokens for w in self.backward_windows)

    @property
    def is_empty(self) -> bool:
        return not self.sequences and not self.backward_windows


@dataclass
class RunnerOutput:
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    """request_id -> sampled token, for each sequence with needs_sample."""
    logprobs: dict[str, dict] = field(default_factory=dict)
    """request_id -> {"token_logprob": float, "top": {token_id: logprob}} when asked for."""
    training_losses: dict[str, tuple[float, int]] = field(default_factory=dict)
    """training seq_id -> (sum of token losses, number of target tokens) of its chunk this iteration."""
