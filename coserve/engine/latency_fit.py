"""Online least squares: iteration latency as a linear function of its features.

Recent iterations weigh most (exponential forgetting), and a ridge term pulls
every coefficient toward its prior (the start-up profile), so a feature that
has not been seen for a while falls back to the profile instead of drifting.
In feature units scaled by each feature's typical size, the prior counts as
`prior_weight` observations. Pure Python: a handful of features, solved
exactly after each observation.
"""
from __future__ import annotations

import math
from typing import Sequence


def solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """x with matrix @ x = rhs (Gaussian elimination with partial pivoting; matrix is small and regular)."""
    n = len(rhs)
    a = [row[:] + [rhs[i]] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if a[pivot][col] == 0.0:
            raise ValueError("singular system")
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            factor = a[r][col] / a[col][col]
            if factor:
                for c in range(col, n + 1):
                    a[r][c] -= factor * a[col][c]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (a[r][n] - sum(a[r][c] * x[c] for c in range(r + 1, n))) / a[r][r]
    return x


class LatencyFit:
    """Ridge regression with forgetting, refitted after every observation."""

    def __init__(self, prior: Sequence[float], feature_scales: Sequence[float], decay: float = 0.98,
                 prior_weight: float = 0.5) -> None:
        if len(prior) != len(feature_scales):
            raise ValueError("one prior coefficient per feature scale")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.prior = [float(p) for p in prior]
        self.decay = decay
        n = len(self.prior)
        self._ridge = [prior_weight * float(s) ** 2 for s in feature_scales]
        self._xtx = [[0.0] * n for _ in range(n)]
        self._xty = [0.0] * n
        self._sq_residual = 0.0   # decayed sum of squared one-step-ahead residuals
        self._weight = 0.0        # decayed number of observations
        self.coefficients = list(self.prior)

    @property
    def num_observations(self) -> float:
        """Decayed count of observations the fit rests on."""
        return self._weight

    @property
    def residual_std(self) -> float:
        """Root mean square of recent prediction errors (each made before its observation)."""
        return math.sqrt(self._sq_residual / self._weight) if self._weight > 0 else 0.0

    def predict(self, features: Sequence[float]) -> float:
        return sum(c * x for c, x in zip(self.coefficients, features))

    def observe(self, features: Sequence[float], value: float) -> None:
        error = value - self.predict(features)
        d = self.decay
        self._sq_residual = d * self._sq_residual + error * error
        self._weight = d * self._weight + 1.0
        n = len(self.prior)
        for i in range(n):
            xi = features[i]
            row = self._xtx[i]
            for j in range(n):
                row[j] = d * row[j] + xi * features[j]
            self._xty[i] = d * self._xty[i] + xi * value
        matrix = [[self._xtx[i][j] + (self._ridge[i] if i == j else 0.0) for j in range(n)] for i in range(n)]
        rhs = [self._xty[i] + self._ridge[i] * self.prior[i] for i in range(n)]
        self.coefficients = solve(matrix, rhs)
