"""What a pruning run aims at: estimated NPU latency, a speed-up, a size or a MAC budget.

``target_ms`` and ``speedup`` are measured on the emulated NPU's cost model at the chosen
precision (``docs/cost_model.md``: estimates, not measurements); ``size`` and ``macs`` are
fractions of the unpruned network's parameter count and multiply-accumulates, the budgets
MAC-oriented pruning tools use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import DoptError

KINDS = ("target_ms", "speedup", "size", "macs")
PRECISIONS = ("int8", "fp16")
_FORMS = ("target_ms=<ms> (estimated latency), speedup=<factor > 1>, size=<fraction of the "
          "parameters, 0-1>, macs=<fraction of the MACs, 0-1>")


@dataclass(frozen=True)
class PruneTarget:
    """``kind`` is one of ``KINDS``; ``value`` its number (checked by ``check``)."""

    kind: str
    value: float

    @classmethod
    def parse(cls, text: str, *, field: str = "--target") -> "PruneTarget":
        """``"speedup=1.25"`` / ``"target_ms=0.05"`` / ``"size=0.7"`` / ``"macs=0.6"``."""
        if not isinstance(text, str) or "=" not in text:
            raise DoptError("the pruning target must be KIND=VALUE", field=field,
                            expected=_FORMS, found=repr(text))
        kind, _, raw = text.partition("=")
        try:
            value = float(raw)
        except ValueError:
            raise DoptError("the pruning target's value is not a number", field=field,
                            expected=_FORMS, found=repr(text)) from None
        return cls(kind.strip(), value).check(field=field)

    def check(self, *, field: str = "target") -> "PruneTarget":
        if self.kind not in KINDS:
            raise DoptError(f"unknown pruning target '{self.kind}'", field=field,
                            expected=_FORMS, found=repr(self.kind))
        v = self.value
        ok = math.isfinite(v) and (
            (self.kind == "target_ms" and v > 0) or (self.kind == "speedup" and 1 < v <= 100)
            or (self.kind in ("size", "macs") and 0 < v < 1))
        if not ok:
            want = {"target_ms": "a latency in milliseconds > 0",
                    "speedup": "a factor above 1 (1.25 = 25 % faster), at most 100",
                    "size": "a fraction of the parameter count strictly between 0 and 1",
                    "macs": "a fraction of the MACs strictly between 0 and 1"}[self.kind]
            raise DoptError(f"the pruning target {self.kind} is out of range", field=field,
                            expected=want, found=repr(v))
        return self

    @property
    def metric(self) -> str:
        """The quantity the search drives down: ``latency``, ``params`` or ``macs``."""
        return {"target_ms": "latency", "speedup": "latency", "size": "params",
                "macs": "macs"}[self.kind]

    def goal(self, base: float) -> float:
        """The metric value to reach, given the unpruned network's ``base``."""
        if self.kind == "target_ms":
            return self.value
        if self.kind == "speedup":
            return base / self.value
        return base * self.value

    def text(self) -> str:
        return f"{self.kind}={self.value:g}"


def check_precision(precision: str, *, field: str = "--precision") -> str:
    if precision not in PRECISIONS:
        raise DoptError("unknown target precision", field=field,
                        expected=" or ".join(PRECISIONS), found=repr(precision),
                        hint="int8 for a model that will be quantized (QAT or dopt_so), "
                             "fp16 for a float deployment")
    return precision
