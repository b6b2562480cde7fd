"""Activation-range observers: streaming, bounded memory, mergeable.

An observer sees batches (NumPy arrays), keeps a small state and yields a range
``(lo, hi)``. States merge: across batches (implicitly) and across processes
(``merge``), so data-parallel calibration gives the same range as one process
that saw all the data. New algorithms arrive through the ``dopt_range_algorithms``
hook (see ``plugins/``).
"""
from __future__ import annotations

import numpy as np


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


BUILTIN_RANGE_ALGORITHMS = {
    MinMaxObserver.name: MinMaxObserver,
    MovingAverageMinMaxObserver.name: MovingAverageMinMaxObserver,
}
