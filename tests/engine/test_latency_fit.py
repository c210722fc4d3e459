"""Online least squares behind the cost model: exact on clean data, prior where data is missing."""
import random

import pytest
import torch

from coserve.engine.latency_fit import LatencyFit, solve


def test_solve_matches_torch():
    rng = random.Random(0)
    matrix = [[rng.uniform(-1, 1) + (5.0 if i == j else 0.0) for j in range(6)] for i in range(6)]
    rhs = [rng.uniform(-1, 1) for _ in range(6)]
    want = torch.linalg.solve(torch.tensor(matrix, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64))
    assert solve(matrix, rhs) == pytest.approx(want.tolist(), abs=1e-12)
    with pytest.raises(ValueError, match="singular"):
        solve([[0.0, 0.0], [0.0, 0.0]], [1.0, 1.0])


def test_fit_recovers_the_true_coefficients_and_keeps_the_prior_where_nothing_was_seen():
    true = [0.02, 0.003, 0.001]
    fit = LatencyFit(prior=[0.01, 0.001, 0.005], feature_scales=[1.0, 8.0, 64.0], decay=0.99)
    rng = random.Random(0)
    for _ in range(400):
        x = [1.0, float(rng.randint(0, 16)), 0.0]          # the third feature never occurs
        fit.observe(x, sum(c * v for c, v in zip(true, x)))
    assert fit.coefficients[:2] == pytest.approx(true[:2], rel=0.02)
    assert fit.coefficients[2] == pytest.approx(0.005)      # untouched: the prior
    assert fit.residual_std < 0.002


def test_forgetting_follows_a_change_of_machine_speed():
    fit = LatencyFit(prior=[0.0, 0.001], feature_scales=[1.0, 64.0])
    rng = random.Random(0)
    for slope in (0.001, 0.003):                            # the machine gets 3x slower
        for _ in range(150):
            x = [1.0, float(rng.randint(1, 64))]
            fit.observe(x, slope * x[1])
        # Within 10%: the ridge toward the prior pulls a little, the old speed is forgotten.
        assert fit.coefficients[1] == pytest.approx(slope, rel=0.1)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="decay"):
        LatencyFit([0.0], [1.0], decay=0.0)
    with pytest.raises(ValueError, match="prior"):
        LatencyFit([0.0, 1.0], [1.0])
