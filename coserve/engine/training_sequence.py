"""A finetuning sequence as the scheduler sees it: token ids, forward and backward progress.

Pure Python (no torch). A training sequence runs its forward in chunks like a
chunked prefill (`num_forward_done` grows to `length`), then its backward in
reverse token windows (`backward_end` falls from `length` to 0); a window that does
not fit an iteration runs in pieces over several (`window_start`, `layer_top`, `token_cut`): a
cursor walks the layers top-down and, within a layer, the window's tokens from last to first, so a
piece may end part way through a layer. It holds KV blocks for its whole length from admission
until its last backward window.
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
    token_cut: int | None = None
    """For that window: tokens [token_cut, backward_end) of layer layer_top - 1 are done too (None:
    none of that layer)."""

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
    [layer_start, layer_end) top-down (a layer window), or through all of them.

    A piece may also cut layers by tokens (the window's later tokens first): with `resume_cut`,
    tokens [resume_cut, end) of its first layer (layer_end - 1) ran in an earlier piece, and this one
    does [start, resume_cut) of it; with `stop_cut`, after its whole layers it does tokens
    [stop_cut, end) of layer layer_start - 1 and leaves the rest of that layer to the next piece.
    layer_start == layer_end with both cuts: the piece does [stop_cut, resume_cut) of one layer.
    """

    seq_id: str
    start: int
    end: int
    block_ids: list[int]
    layer_start: int = 0
    layer_end: int | None = None
    """None: from the top layer (the window's first piece)."""
    fraction: float = 1.0
    """Share of the whole window's work (all layers, all its tokens) this piece does."""
    resume_cut: int | None = None
    stop_cut: int | None = None
    cost_parts: tuple[tuple[int, float, int], ...] | None = None
    """(tokens, share of the layers, first position) per part of the piece as the cost model prices
    it (a token-cut layer part attends from its own first position); None: one part, the whole
    window's tokens at `fraction`."""

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def finishes_window(self) -> bool:
        """True when this piece reaches the first layer: the tokens' backward is then complete."""
        return self.layer_start == 0 and self.stop_cut is None

    @property
    def parts(self) -> tuple[tuple[int, float, int], ...]:
        return self.cost_parts if self.cost_parts is not None else ((self.num_tokens, self.fraction, self.start),)

    def steps(self, num_layers: int) -> list[tuple[int, int, int]]:
        """(layer, first token, end token) for each layer step of the piece, in the order they run."""
        return piece_steps(num_layers, self.start, self.end, self.layer_start, self.layer_end,
                           self.resume_cut, self.stop_cut)


def piece_steps(num_layers: int, start: int, end: int, layer_start: int = 0, layer_end: int | None = None,
                resume_cut: int | None = None, stop_cut: int | None = None) -> list[tuple[int, int, int]]:
    """(layer, first token, end token) of each layer step of a backward piece (`BackwardWindow`), top-down."""
    top = num_layers if layer_end is None else layer_end
    if not 0 <= layer_start <= top <= num_layers or (stop_cut is not None and layer_start == 0):
        raise ValueError(f"bad layer range [{layer_start}, {layer_end}) with stop_cut {stop_cut}")

    def step_end(layer: int) -> int:
        return resume_cut if layer == top - 1 and resume_cut is not None else end

    steps = [(layer, start, step_end(layer)) for layer in reversed(range(layer_start, top))]
    if stop_cut is not None:
        steps.append((layer_start - 1, stop_cut, step_end(layer_start - 1)))
    if any(not start <= first < last <= end for _, first, last in steps):
        raise ValueError(f"bad token cuts {resume_cut}, {stop_cut} for window [{start}, {end})")
    return steps


@dataclass(frozen=True)
class PieceCut:
    """Where a backward piece starts and stops (`BackwardWindow` fields) and the work it does."""

    layer_start: int
    layer_end: int | None
    resume_cut: int | None
    stop_cut: int | None
    layer_tokens: int
    """Tokens summed over the piece's layer steps."""


def next_piece(start: int, end: int, num_layers: int, layer_top: int, token_cut: int | None,
               layer_tokens: int, min_cut: int = 1) -> PieceCut | None:
    """The piece of window [start, end) that does about `layer_tokens` tokens of layer work from the
    cursor (layers [layer_top, num_layers) done, and tokens [token_cut, end) of layer layer_top - 1):
    the rest of the current layer, whole layers below it, then the later tokens of the next layer.
    A cut leaves at least `min_cut` tokens on each side (the piece does less work where it must);
    None when no such piece fits."""
    width = end - start
    first_piece = layer_top == num_layers and token_cut is None
    layer_end = None if first_piece else layer_top
    left_in_layer = (end if token_cut is None else token_cut) - start
    if layer_tokens < left_in_layer:       # only part of the current layer
        layer_tokens = min(layer_tokens, left_in_layer - min_cut)
        if layer_tokens < min_cut:
            return None
        cut = start + left_in_layer - layer_tokens
        return PieceCut(layer_top, layer_end, token_cut, cut, layer_tokens)
    budget = layer_tokens - left_in_layer
    layer_start = layer_top - 1
    whole = min(budget // width, layer_start)
    layer_start -= whole
    budget = min(budget - whole * width, width - min_cut)
    stop_cut = None
    if layer_start > 0 and budget >= min_cut:
        stop_cut = end - budget
    done = left_in_layer + whole * width + (end - stop_cut if stop_cut is not None else 0)
    return PieceCut(layer_start, layer_end, token_cut, stop_cut, done)
