"""Predicted iteration latency from what the iteration holds, and the budget it implies.

An iteration's cost is linear in its features (`CostModel.features`): a
fixed cost, decode tokens, prefill tokens, finetuning forward tokens (these
also pay the vocabulary projection and its gradient), backward work (its
profiled cost, which grows with the keys before the window: a window at
the end of a sequence attends to all of it; a layer window counts its share
of the layers), and the
adapters it touches (each adapter's weights are read once per layer). The
start-up profile (`coserve/engine/profiler.py`) gives the prior coefficients;
with an SLO, `observe` refits them after every iteration from measured
latencies (`LatencyFit`), so decode-heavy batches, another process on the
cores, or a profile from another machine are corrected within a few dozen
iterations. `margin` (half the recent prediction error's spread) is kept free
below the limit. Without an SLO the same model runs in token units (every
forward token costs 1, a backward token its ratio) and learns nothing. Pure
Python: the scheduler plans with it and tests build it by hand.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from coserve.engine.latency_fit import LatencyFit

# A backward token recomputes the layer forward and runs its backward, but a forward token of
# finetuning also pays the vocabulary projection's forward and gradient: measured on bench-small
# with 512-token sequences, 1024 backward tokens take 0.95 to 1.05 times as long as 1024 forward
# ones. At 1.0 a budget of two sequences' forward tokens also holds their whole backward windows,
# so no sequence is split into windows that each pay the fixed cost and keep dK/dV accumulators.
DEFAULT_BACKWARD_TOKEN_RATIO = 1.0
MIN_SCALE, MAX_SCALE = 1.0 / 16, 16.0
"""How far a loaded profile's start-up rescaling may go: a profile taken while other work shared the
cores can be many times too slow, and one taken on an idle machine too fast under load."""

FEATURES = ("iteration", "decode_token", "prefill_token", "train_token", "backward", "adapter")
FEATURE_SCALES = (1.0, 8.0, 64.0, 32.0, 0.03, 4.0)
"""Typical size of each feature in one iteration (seconds models): the ridge prior is set in these units."""
MARGIN_SIGMAS = 0.5
"""Headroom kept below the limit, in recent prediction-error standard deviations. The SLO bounds a
request's mean time per token, so the predictions must be right on average; the margin only absorbs
part of the spread."""


def keys_attended(num_tokens: int, start: int) -> int:
    """Keys the queries of window [start, start + num_tokens) attend to, summed (query i sees keys 0..i)."""
    return num_tokens * start + num_tokens * (num_tokens + 1) // 2


@dataclass(frozen=True)
class IterationShape:
    """What one iteration holds, as the cost model sees it."""

    decode_tokens: int = 0
    prefill_tokens: int = 0
    train_tokens: int = 0
    """Finetuning forward tokens."""
    backward_windows: tuple[tuple[int, float, int], ...] = ()
    """(tokens, share of the layers, first position) per backward window or layer window."""
    num_adapters: int = 0
    """Distinct adapters of the forward's rows."""

    @classmethod
    def of(cls, output) -> "IterationShape":
        """The shape of a SchedulerOutput (a one-token inference row counts as a decode)."""
        decode = prefill = train = 0
        adapters = set()
        for seq in output.sequences:
            if seq.is_training:
                train += seq.num_tokens
            elif seq.num_tokens == 1:
                decode += 1
            else:
                prefill += seq.num_tokens
            if seq.adapter is not None:
                adapters.add(seq.adapter)
        windows = tuple(part for w in output.backward_windows for part in w.parts)
        return cls(decode, prefill, train, windows, len(adapters))

    @property
    def is_empty(self) -> bool:
        return not (self.decode_tokens or self.prefill_tokens or self.train_tokens or self.backward_windows)


@dataclass
class CostModel:
    forward_base: float
    forward_per_token: float
    backward_base: float
    backward_per_token: float
    unit: str = "s"
    """"s" for a measured profile, "tokens" for the token-count model used without an SLO."""
    train_forward_per_token: float | None = None
    """Per-token cost of a finetuning forward token; None: as an inference token."""
    scale: float = 1.0
    """Factor applied to the profile before any iteration is observed (a loaded profile is rescaled
    by one measured forward at start-up)."""
    backward_per_key: float = 0.0
    """Backward cost per (window token x key it attends to): the attention part, which makes a window
    late in a sequence cost more than one at its start."""
    fit: LatencyFit | None = field(default=None, repr=False, compare=False)
    _fitted: list[float] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.forward_per_token <= 0 or self.backward_per_token <= 0:
            raise ValueError("per-token costs must be positive")
        if self.train_forward_per_token is not None and self.train_forward_per_token <= 0:
            raise ValueError("per-token costs must be positive")
        if self.backward_per_key < 0:
            raise ValueError("backward_per_key must not be negative")

    @classmethod
    def token_units(cls, backward_token_ratio: float = DEFAULT_BACKWARD_TOKEN_RATIO,
                    backward_base_tokens: float = 0.0, backward_per_key_tokens: float = 0.0) -> "CostModel":
        """Costs in forward tokens: a backward token costs `backward_token_ratio` of them, each
        backward window (through every layer) `backward_base_tokens` more, and each key a window's
        tokens attend to `backward_per_key_tokens`."""
        return cls(0.0, 1.0, backward_base_tokens, backward_token_ratio, unit="tokens",
                   backward_per_key=backward_per_key_tokens)

    def in_token_units(self) -> "CostModel":
        """This profile's backward in finetuning-forward-token units (for temporal turns)."""
        token = self.train_forward_per_token or self.forward_per_token
        return CostModel.token_units(self.backward_per_token / token, self.backward_base / token,
                                     self.backward_per_key / token)

    # ---- coefficients -------------------------------------------------------------------------

    def features(self, shape: IterationShape) -> list[float]:
        """The iteration's features, in FEATURES order. Backward work enters as its profiled cost
        (windows of the profile's shape: a fixed part, a per-token part and a per-key part), which
        the fit only rescales: layer windows make per-window and per-token counts move together,
        too close to tell apart online."""
        backward = sum(f * self._window_cost(n, start) for n, f, start in shape.backward_windows)
        return [0.0 if shape.is_empty else 1.0, float(shape.decode_tokens), float(shape.prefill_tokens),
                float(shape.train_tokens), float(backward), float(shape.num_adapters)]

    def prior(self) -> list[float]:
        """The profile's coefficients, in FEATURES order, times `scale`."""
        train = self.train_forward_per_token or self.forward_per_token
        raw = [self.forward_base, self.forward_per_token, self.forward_per_token, train, 1.0, 0.0]
        return [self.scale * c for c in raw]

    @property
    def coefficients(self) -> list[float]:
        """Current coefficients: the online fit's (per-token costs kept at >= a quarter of the
        profile's, so a noisy fit can never make work look free), or the prior before any fit."""
        return self.prior() if self._fitted is None else self._fitted

    def as_dict_ms(self) -> dict[str, float]:
        """Current coefficients by feature name, in ms (seconds models) or tokens; `backward` is a
        factor on the profiled backward cost."""
        factor = 1e3 if self.unit == "s" else 1.0
        return {name: round(c if name == "backward" else factor * c, 4) for name, c in zip(FEATURES, self.coefficients)}

    @property
    def margin(self) -> float:
        """Headroom the planner keeps below the limit (seconds models that have observed iterations)."""
        if self.fit is None:
            return 0.0
        return MARGIN_SIGMAS * self.fit.residual_std

    # ---- costs --------------------------------------------------------------------------------

    def predict(self, shape: IterationShape) -> float:
        return sum(c * x for c, x in zip(self.coefficients, self.features(shape)))

    @property
    def iteration_base(self) -> float:
        return self.coefficients[0]

    @property
    def adapter_cost(self) -> float:
        return self.coefficients[5]

    @property
    def prefill_token_cost(self) -> float:
        return self.coefficients[2]

    def train_forward_cost(self, num_tokens: int) -> float:
        """Marginal cost of `num_tokens` finetuning forward tokens (fixed and adapter costs apart)."""
        return self.coefficients[3] * num_tokens

    def _window_cost(self, num_tokens: int, start: int) -> float:
        """Profiled cost of a whole window of tokens [start, start + num_tokens)."""
        return (self.backward_base + self.backward_per_token * num_tokens
                + self.backward_per_key * keys_attended(num_tokens, start))

    def backward_cost(self, num_tokens: int, start: int = 0) -> float:
        """A whole window's marginal cost through every layer (a layer window pays its share)."""
        if not num_tokens:
            return 0.0
        return self.coefficients[4] * self._window_cost(num_tokens, start)

    def max_forward_tokens(self, limit: float) -> int:
        """Most prefill tokens an iteration may hold and stay within `limit`."""
        c = self.coefficients
        return max(0, int((limit - c[0]) / c[2]))

    def max_train_tokens(self, budget: float) -> int:
        """Most finetuning forward tokens `budget` pays for (marginal cost only)."""
        return max(0, int(budget / self.coefficients[3]))

    def max_backward_tokens(self, limit: float, end: int | None = None) -> int:
        """Most tokens one whole window ending at position `end` (None: a window at a sequence's
        start) may hold within `limit`, the window alone in its iteration."""
        c = self.coefficients
        budget = (limit - c[0]) / c[4]
        most = max(0, int((budget - self.backward_base) / self.backward_per_token))
        if self.backward_per_key == 0.0:
            return most if end is None else min(most, end)
        # The cost grows with the window's size and, ending at `end`, with the keys before it.
        low, high = 0, most if end is None else min(most, end)
        while low < high:
            mid = (low + high + 1) // 2
            start = 0 if end is None else end - mid
            if self._window_cost(mid, start) <= budget:
                low = mid
            else:
                high = mid - 1
        return low

    # ---- learning -----------------------------------------------------------------------------

    def observe(self, shape: IterationShape, seconds: float) -> None:
        """Fold one measured iteration into the fit (seconds models only)."""
        if self.unit != "s" or shape.is_empty:
            return
        if self.fit is None:
            self.fit = LatencyFit(self.prior(), FEATURE_SCALES)
        self.fit.observe(self.features(shape), seconds)
        # NOTE: clamped once here, not on every read: the planner reads them many times an iteration.
        self._fitted = [max(f, 0.25 * p) if p > 0 else max(f, 0.0) for f, p in zip(self.fit.coefficients, self.fit.prior)]

    # ---- persistence --------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The profile (the prior): the fit is live state and never saved."""
        raw = {"forward_base": self.forward_base, "forward_per_token": self.forward_per_token,
               "backward_base": self.backward_base, "backward_per_token": self.backward_per_token,
               "backward_per_key": self.backward_per_key, "unit": self.unit, "scale": self.scale}
        if self.train_forward_per_token is not None:
            raw["train_forward_per_token"] = self.train_forward_per_token
        return raw

    @classmethod
    def from_dict(cls, raw: dict) -> "CostModel":
        return cls(**{k: raw[k] for k in ("forward_base", "forward_per_token", "backward_base",
                                          "backward_per_token")}, unit=raw.get("unit", "s"),
                   train_forward_per_token=raw.get("train_forward_per_token"),
                   backward_per_key=raw.get("backward_per_key", 0.0))
