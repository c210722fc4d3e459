"""A finetuning sequence as the scheduler sees it: token ids, forward and backward progress.

Pure Python (no torch). A training sequence runs its forward in chunks like a
chunked prefill (`num_forward_done` grows to `length`), then its backward in
reverse token windows (`backward_end` falls from `length` to 0). It holds KV
blocks for its whole length from admission until its last backward window.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainingSequence:
    seq_id: str
    job_id: str
    adapter: str
    token_ids: list[int]
    num_forward_done: int = 0
    backward_end: int | None = None
    """Tokens [0, backward_end) still need their backward; None until the forward is complete."""

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def is_forward_done(self) -> bool:
        return self.num_forward_done >= self.length

    @property
    def is_done(self) -> bool:
        return self.backward_end == 0


@dataclass
class BackwardWindow:
    """Backward of tokens [start, end) of one training sequence this iteration."""

    seq_id: str
    start: int
    end: int
    block_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return self.end - self.start
