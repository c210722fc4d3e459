"""A finetuning sequence as the scheduler sees it: token ids, forward and backward progress.

Pure Python (no torch). A training sequence runs its forward in chunks like a
chunked prefill (`num_forward_done` grows to `length`), then its backward in
reverse token windows (`backward_end` falls from `length` to 0); a window that does
not fit an iteration runs in layer pieces over several (`window_start`, `layer_top`). It holds KV
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
    window_start: int | None = None
    """Start of the token window [window_start, backward_end) whose backward ran through its upper
    layers only (a layer window); None when no window is part done."""
    layer_top: int = 0
    """For that window: layers [layer_top, num_layers) are done; its next piece ends at layer_top."""

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
    """Backward of tokens [start, end) of one training sequence this iteration, through layers
    [layer_start, layer_end) top-down (a layer window), or through all of them."""

    seq_id: str
    start: int
    end: int
    block_ids: list[int]
    layer_start: int = 0
    layer_end: int | None = None
    """None: from the top layer (the window's first piece)."""
    fraction: float = 1.0
    """Share of the model's layers this piece runs (its share of a whole window's cost)."""

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def finishes_window(self) -> bool:
        """True when this piece reaches the first layer: the tokens' backward is then complete."""
        return self.layer_start == 0
