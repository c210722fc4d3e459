"""Per-request sampling settings, validated on construction.

Field names and defaults follow vLLM's `SamplingParams` so that code written
for vLLM's offline API reads the same here.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to pick each generated token and when to stop."""

    max_tokens: int = 16
    """Most tokens to generate (the prompt is not counted)."""
    temperature: float = 1.0
    """0 means greedy (argmax); larger values flatten the distribution."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 or -1 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability mass reaches top_p."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever the batch."""
    stop: list[str] | str | None = None
    """Strings that end generation; the stop string is not part of the output."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end generation (kept in the output, as EOS is)."""
    ignore_eos: bool = False
    """Keep generating past the tokenizer's EOS token."""
    logprobs: int | None = None
    """If set, return the sampled token's logprob and this many top alternatives."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(isinstance(self.temperature, (int, float)) and self.temperature >= 0.0,
               f"temperature must be >= 0, got {self.temperature!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               f"top_k must be 0, -1 (off) or a positive integer, got {self.top_k!r}")
        _check(isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0,
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(self.seed is None or isinstance(self.seed, int),
               f"seed must be an integer or None, got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop),
               f"stop must be non-empty strings, got {self.stop!r}")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
               f"logprobs must be None or an integer in [0, 20], got {self.logprobs!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
