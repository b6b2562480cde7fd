"""Accuracy-driven mixed precision: the fewest FP16 layers that bring the drop within budget.

Layers are ranked by accuracy regained per millisecond of estimated NPU latency: the
output noise a layer adds in INT8 (or, with ``ranking: metric``, the metric regained by
keeping it float) divided by what keeping it FP16 costs on the NPU (its FP16 minus its
INT8 kernel time in the compiler's estimate). Keeping the first ``k`` layers of that list
float helps more as ``k`` grows, so a binary search over ``k`` finds the shortest prefix
that meets ``max_drop`` with about log2(N) full evaluations.

Every full evaluation is stored as soon as it is made (``state``), so an interrupted
search resumes where it stopped; the best passing set found so far is always kept, and
when the evaluation budget runs out it is the answer.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..formats.fileio import write_json_atomic

EPS_MS = 1e-4   # a layer whose FP16 cost rounds to nothing still costs something


@dataclass
class SearchResult:
    float_layers: list[str]
    metric: float | None
    drop: float | None
    passed: bool
    evaluations: int                  # full evaluations made in this run
    cached: int                       # taken from an earlier, interrupted run
    budget_exhausted: bool
    ranking: list[dict]
    log: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def rank(layers: list[str], gain: dict[str, float], cost_ms: dict[str, float]) -> list[dict]:
    """Layers by gain per ms, best first (ties: larger gain, then graph order)."""
    rows = []
    for i, n in enumerate(layers):
        c = max(cost_ms.get(n, 0.0), EPS_MS)
        g = max(gain.get(n, 0.0), 0.0)
        rows.append({"layer": n, "gain": g, "fp16_extra_ms": cost_ms.get(n, 0.0),
                     "gain_per_ms": g / c, "order": i})
    rows.sort(key=lambda r: (-r["gain_per_ms"], -r["gain"], r["order"]))
    return rows


def affordable(ranking: list[dict], saving_ms: float) -> list[dict]:
    """The longest prefix of ``ranking`` whose FP16 costs add up to less than ``saving_ms``:
    when FP16 layers were chosen to make a build faster, the layers added back to restore
    accuracy must not spend more than those layers saved."""
    out, spent = [], 0.0
    for r in ranking:
        spent += max(r["fp16_extra_ms"], 0.0)
        if spent >= saving_ms:
            break
        out.append(r)
    return out


class State:
    """Evaluations by float set, tied to one search problem by a fingerprint."""

    def __init__(self, path: Path | None, fingerprint: str):
        self.path, self.fp = path, fingerprint
        self.evals: dict[str, float] = {}
        self.best: dict | None = None
        if path and path.is_file():
            try:
                doc = json.loads(path.read_text("utf-8"))
            except (OSError, ValueError):
                doc = {}
            if doc.get("fingerprint") == fingerprint:
                self.evals = {k: float(v) for k, v in doc.get("evaluations", {}).items()}
                self.best = doc.get("best")

    @staticmethod
    def key(float_set) -> str:
        return json.dumps(sorted(float_set))

    def save(self) -> None:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {"format": "dopt.deploy_search", "version": 1,
                                          "fingerprint": self.fp, "evaluations": self.evals,
                                          "best": self.best})


def fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True,
                                                           default=str).encode())
    return h.hexdigest()


def search(ranking: list[dict], evaluate: Callable[[list[str]], float], *, float_metric: float,
           max_drop: float, max_evaluations: int, state: State,
           base_metric: float | None = None, log=print,
           on_best: Callable[[list[str], float], None] | None = None) -> SearchResult:
    """Binary search for the shortest passing prefix of ``ranking``.

    ``evaluate(float_set)`` is one full evaluation (the simulated metric).
    ``base_metric``: the all-INT8 metric when already known (not evaluated again).
    """
    t0 = time.perf_counter()
    order = [r["layer"] for r in ranking]
    made = cached = 0
    steps: list[dict] = []
    exhausted = False

    def metric_of(k: int) -> float | None:
        nonlocal made, cached, exhausted
        fs = order[:k]
        key = State.key(fs)
        if key in state.evals:
            cached += 1
            m = state.evals[key]
            steps.append({"float_layers": k, "metric": m, "cached": True})
            return m
        if k == 0 and base_metric is not None:
            state.evals[key] = base_metric
            state.save()
            return base_metric
        if made >= max_evaluations:
            exhausted = True
            return None
        m = evaluate(fs)
        made += 1
        state.evals[key] = m
        steps.append({"float_layers": k, "metric": m, "cached": False,
                      "drop": float_metric - m})
        log(f"  mixed precision: {k} layer(s) FP16 -> {m:.4f} "
            f"(drop {float_metric - m:.4f}, budget {max_drop:.4f})")
        if float_metric - m <= max_drop and (state.best is None or k < state.best["k"]):
            state.best = {"k": k, "float_layers": fs, "metric": m}
            if on_best:
                on_best(fs, m)
        state.save()
        return m

    m0 = metric_of(0)
    if m0 is not None and float_metric - m0 <= max_drop:
        return SearchResult([], m0, float_metric - m0, True, made, cached, False, ranking,
                            steps, time.perf_counter() - t0)
    lo, hi = 0, len(order)      # prefix lo fails; prefix hi (everything float) is float
    for k in range(1, len(order)):    # what an interrupted run already knows
        m = state.evals.get(State.key(order[:k]))
        if m is not None:
            if float_metric - m <= max_drop:
                hi = min(hi, k)
            else:
                lo = max(lo, k)
    if lo >= hi:                      # inconsistent (non-monotone) history: trust passes
        lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        m = metric_of(mid)
        if m is None:
            break
        if float_metric - m <= max_drop:
            hi = mid
        else:
            lo = mid
    best = state.best
    if best is not None and best["k"] <= hi:
        fs, m = list(best["float_layers"]), float(best["metric"])
        return SearchResult(fs, m, float_metric - m, True, made, cached, exhausted, ranking,
                            steps, time.perf_counter() - t0)
    # no evaluated prefix passed: the answer is the shortest prefix not shown to fail
    fs = order[:hi]
    m = state.evals.get(State.key(fs))
    return SearchResult(fs, m, None if m is None else float_metric - m,
                        m is not None and float_metric - m <= max_drop, made, cached, exhausted,
                        ranking, steps, time.perf_counter() - t0)
