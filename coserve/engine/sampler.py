"""Turns one batch of logits into next tokens, one `SamplingParams` per row.

Greedy rows take an argmax together. Random rows are scaled by temperature,
filtered by top-k then top-p in one sorted pass, and sampled with the
exponential race `argmax(probs / q)`, `q ~ Exp(1)`: each seeded row draws `q`
from its own generator, so its token depends on nothing else in the batch.
Logprobs come from the raw model distribution (before temperature), as vLLM
returns them by default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from coserve.sampling_params import SamplingParams


@dataclass
class SamplerOutput:
    token_ids: list[int]
    """One sampled token per logits row."""
    logprobs: list[dict | None]
    """Per row: None, or {"token_logprob": float, "top": {token_id: logprob}} with
    params.logprobs entries in "top" (most likely first)."""


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """The generator a seeded request keeps for its whole life (create it once)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class Sampler:
    """Stateless apart from the generator shared by rows that bring none."""

    def __init__(self, default_generator: torch.Generator | None = None) -> None:
        # NOTE: None means torch's global RNG, which is what unseeded vLLM
        # requests use; tests pass a seeded generator to get fixed draws.
        self.default_generator = default_generator

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> SamplerOutput:
        """Sample one token per row.

        Args:
            logits: [num_rows, vocab] raw model logits (any float dtype).
            params: one SamplingParams per row.
            generators: per row, the request's own generator (seeded requests)
                or None to use the shared default generator.
        """
        num_rows = logits.shape[0]
        if len(params) != num_rows or len(generators) != num_rows:
            raise ValueError(f"got {num_rows} logits rows, {len(params)} params "
                             f"and {len(generators)} generators; they must match")
        greedy_rows = [i for i, p in enumerate(params) if p.is_greedy]
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]

        if not random_rows:
            token_ids = logits.argmax(dim=-1)
        elif not greedy_rows:
            token_ids = self._sample(logits, params, generators)
        else:
            token_ids = torch.empty(num_rows, dtype=torch.long, device=logits.device)
            greedy_idx = _index(greedy_rows, logits.device)
            random_idx = _index(random_rows, logits.device)
            token_ids[greedy_idx] = logits[greedy_idx].argmax(dim=-1)
            token_ids[random_idx] = self._sample(
                logits[random_idx],
                [params[i] for i in random_rows],
                [generators[i] for i in random_rows])
        return SamplerOutput(token_ids.tolist(), _logprobs(logits, params, token_ids))

    def _sample(self, logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> torch.Tensor:
        """Temperature, top-k, top-p, then the exponential race; returns [n] ids."""
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params],
                                   dtype=torch.float32, device=device)
        scaled = logits.float() / temperature.unsqueeze(1)  # [n, vocab], a new tensor
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            scaled = apply_top_k_top_p(scaled, [p.top_k for p in params],
                                       [p.top_p for p in params])
        probs = scaled.softmax(dim=-1)
        noise = torch.empty_like(probs)  # [n, vocab]
        if any(g is None for g in generators):
            # NOTE: one draw for the whole batch; seeded rows are overwritten
            # below, so the unseeded rows never shift a seeded row's stream.
            noise.exponential_(generator=self.default_generator)
        for row, generator in enumerate(generators):
            if generator is not None:
                noise[row].exponential_(generator=generator)
        # NOTE: Exp(1) can return exactly 0; clamping keeps 0 / 0 (a filtered
        # token) from turning into a NaN that argmax would pick.
        noise.clamp_min_(torch.finfo(noise.dtype).tiny)
        return probs.div_(noise).argmax(dim=-1)


def apply_top_k_top_p(logits: torch.Tensor, top_k: list[int],
                      top_p: list[float]) -> torch.Tensor:
    """Set logits outside each row's top-k, then outside its top-p mass, to -inf.

    Args:
        logits: [n, vocab] temperature-scaled float logits (not modified).
        top_k: per row, 0 for off. top_p: per row, 1.0 for off.
    Returns:
        [n, vocab] filtered logits. Each row keeps at least its top token.
    """
    num_rows, vocab = logits.shape
    device = logits.device
    # NOTE: stable sort so equal logits keep index order, as argmax does; then
    # top_k=1 and a tiny top_p both reduce to greedy exactly.
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    positions = torch.arange(vocab, device=device)
    if any(k > 0 for k in top_k):
        k = torch.tensor([k if k > 0 else vocab for k in top_k], device=device)
        sorted_logits.masked_fill_(positions >= k.unsqueeze(1), float("-inf"))
    if any(p < 1.0 for p in top_p):
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # [n, vocab], exclusive prefix sum
        # NOTE: rows with top_p == 1 get an unreachable threshold, because the
        # float cumsum can round to >= 1.0 and would cut the tail.
        p = torch.tensor([p if p < 1.0 else float("inf") for p in top_p],
                         dtype=torch.float32, device=device)
        sorted_logits.masked_fill_(mass_before >= p.unsqueeze(1), float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _logprobs(logits: torch.Tensor, params: list[SamplingParams],
              token_ids: torch.Tensor) -> list[dict | None]:
    """Raw-distribution logprobs of the sampled token and the top-k, per asking row."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    result: list[dict | None] = [None] * len(params)
    if not rows:
        return result
    if len(rows) < len(params):
        idx = _index(rows, logits.device)
        logits, token_ids = logits[idx], token_ids[idx]
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [len(rows), vocab]
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1).tolist()
    max_k = min(max(params[i].logprobs for i in rows), logprobs.shape[1])
    if max_k:
        top_values, top_ids = (t.tolist() for t in logprobs.topk(max_k, dim=-1))
    else:
        top_values = top_ids = [[] for _ in rows]
    for j, row in enumerate(rows):
        k = params[row].logprobs
        result[row] = {"token_logprob": chosen[j],
                       "top": dict(zip(top_ids[j][:k], top_values[j][:k]))}
    return result


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)
