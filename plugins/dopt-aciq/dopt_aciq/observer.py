"""ACIQ: analytical clipping from a fitted Laplace or Gaussian (Banner, Nahshan & Soudry
2019, "Post training 4-bit quantization of convolutional networks for rapid-deployment").

Why: instead of searching a histogram, fit the distribution from a few moments and take
the clipping value ``alpha`` that minimizes the modelled quantization MSE, clipping
noise plus rounding noise. With ``L = 255`` steps and ``t = alpha / b``:

* Laplace(mu, b), range ``mu +- alpha``: ``2 b^2 e^-t + (2 alpha / L)^2 / 12``;
* one-sided (post-ReLU, exponential tail), range ``[0, alpha]``: ``2 b^2 e^-t + (alpha / L)^2 / 12``;
* Gaussian(mu, sigma): clipping ``2 sigma^2 ((1 + t^2) Q(t) - t phi(t))``, same rounding terms.

The optimum ``t*`` is scale free (two-sided Laplace: 9.89, Gaussian: 3.92, as in the
paper's table for 8 bits). The state is a handful of sums (count, sum, sum of |x| and
of x^2, signs, min, max), so it merges exactly up to float64 rounding and its size does
not depend on the data. The plugin imports nothing from dopt.
"""
from __future__ import annotations

import math
from functools import lru_cache, partial

import numpy as np

LEVELS = 255               # steps of dopt's asymmetric INT8 activation grid
MIN_WIDTH = LEVELS * 1e-8  # dopt.quant.numerics.MIN_SCALE * 255: narrower ranges are all alike
DISTRIBUTIONS = ("laplace", "gauss")


def _clip_noise(dist: str, t: float) -> float:
    """Clipping MSE of both tails (two-sided) or of the one tail (one-sided), per b^2."""
    if dist == "laplace":
        return 2.0 * math.exp(-t)
    q = 0.5 * math.erfc(t / math.sqrt(2.0))
    pdf = math.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
    return 2.0 * ((1.0 + t * t) * q - t * pdf)


@lru_cache(maxsize=None)
def optimal_clip(dist: str = "laplace", one_sided: bool = False, levels: int = LEVELS) -> float:
    """``t* = alpha / b`` (Laplace) or ``alpha / sigma`` (Gaussian) minimizing the MSE."""
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {dist!r}")
    width = 1.0 if one_sided else 2.0   # range width in units of alpha

    def mse(t):
        return _clip_noise(dist, t) + (width * t / levels) ** 2 / 12.0

    a, b = 0.1, 60.0                    # golden section: the MSE is unimodal in t
    g = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(200):
        c, d = b - g * (b - a), a + g * (b - a)
        if mse(c) < mse(d):
            b = d
        else:
            a = c
    return (a + b) / 2.0


def _laplace_scale(mean_abs: float, mu: float) -> float:
    """``b`` of Laplace(mu, b) from E|X| = |mu| + b exp(-|mu| / b) (increasing in b)."""
    m = abs(mu)
    lo, hi = 0.0, max(mean_abs, 1e-300)
    if mean_abs <= m:
        return 0.0
    for _ in range(200):
        b = (lo + hi) / 2.0
        if m + b * math.exp(-m / b) < mean_abs:
            lo = b
        else:
            hi = b
    return (lo + hi) / 2.0


class ACIQObserver:
    """Range from a Laplace (default) or Gaussian fit and ACIQ's optimal clipping."""

    name = "aciq"

    def __init__(self, distribution: str = "laplace"):
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, "
                             f"got {distribution!r}")
        self.distribution = distribution
        self.n = self.n_pos = self.n_neg = 0
        self.sum = self.sum_abs = self.sum_sq = 0.0
        self.lo, self.hi = math.inf, -math.inf

    @property
    def empty(self) -> bool:
        return self.n == 0

    def update(self, x) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        if x.size and not np.isfinite(x).all():
            x = x[np.isfinite(x)]
        if not x.size:
            return
        self.n += int(x.size)
        self.n_pos += int(np.count_nonzero(x > 0))
        self.n_neg += int(np.count_nonzero(x < 0))
        self.sum += float(np.sum(x, dtype=np.float64))
        self.sum_abs += float(np.sum(np.abs(x), dtype=np.float64))
        self.sum_sq += float(np.dot(x.astype(np.float64), x.astype(np.float64)))
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))

    _FIELDS = ("n", "n_pos", "n_neg", "sum", "sum_abs", "sum_sq", "lo", "hi")

    def state(self) -> dict:
        return {k: getattr(self, k) for k in self._FIELDS}

    def merge(self, state: dict) -> None:
        for k in ("n", "n_pos", "n_neg"):
            setattr(self, k, getattr(self, k) + int(state[k]))
        for k in ("sum", "sum_abs", "sum_sq"):
            setattr(self, k, getattr(self, k) + float(state[k]))
        self.lo = min(self.lo, float(state["lo"]))
        self.hi = max(self.hi, float(state["hi"]))

    def _alpha(self, one_sided: bool) -> tuple[float, float]:
        """(centre, alpha) of the fitted distribution."""
        t = optimal_clip(self.distribution, one_sided)
        if one_sided:  # fit the non-zero side only: exact zeros are free on the grid
            k = max(self.n_pos if self.hi > 0 else self.n_neg, 1)
            scale = (self.sum_abs / k if self.distribution == "laplace"
                     else math.sqrt(self.sum_sq / k))
            return 0.0, t * scale
        mu = self.sum / self.n
        if self.distribution == "laplace":
            scale = _laplace_scale(self.sum_abs / self.n, mu)
        else:
            scale = math.sqrt(max(self.sum_sq / self.n - mu * mu, 0.0))
        return mu, t * scale

    def range(self) -> tuple[float, float]:
        if self.empty:
            raise ValueError("aciq observer has seen no finite data")
        if self.lo >= 0 or self.hi <= 0:
            _, alpha = self._alpha(one_sided=True)
            lo, hi = (0.0, min(alpha, self.hi)) if self.hi > 0 else (max(-alpha, self.lo), 0.0)
        else:
            mu, alpha = self._alpha(one_sided=False)
            lo, hi = max(mu - alpha, self.lo), min(mu + alpha, self.hi)
        lo, hi = min(lo, 0.0) + 0.0, max(hi, 0.0) + 0.0   # the grid contains 0
        if hi - lo < MIN_WIDTH:
            hi = lo + MIN_WIDTH
        return float(lo), float(hi)


ALGORITHMS = {"aciq": ACIQObserver,
              "aciq_gauss": partial(ACIQObserver, "gauss")}
