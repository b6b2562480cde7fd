"""A streaming histogram over ``[-R, R]``, ``R = 2**exp``, that merges exactly.

Why this shape: calibration is streamed (batches) and data parallel (ranks), so the
statistic every range algorithm searches must be a small state whose merge equals the
histogram of the union of the data. Fixing the bin edges to ``-R + i * 2R/BINS`` with
``R`` a power of two makes growth exact: doubling ``R`` sums bin pairs into the middle
half of the new histogram, and a value's bin at ``2R`` is always the pair-merge of its
bin at ``R`` (the bin index is ``BINS/2 + floor(x * 2**(log2(BINS) - 1 - exp))``, an
exact product). So "batch A then B", "A and B in one pass" and "A and B on two ranks,
merged" give identical counts.

``BINS = 16384`` (int64 counts: 128 KiB). ``R`` is the first power of two strictly
above ``max|x|``, so the data cover at least half of one side: even one-sided (post-ReLU)
data span >= 4096 bins, i.e. >= 16 bins per step of the 255-step INT8 grid at the min-max
range. Range searches (percentile, entropy, MSE) therefore resolve a fraction of one
quantization step (2048 bins would give 2 bins per step there), while a state stays
within half of the ~256 KiB budget per observer. Exact min and max are tracked too (the
outermost occupied bins are clipped to the data), and so is the number of exact zeros:
post-ReLU tensors are often mostly zeros, which the INT8 grid represents exactly, and
smearing them over the bin ``[0, width)`` would bias the entropy and MSE searches.
"""
from __future__ import annotations

import math

import numpy as np

BINS = 16384
MIN_EXP = -20  # R >= 2**-20 (~1e-6): ranges that small are under the 255 * 1e-8 width floor
_CHUNK = 1 << 20  # bounded float64 scratch (8 MiB) when binning huge arrays


class Histogram:
    """Counts over ``BINS`` equal bins of ``[-2**exp, 2**exp)`` plus exact min/max."""

    def __init__(self, bins: int = BINS):
        if bins < 4 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 4, got {bins}")
        self.bins = bins
        self.exp: int | None = None
        self.counts = np.zeros(bins, np.int64)
        self.min, self.max = math.inf, -math.inf
        self.zeros = 0  # exact zeros (counted in bins // 2 as well)

    # -- properties -------------------------------------------------------------------
    @property
    def empty(self) -> bool:
        return self.exp is None

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def radius(self) -> float:
        return 2.0 ** self.exp

    @property
    def width(self) -> float:
        return 2.0 * self.radius / self.bins

    def edges(self) -> np.ndarray:
        """The ``bins + 1`` bin edges (float64)."""
        return -self.radius + self.width * np.arange(self.bins + 1, dtype=np.float64)

    # -- growth and binning -----------------------------------------------------------
    def _grow_to(self, exp: int) -> None:
        if self.exp is None:
            self.exp = exp
            return
        # after log2(bins) doublings everything sits in the two middle bins: stable
        steps = min(exp - self.exp, int(math.log2(self.bins)) + 1)
        q = self.bins // 4
        for _ in range(max(steps, 0)):
            merged = self.counts.reshape(-1, 2).sum(1)
            self.counts = np.zeros(self.bins, np.int64)
            self.counts[q:3 * q] = merged
        self.exp = max(self.exp, exp)

    def update(self, x) -> None:
        """Add the finite values of ``x`` (any shape; binned from float32)."""
        x = np.asarray(x)
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        x = x.reshape(-1)
        if not x.size:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN propagates through min/max
            x = x[np.isfinite(x)]
            if not x.size:
                return
            lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.zeros += int(np.count_nonzero(x == 0))
        amax = max(abs(self.min), abs(self.max))
        exp = max(math.frexp(amax)[1], MIN_EXP) if amax > 0 else MIN_EXP  # 2**exp > amax
        self._grow_to(exp)
        # index = bins/2 + floor(x * 2**(log2(bins)-1-exp)): x (float32) times a power of
        # two is exact in float64 (no underflow even for denormals), so binning is
        # consistent across exponents, which is what makes merges exact.
        scale = float(self.bins // 2) / 2.0 ** self.exp
        buf = np.empty(min(x.size, _CHUNK), np.float64)
        for i in range(0, x.size, _CHUNK):
            c = x[i:i + _CHUNK]
            y = np.multiply(c, scale, out=buf[:c.size], dtype=np.float64)
            np.floor(y, out=y)
            idx = y.astype(np.intp)
            idx += self.bins // 2
            self.counts += np.bincount(idx, minlength=self.bins)

    # -- state ------------------------------------------------------------------------
    def state(self) -> dict:
        """JSON-able state: only the occupied span of counts is stored."""
        if self.empty:
            return {"bins": self.bins, "exp": None}
        i0, i1 = self.span()
        return {"bins": self.bins, "exp": self.exp, "first": i0,
                "counts": self.counts[i0:i1 + 1].tolist(), "min": self.min, "max": self.max,
                "zeros": self.zeros}

    @classmethod
    def from_state(cls, state: dict) -> "Histogram":
        h = cls(int(state["bins"]))
        if state["exp"] is not None:
            h.exp = int(state["exp"])
            c = np.asarray(state["counts"], np.int64)
            i0 = int(state["first"])
            h.counts[i0:i0 + c.size] = c
            h.min, h.max = float(state["min"]), float(state["max"])
            h.zeros = int(state["zeros"])
        return h

    def merge(self, other: "Histogram | dict") -> None:
        """Add another histogram (or its state): exact, commutative, associative."""
        if isinstance(other, dict):
            other = Histogram.from_state(other)
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms of {other.bins} and {self.bins} bins")
        if other.empty:
            return
        counts = other.counts.copy()
        oexp = other.exp
        if self.exp is not None and self.exp > oexp:
            tmp = Histogram(self.bins)
            tmp.exp, tmp.counts = oexp, counts
            tmp._grow_to(self.exp)
            counts, oexp = tmp.counts, tmp.exp
        self._grow_to(oexp)
        self.counts += counts
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.zeros += other.zeros

    def copy(self) -> "Histogram":
        return Histogram.from_state(self.state())

    # -- queries ----------------------------------------------------------------------
    def span(self) -> tuple[int, int]:
        """First and last occupied bin."""
        nz = np.flatnonzero(self.counts)
        return int(nz[0]), int(nz[-1])

    def knots(self, nonzero: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(x, cdf, counts)`` of the occupied bins with outer edges clipped to min/max.

        The piecewise-linear CDF through ``(x, cdf)`` models values as uniform within a
        bin. ``x`` is strictly increasing unless all data are one value. ``nonzero``
        leaves the exact zeros out of the counts.
        """
        i0, i1 = self.span()
        x = self.edges()[i0:i1 + 2].copy()
        x[0], x[-1] = self.min, self.max
        c = self.counts[i0:i1 + 1].astype(np.float64)
        if nonzero and self.zeros:
            c[self.bins // 2 - i0] -= self.zeros
        cdf = np.concatenate(([0.0], np.cumsum(c)))
        return x, cdf, c

    def quantile(self, q: float) -> float:
        """Value below which a fraction ``q`` of the data lie (linear within a bin)."""
        if self.empty:
            raise ValueError("quantile of an empty histogram")
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile fraction must be in [0, 1], got {q}")
        x, cdf, c = self.knots()
        if x[-1] <= x[0]:
            return float(x[0])
        t = q * cdf[-1]
        i = int(np.clip(np.searchsorted(cdf, t, side="left"), 1, c.size))
        frac = (t - cdf[i - 1]) / c[i - 1] if c[i - 1] > 0 else 0.0
        return float(x[i - 1] + min(max(frac, 0.0), 1.0) * (x[i] - x[i - 1]))

    def __repr__(self):
        if self.empty:
            return f"Histogram(bins={self.bins}, empty)"
        return (f"Histogram(bins={self.bins}, R=2**{self.exp}, n={self.total}, "
                f"min={self.min:.4g}, max={self.max:.4g})")
