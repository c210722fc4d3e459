"""Predicted iteration latency from token counts by kind, and the budget it implies.

A linear model fitted to measurements (`coserve/engine/profiler.py`): an
iteration with forward tokens costs `forward_base + forward_per_token * n`,
and each backward window adds `backward_base + backward_per_token * n`.
Without an SLO the same model is used in token units (a forward token costs 1,
a backward token its measured ratio), with `max_num_batched_tokens` as limit.
With an SLO, `observe` corrects the profile online: every iteration's measured
latency updates `scale`, the factor between measured and profiled cost, rising
fast and falling slowly, so a profile taken under other conditions (decode-heavy
batches, another process on the cores) cannot make iterations overrun the SLO
for long. Pure Python: the scheduler plans with it and tests build it by hand.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

# A backward token recomputes the layer forward and runs its backward, but a forward token of
# finetuning also pays the vocabulary projection's forward and gradient: measured on bench-small,
# a backward token costs about 1.0 to 1.5 forward tokens.
DEFAULT_BACKWARD_TOKEN_RATIO = 1.5
MIN_SCALE, MAX_SCALE = 1.0 / 16, 16.0
"""How far measured latency may be from the profile: a profile taken while other work shared the
cores can be many times too slow, and one taken on an idle machine too fast under load."""


@dataclass
class CostModel:
    forward_base: float
    forward_per_token: float
    backward_base: float
    backward_per_token: float
    unit: str = "s"
    """"s" for a measured profile, "tokens" for the token-count model used without an SLO."""
    scale: float = 1.0
    """Measured over profiled latency, learned online by `observe` (1.0 in token units)."""

    def __post_init__(self) -> None:
        if self.forward_per_token <= 0 or self.backward_per_token <= 0:
            raise ValueError("per-token costs must be positive")

    @classmethod
    def token_units(cls, backward_token_ratio: float = DEFAULT_BACKWARD_TOKEN_RATIO) -> "CostModel":
        return cls(0.0, 1.0, 0.0, backward_token_ratio, unit="tokens")

    def forward_cost(self, num_tokens: int) -> float:
        return self.scale * (self.forward_base + self.forward_per_token * num_tokens) if num_tokens else 0.0

    def backward_cost(self, num_tokens: int) -> float:
        return self.scale * (self.backward_base + self.backward_per_token * num_tokens) if num_tokens else 0.0

    def predict(self, num_forward_tokens: int, backward_windows: list = ()) -> float:
        """backward_windows: token counts, or (tokens, share of the layers) for layer windows."""
        return self.forward_cost(num_forward_tokens) + sum(
            w[1] * self.backward_cost(w[0]) if isinstance(w, tuple) else self.backward_cost(w) for w in backward_windows)

    def max_forward_tokens(self, limit: float) -> int:
        """Most forward tokens an iteration may hold and stay within `limit`."""
        return max(0, int((limit / self.scale - self.forward_base) / self.forward_per_token))

    def max_backward_tokens(self, limit: float) -> int:
        """Most tokens one backward window may hold within `limit`."""
        return max(0, int((limit / self.scale - self.backward_base) / self.backward_per_token))

    def observe(self, num_forward_tokens: int, backward_windows: list, seconds: float) -> None:
        """Fold one measured iteration into `scale` (seconds models only)."""
        if self.unit != "s":
            return
        profiled = self.predict(num_forward_tokens, backward_windows) / self.scale
        if profiled <= 0:
            return
        ratio = min(MAX_SCALE, max(MIN_SCALE, seconds / profiled))
        # Up quickly (an overrun costs SLO misses), down slowly (one fast iteration proves little).
        weight = 0.5 if ratio > self.scale else 0.05
        self.scale += weight * (ratio - self.scale)

    def to_dict(self) -> dict:
        return asdict(self)   # the profile; `scale` is shown, never loaded back

    @classmethod
    def from_dict(cls, raw: dict) -> "CostModel":
        return cls(**{k: raw[k] for k in ("forward_base", "forward_per_token", "backward_base",
                                          "backward_per_token")}, unit=raw.get("unit", "s"))
