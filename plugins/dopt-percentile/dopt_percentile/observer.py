"""Percentile range from a power-of-two histogram that merges exactly."""
from __future__ import annotations

import math
from functools import partial

import numpy as np

BINS = 2048


class PercentileObserver:
    """Clip the activation range to the ``percentile`` of the observed values on each side.

    Bins cover ``[-R, R]`` with ``R = 2**k``. Growing ``R`` merges adjacent bin pairs
    into the middle half of the new histogram, which is exact, so any two states
    (batches, ranks) merge to the histogram of the union of their data.
    """

    name = "percentile"

    def __init__(self, percentile: float = 99.99):
        if not 50.0 < percentile <= 100.0:
            raise ValueError("percentile must be in (50, 100]")
        self.percentile = percentile
        self.exp: int | None = None  # R = 2**exp
        self.hist = np.zeros(BINS, np.int64)
        self.lo, self.hi = math.inf, -math.inf

    @property
    def empty(self) -> bool:
        return not math.isfinite(self.lo)

    def _grow_to(self, exp: int) -> None:
        if self.exp is None:
            self.exp = exp
            return
        while self.exp < exp:
            merged = self.hist.reshape(-1, 2).sum(1)
            self.hist = np.zeros(BINS, np.int64)
            self.hist[BINS // 4: 3 * BINS // 4] = merged
            self.exp += 1

    def update(self, x) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        if not x.size:
            return
        x = x[np.isfinite(x)]
        if not x.size:
            return
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        amax = max(abs(self.lo), abs(self.hi), 2.0 ** -20)
        self._grow_to(max(math.ceil(math.log2(amax)), -20))
        r = 2.0 ** self.exp
        idx = np.floor((x.astype(np.float64) + r) * (BINS / (2 * r))).astype(np.int64)
        np.clip(idx, 0, BINS - 1, out=idx)
        self.hist += np.bincount(idx, minlength=BINS)

    def state(self) -> dict:
        return {"exp": self.exp, "hist": self.hist.tolist(), "lo": self.lo, "hi": self.hi}

    def merge(self, state: dict) -> None:
        if state["exp"] is None:
            return
        other = PercentileObserver(self.percentile)
        other.exp, other.hist = state["exp"], np.asarray(state["hist"], np.int64)
        exp = max(state["exp"], self.exp if self.exp is not None else state["exp"])
        self._grow_to(exp)
        other._grow_to(exp)
        self.hist = self.hist + other.hist
        self.lo, self.hi = min(self.lo, state["lo"]), max(self.hi, state["hi"])

    def range(self) -> tuple[float, float]:
        total = int(self.hist.sum())
        r = 2.0 ** self.exp
        width = 2 * r / BINS
        cdf = np.cumsum(self.hist)
        tail = total * (100.0 - self.percentile) / 100.0
        i_lo = int(np.searchsorted(cdf, tail, side="right"))
        i_hi = int(np.searchsorted(cdf, total - tail, side="left"))
        lo = max(-r + i_lo * width, self.lo)
        hi = min(-r + (i_hi + 1) * width, self.hi)
        return float(min(lo, 0.0) if lo > hi else lo), float(hi)


ALGORITHMS = {"percentile": PercentileObserver,
              "percentile_99.9": partial(PercentileObserver, 99.9)}
