"""Sampler: greedy and filtered sampling, seeded reproducibility across batches, logprobs."""
from __future__ import annotations

import torch

from coserve.engine.sampler import Sampler, apply_top_k_top_p, make_generator
from coserve.sampling_params import SamplingParams

VOCAB = 64


def _logits(num_rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(num_rows, vocab, generator=make_generator(seed, "cpu")) * 3


def _sample(logits, params, generators=None, seed=0):
    sampler = Sampler(default_generator=make_generator(seed, "cpu"))
    return sampler(logits, params, generators or [None] * len(params))


def test_greedy_is_argmax():
    logits = _logits(5)
    out = _sample(logits, [SamplingParams(temperature=0.0)] * 5)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 5


def test_top_k_1_and_tiny_top_p_equal_greedy():
    logits = _logits(6, seed=1)
    greedy = logits.argmax(-1).tolist()
    for params in (SamplingParams(temperature=1.5, top_k=1),
                   SamplingParams(temperature=1.5, top_p=1e-6)):
        for seed in range(3):
            assert _sample(logits, [params] * 6, seed=seed).token_ids == greedy


def test_mixed_batch_keeps_greedy_rows_greedy():
    logits = _logits(4, seed=2)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=3)]
    out = _sample(logits, params)
    assert out.token_ids[0] == logits[0].argmax().item()
    assert out.token_ids[2] == logits[2].argmax().item()
    assert out.token_ids[3] in logits[3].topk(3).indices.tolist()


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


def test_temperature_frequencies_follow_softmax():
    # 20,000 draws on a 5-token vocab in one call. With df=4 the chi-square
    # 0.999 quantile is 18.47; the seed is fixed, so this is not flaky.
    base = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.5])
    num_draws, temperature = 20_000, 0.7
    params = [SamplingParams(temperature=temperature)] * num_draws
    out = _sample(base.repeat(num_draws, 1), params)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=5).float()
    assert _chi_square(counts, torch.softmax(base / temperature, -1)) < 18.47


def test_top_k_and_top_p_frequencies_follow_renormalised_softmax():
    base = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0])
    probs = torch.softmax(base, -1)  # ~[0.48, 0.29, 0.18, 0.06, 0.02]
    num_draws = 10_000
    # top_k=2 keeps tokens 0-1; top_p=0.7 keeps 0-1 too (mass before token 2 is 0.77).
    for params in (SamplingParams(top_k=2), SamplingParams(top_p=0.7),
                   SamplingParams(top_k=3, top_p=0.7)):
        out = _sample(base.repeat(num_draws, 1), [params] * num_draws, seed=3)
        counts = torch.bincount(torch.tensor(out.token_ids), minlength=5).float()
        assert counts[2:].sum() == 0
        expected = torch.cat([probs[:2] / probs[:2].sum(), torch.zeros(3)])
        assert _chi_square(counts, expected) < 10.83  # df=1, 0.999 quantile


def test_apply_top_k_top_p_keeps_exact_sets_per_row():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    out = apply_top_k_top_p(logits, top_k=[2, 0, 0], top_p=[1.0, 1.0, 0.5])
    assert torch.isfinite(out).tolist() == [[False, True, False, True],
                                            [True, True, True, True],
                                            [True, False, False, False]]
    assert torch.equal(out[1], logits[1])


def _seeded_run(row_logits, params, seed, batch_layouts):
    """Sample a seeded row for each step inside a differently built batch each time."""
    generator = make_generator(seed, "cpu")
    sampler = Sampler(default_generator=make_generator(99, "cpu"))
    tokens = []
    for step, (num_others, position) in enumerate(batch_layouts):
        others = _logits(num_others, seed=1000 + step, vocab=row_logits.shape[1])
        rows = list(others)
        rows.insert(position, row_logits[step])
        # Other rows: unseeded, seeded with their own generators, greedy.
        other_params = [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=0.0),
                        SamplingParams(temperature=1.3, seed=5)]
        batch_params = [other_params[i % 3] for i in range(num_others)]
        batch_gens = [make_generator(7 + i, "cpu") if p.seed is not None else None
                      for i, p in enumerate(batch_params)]
        batch_params.insert(position, params)
        batch_gens.insert(position, generator)
        out = sampler(torch.stack(rows), batch_params, batch_gens)
        tokens.append(out.token_ids[position])
    return tokens


def test_seeded_row_is_independent_of_batch_size_and_order():
    num_steps = 12
    row_logits = torch.randn(num_steps, 512, generator=make_generator(4, "cpu"))  # high entropy
    for params in (SamplingParams(temperature=1.0, seed=123),
                   SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=123)):
        alone = _seeded_run(row_logits, params, 123, [(0, 0)] * num_steps)
        layouts = [((step * 5) % 9, (step * 3) % ((step * 5) % 9 + 1)) for step in range(num_steps)]
        assert _seeded_run(row_logits, params, 123, layouts) == alone
        reversed_layouts = [(n, n - pos) for n, pos in layouts]
        assert _seeded_run(row_logits, params, 123, reversed_layouts) == alone
        assert _seeded_run(row_logits, params, 124, [(0, 0)] * num_steps) != alone


def test_logprobs_are_raw_log_softmax():
    logits = _logits(3, seed=5)
    params = [SamplingParams(temperature=0.5, logprobs=5), SamplingParams(temperature=0.0, logprobs=0),
              SamplingParams(temperature=2.0)]
    out = _sample(logits, params)
    expected = torch.log_softmax(logits, -1)  # before temperature, as vLLM returns by default
    first, second = out.logprobs[0], out.logprobs[1]
    assert first["token_logprob"] == expected[0, out.token_ids[0]].item()
    top_values, top_ids = expected[0].topk(5)
    assert list(first["top"].keys()) == top_ids.tolist()
    assert list(first["top"].values()) == top_values.tolist()
    assert second == {"token_logprob": expected[1].max().item(), "top": {}}
    assert out.logprobs[2] is None


def test_half_precision_logits():
    logits = _logits(3, seed=6).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=1.0, seed=1),
              SamplingParams(temperature=0.7, top_k=4)]
    out = _sample(logits, params, [None, make_generator(1, "cpu"), None])
    assert out.token_ids[0] == logits[0].float().argmax().item()
    assert out.token_ids[2] in logits[2].float().topk(4).indices.tolist()
