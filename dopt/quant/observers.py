"""Activation-range observers: streaming, bounded memory, mergeable.

An observer sees batches (NumPy arrays), keeps a small state and yields a range
``(lo, hi)``. States merge: across batches (implicitly) and across processes
(``merge``), so data-parallel calibration gives the same range as one process
that saw all the data. New algorithms arrive through the ``dopt_range_algorithms``
hook (see ``plugins/``).

``minmax`` and ``ema_minmax`` keep two numbers. ``percentile``, ``entropy`` and ``mse``
share one exactly mergeable histogram (``dopt.quant.histogram``) and differ only in how they
pick ``(lo, hi)`` from it when ``range()`` is called; ``docs/calibration.md`` has the
formulas. Every histogram-based range contains 0 (the INT8 grid does anyway: see
``numerics.activation_qparams``) and is at least ``255 * MIN_SCALE`` wide.
"""
from __future__ import annotations

import math

import numpy as np

from .histogram import Histogram
from .numerics import ACT_LEVELS, ACT_QMAX, ACT_QMIN, MIN_SCALE, activation_qparams


class RangeObserver:
    """Protocol every range algorithm implements."""

    name = "base"

    def update(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def state(self) -> dict:
        raise NotImplementedError

    def merge(self, state: dict) -> None:
        raise NotImplementedError

    def range(self) -> tuple[float, float]:
        raise NotImplementedError

    @property
    def empty(self) -> bool:
        raise NotImplementedError


class MinMaxObserver(RangeObserver):
    """Global min and max: the reference tool's calibration."""

    name = "minmax"

    def __init__(self):
        self.lo, self.hi = np.inf, -np.inf

    def update(self, x):
        x = np.asarray(x)
        if x.size:
            self.lo = min(self.lo, float(x.min()))
            self.hi = max(self.hi, float(x.max()))

    def state(self):
        return {"lo": self.lo, "hi": self.hi}

    def merge(self, state):
        self.lo = min(self.lo, float(state["lo"]))
        self.hi = max(self.hi, float(state["hi"]))

    def range(self):
        return float(self.lo), float(self.hi)

    @property
    def empty(self):
        return not np.isfinite(self.lo)


class MovingAverageMinMaxObserver(RangeObserver):
    """Exponential moving average of per-batch min/max (robust to rare outliers).

    Merging averages the processes' averages (weighted by batches seen), which is
    exact when all ranks see the same number of batches.
    """

    name = "ema_minmax"

    def __init__(self, momentum: float = 0.9):
        self.momentum = momentum
        self.lo = self.hi = None
        self.count = 0

    def update(self, x):
        x = np.asarray(x)
        if not x.size:
            return
        lo, hi = float(x.min()), float(x.max())
        if self.count == 0:
            self.lo, self.hi = lo, hi
        else:
            m = self.momentum
            self.lo = m * self.lo + (1 - m) * lo
            self.hi = m * self.hi + (1 - m) * hi
        self.count += 1

    def state(self):
        return {"lo": self.lo, "hi": self.hi, "count": self.count}

    def merge(self, state):
        n = int(state["count"])
        if n == 0:
            return
        if self.count == 0:
            self.lo, self.hi, self.count = state["lo"], state["hi"], n
            return
        tot = self.count + n
        self.lo = (self.lo * self.count + state["lo"] * n) / tot
        self.hi = (self.hi * self.count + state["hi"] * n) / tot
        self.count = tot

    def range(self):
        return float(self.lo), float(self.hi)

    @property
    def empty(self):
        return self.count == 0


class HistogramObserver(RangeObserver):
    """Base of the histogram-based observers: the state is a ``Histogram``."""

    name = "histogram"

    def __init__(self):
        self.hist = Histogram()

    def update(self, x):
        self.hist.update(x)

    def state(self):
        return self.hist.state()

    def merge(self, state):
        self.hist.merge(state)

    @property
    def empty(self):
        return self.hist.empty

    def range(self):
        if self.empty:
            raise ValueError(f"{self.name} observer has seen no finite data")
        h = self.hist
        if h.min == h.max:  # constant tensor: nothing to search
            return _finalize(h.min, h.max)
        return _finalize(*self._select(h))

    def _select(self, h: Histogram) -> tuple[float, float]:
        raise NotImplementedError


class PercentileObserver(HistogramObserver):
    """Clip ``(100 - percentile)`` % of the values on each side.

    Cheap and robust to a few extreme outliers, but blind to what the clipped tail
    costs; the quantiles are read off the histogram's piecewise-linear CDF.
    """

    name = "percentile"

    def __init__(self, percentile: float = 99.99):
        if not 50.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        super().__init__()
        self.percentile = float(percentile)

    def _select(self, h):
        tail = (100.0 - self.percentile) / 100.0
        return h.quantile(tail), h.quantile(1.0 - tail)


class EntropyObserver(HistogramObserver):
    """Minimum KL divergence between the data and its quantized histogram (TensorRT).

    TensorRT searches a symmetric threshold; our grid is asymmetric, so the search is
    over ``[lo, hi]`` pairs (coordinate descent over shrink factors of min and max),
    one-sided when the data have one sign. For a candidate the histogram is resampled
    to ``SUB`` sub-bins per step of the actual grid (``activation_qparams``), clipped
    mass is added to the outermost sub-bins (P), and Q spreads each step's mass evenly
    over its non-empty sub-bins. KL(P || Q) is blind to magnitudes: it clips more
    aggressively than ``mse``, and squeezing all data into the top step costs it nothing,
    so candidates that clip more than ``MAX_CLIPPED`` of the data are rejected. Exact
    zeros are left out (the grid holds 0 exactly).
    """

    name = "entropy"
    SUB = 8

    def _select(self, h):
        x, cdf, _ = h.knots(nonzero=True)
        if cdf[-1] <= 0 or x[-1] <= x[0]:
            return h.min, h.max
        cost = lambda lo, hi: _kl_cost(x, cdf, lo, hi, self.SUB)  # noqa: E731
        return _search_range(h, cost, cost)


class MSEObserver(HistogramObserver):
    """Minimum expected squared quantization error over the histogram.

    For a candidate ``[lo, hi]`` the error is integrated exactly for values uniform
    within each bin, against the actual INT8 grid of ``activation_qparams`` (step ``s``,
    grid ``[lo_g, hi_g]``): rounding error ``(x - s * rint(x / s))**2`` inside, clipping
    error ``(x - lo_g)**2`` / ``(x - hi_g)**2`` outside. The search (coordinate descent over
    shrink factors of min and max) runs on a histogram coarsened to <= 2048 bins, then
    refines on the full one.
    """

    name = "mse"
    COARSE_BINS = 2048

    def _select(self, h):
        x, _, c = h.knots(nonzero=True)
        n = float(h.total)
        if c.sum() <= 0:
            return h.min, h.max
        xc, cc = _coarsen(x, c, self.COARSE_BINS)
        coarse = lambda lo, hi: _mse_cost(xc, cc, lo, hi) / n  # noqa: E731
        fine = lambda lo, hi: _mse_cost(x, c, lo, hi) / n  # noqa: E731
        return _search_range(h, coarse, fine)


def expected_mse(hist: Histogram, lo: float, hi: float) -> float:
    """Mean squared INT8 error of quantizing the histogram's data with range ``[lo, hi]``.

    The ``mse`` objective: values uniform within a bin, exact zeros cost nothing.
    """
    if hist.empty:
        raise ValueError("expected_mse of an empty histogram")
    x, _, c = hist.knots(nonzero=True)
    return float(_mse_cost(x, c, np.array([lo]), np.array([hi]))[0]) / hist.total


# -- range search ---------------------------------------------------------------------
MIN_WIDTH = ACT_LEVELS * MIN_SCALE  # narrower ranges all give the floor scale
_PER_OCTAVE = 8                      # shrink-factor resolution: 2**(1/8) ~ 9 %
_MIN_SHRINK = 2.0 ** -12             # never shrink a side below this fraction
_MIN_BINS = 32                       # ... nor below this many histogram bins
_ROUNDS = 4                          # coordinate-descent rounds (converge in 2-3)
_CACHE_ELEMS = 1 << 15               # float64 elements per temporary in the searches
MAX_CLIPPED = 0.01                   # entropy: clip at most 1 % of the (nonzero) data


def _finalize(lo, hi) -> tuple[float, float]:
    """Contain 0 (as the grid does) and never be degenerate."""
    lo, hi = min(float(lo), 0.0) + 0.0, max(float(hi), 0.0) + 0.0  # (+ 0.0: no -0.0)
    if hi - lo < MIN_WIDTH:
        if hi > 0 or lo == 0:
            hi = lo + MIN_WIDTH
        else:
            lo = hi - MIN_WIDTH
    return lo, hi


def grid_of(lo, hi) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scale, lo_g, hi_g)`` of the INT8 grid each candidate range gets (float64)."""
    qp = [activation_qparams(a, b) for a, b in zip(np.atleast_1d(lo), np.atleast_1d(hi))]
    s = np.array([p[0] for p in qp], np.float64)
    o = np.array([p[1] for p in qp], np.float64)
    return s, (ACT_QMIN - o) * s, (ACT_QMAX - o) * s


def _coarsen(x, c, max_bins):
    """Sum groups of adjacent bins so that at most ``max_bins`` remain (exact counts)."""
    g = -(-c.size // max_bins)
    if g <= 1:
        return x, c
    starts = np.arange(0, c.size, g)
    return np.append(x[starts], x[-1]), np.add.reduceat(c, starts)


def _mse_cost(x, c, lo, hi):
    """Sum of squared quantization errors per candidate for counts ``c`` on knots ``x``.

    ``Phi(u) = integral of err(t)**2 dt`` has a closed form on the grid: with
    ``v = clip(u, lo_g, hi_g) - lo_g = n s + r`` (``|r| <= s/2``) the in-range part is
    ``n s**3/12 + r**3/3`` (+ const) and the clipped parts are cubes. A bin's error is
    its count times the mean of ``err**2`` over the bin: ``dPhi / width``.
    """
    s, lg, hg = grid_of(lo, hi)
    w = np.diff(x)
    dens = np.divide(c, w, out=np.zeros_like(c), where=w > 0)
    point = (w <= 0) & (c > 0)  # a bin squeezed to one value (max on a bin edge)
    return np.concatenate([_mse_chunk(x, c, dens, point, s[i:j, None], lg[i:j, None],
                                      hg[i:j, None]) for i, j in _chunks(s.size, x.size)])


def _chunks(n_cand: int, n_points: int):
    """Candidate slices whose (candidates x points) temporaries stay in cache (~256 KiB)."""
    step = max(1, _CACHE_ELEMS // max(n_points, 1))
    return [(i, min(i + step, n_cand)) for i in range(0, n_cand, step)]


def _mse_chunk(x, c, dens, point, s, lg, hg):
    u = x[None, :]
    v = np.clip(u, lg, hg) - lg
    n = np.floor(v / s + 0.5)
    r = v - n * s
    phi = n * (s * s * s / 12.0) + r * r * r / 3.0  # (x ** 3 is a slow pow() in NumPy)
    a, b = np.maximum(u - hg, 0.0), np.minimum(u - lg, 0.0)
    phi += (a * a * a + b * b * b) / 3.0
    err = np.diff(phi, axis=1) @ dens
    if point.any():
        p = x[:-1][point][None, :]
        q = lg + s * np.clip(np.rint((p - lg) / s), 0, ACT_LEVELS)
        err += ((p - q) ** 2) @ c[point]
    return err


def _kl_cost(x, cdf, lo, hi, sub):
    """KL(P || Q) per candidate; see ``EntropyObserver``."""
    s, lg, _ = grid_of(lo, hi)
    t = np.arange((ACT_LEVELS + 1) * sub + 1) / sub - 0.5  # sub-bin edges, in steps
    return np.concatenate([_kl_chunk(x, cdf, s[i:j], lg[i:j], t, sub)
                           for i, j in _chunks(s.size, t.size)])


def _kl_chunk(x, cdf, s, lg, t, sub):
    f = np.interp(lg[:, None] + s[:, None] * t[None, :], x, cdf)
    p = np.diff(f, axis=1)
    p[:, 0] += f[:, 0]               # clipped below: onto the lowest level
    p[:, -1] += cdf[-1] - f[:, -1]   # clipped above: onto the highest level
    np.maximum(p, 0.0, out=p)
    p /= cdf[-1]
    clipped = p[:, 0] + p[:, -1]  # (an upper bound: the end sub-bins' own mass counts too)
    cells = p.reshape(len(s), ACT_LEVELS + 1, sub)
    nz = cells > 0
    q = cells.sum(2, keepdims=True) / np.maximum(nz.sum(2, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(nz, cells * np.log(cells / q), 0.0)
    kl = terms.sum(axis=(1, 2))
    kl[clipped > MAX_CLIPPED] = np.inf
    return kl


def _factors(extent: float, width: float) -> np.ndarray:
    """Shrink factors 1 ... f_min (geometric) and 0 for one side of the range."""
    if extent <= 0:
        return np.ones(1)
    fmin = min(1.0, max(_MIN_SHRINK, _MIN_BINS * width / extent))
    k = max(1, math.ceil(-math.log2(fmin) * _PER_OCTAVE)) if fmin < 1 else 0
    return np.append(np.geomspace(1.0, fmin, k + 1) if k else [1.0], 0.0)


def _search_range(h: Histogram, coarse, fine) -> tuple[float, float]:
    """Coordinate descent of ``cost(lo[], hi[])`` over ``lo = a*min``, ``hi = b*max``.

    A side with no data of its sign is fixed at 0 (one-sided search). ``coarse`` scans
    the geometric factors; ``fine`` then refines within one factor step.
    """
    lo0, hi0 = min(h.min, 0.0), max(h.max, 0.0)
    fa, fb = _factors(-lo0, h.width), _factors(hi0, h.width)
    a, b, _ = _descend(coarse, lo0, hi0, fa, fb, 1.0, 1.0)
    step = 2.0 ** (1.0 / _PER_OCTAVE)
    ra = _refine(a, step) if fa.size > 1 else fa
    rb = _refine(b, step) if fb.size > 1 else fb
    a, b, _ = _descend(fine, lo0, hi0, ra, rb, a, b)
    return a * lo0, b * hi0


def _refine(f: float, step: float) -> np.ndarray:
    if f <= 0:
        return np.zeros(1)
    return np.unique(np.append(np.linspace(f / step, min(f * step, 1.0), 17), f))


def _descend(cost, lo0, hi0, fa, fb, a, b):
    best = cost(np.array([a * lo0]), np.array([b * hi0]))[0]
    for _ in range(_ROUNDS):
        moved = False
        if fb.size > 1:
            c = cost(np.full(fb.size, a * lo0), fb * hi0)
            c[(fb == 0) & (a * lo0 == 0)] = np.inf  # [0, 0] is no range
            i = int(np.argmin(c))
            if c[i] < best:
                best, b, moved = c[i], float(fb[i]), True
        if fa.size > 1:
            c = cost(fa * lo0, np.full(fa.size, b * hi0))
            c[(fa == 0) & (b * hi0 == 0)] = np.inf
            i = int(np.argmin(c))
            if c[i] < best:
                best, a, moved = c[i], float(fa[i]), True
        if not moved:
            break
    return a, b, best


BUILTIN_RANGE_ALGORITHMS = {
    MinMaxObserver.name: MinMaxObserver,
    MovingAverageMinMaxObserver.name: MovingAverageMinMaxObserver,
    PercentileObserver.name: PercentileObserver,
    EntropyObserver.name: EntropyObserver,
    MSEObserver.name: MSEObserver,
}
