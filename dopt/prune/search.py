"""Choose how many channels each group keeps, against the NPU cost model's latency estimate.

Widths only ever take values on the profile's channel block (``alignment``: 16 lanes for
FP16 kernels, 32 for INT8): a count between two blocks is padded up by the hardware, so
removing those channels would cost accuracy and buy nothing. From the unpruned network the
search repeatedly takes the one-block step, over all groups, that saves the most of the
target's metric (estimated latency, parameters or MACs) per unit of accuracy risk, until
the target is met. A step that saves nothing is never taken. Accuracy risk is the share of
the group's importance the step removes (the library's per-channel criterion) or, with a
sensitivity table, the measured metric drop of pruning that group alone to that width.

Gains are re-estimated lazily (a stale gain is an upper bound in practice: pruning one
group rarely makes another's step save more), so a search costs about one estimate per
group plus a few per step.
"""
from __future__ import annotations

import heapq
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DoptError
from .backend import Group, PruneBackend
from .target import PruneTarget, check_precision

#: at most this share of a group's channels is removed unless the caller says otherwise
DEFAULT_MAX_RATIO = 0.75
EPS = 1e-9


def group_widths(g: Group, block: int, max_ratio: float = DEFAULT_MAX_RATIO) -> list[int]:
    """Widths group ``g`` may take, largest first: a residual block is kept or removed."""
    if g.kind == "block":
        return [1, 0]
    return aligned_widths(g.channels, block, max_ratio)


def aligned_widths(channels: int, block: int, max_ratio: float = DEFAULT_MAX_RATIO) -> list[int]:
    """Widths a group of ``channels`` may take, largest first: the count itself, then the
    multiples of ``block`` below it, down to one block and no fewer than
    ``(1 - max_ratio) * channels``."""
    out = [channels]
    floor = max(block, int(np.ceil((1 - max_ratio) * channels - 1e-9)))
    w = (channels // block) * block
    if w == channels:
        w -= block
    while w >= floor:
        out.append(w)
        w -= block
    return out


class Meter:
    """Estimated FP16/INT8 latency, parameters and MACs of candidate widths (cached)."""

    def __init__(self, backend: PruneBackend, profile, precision: str, workdir: Path):
        self.backend, self.profile = backend, profile
        self.precision = check_precision(precision)
        self.workdir = Path(workdir)
        self.cache: dict[tuple, dict] = {}
        self.calls = 0

    def __call__(self, widths, latency: bool = True) -> dict:
        """Parameters and MACs; with ``latency`` also the cost model's estimates."""
        key = (tuple(sorted(widths.items())), latency)
        if key not in self.cache:
            self.cache[key] = (self._measure(dict(widths)) if latency else
                               dict(self.backend.measure(dict(widths))))
        return self.cache[key]

    def _measure(self, widths: dict) -> dict:
        from ..nas.latency import estimate_onnx
        self.calls += 1
        path = self.workdir / f"candidate_{self.calls}.onnx"
        self.backend.export_onnx(widths, path)
        try:
            est = estimate_onnx(path, self.profile)
        except DoptError as e:
            raise DoptError(f"the emulated NPU compiler refused the network: {e.what}",
                            hint="run dopt omg --mode 3 on the model's ONNX to see which "
                                 "operator the NPU lacks") from None
        finally:
            path.unlink(missing_ok=True)
        out = dict(self.backend.measure(widths))
        out.update(est)
        out["latency"] = est[f"latency_{self.precision}_ms"]
        return out


@dataclass
class PrunePlan:
    """The search's answer: ``widths`` per group, the estimates before and after, and the
    steps taken in order."""

    target: str
    precision: str
    block: int
    groups: list[dict]
    widths: dict[str, int]
    before: dict
    after: dict
    steps: list[dict] = field(default_factory=list)
    estimates: int = 0

    def as_dict(self) -> dict:
        return {"target": self.target, "precision": self.precision, "channel_block": self.block,
                "widths": self.widths, "groups": self.groups, "before": self.before,
                "after": self.after, "steps": self.steps, "estimates": self.estimates,
                "note": "latencies are the emulated NPU cost model's estimates, not "
                        "measurements"}


def _risk_fn(backend: PruneBackend, groups: list[Group], sensitivity: dict | None):
    """``risk(group, width)``: accuracy risk of keeping ``width`` channels (0 at full)."""
    removed: dict[str, np.ndarray] = {}
    for g in groups:
        imp = np.asarray(backend.importance(g.name), dtype=np.float64).reshape(-1)
        if imp.size != g.channels or not np.all(np.isfinite(imp)):
            raise DoptError(f"the importance of channel group {g.name} is not {g.channels} "
                            f"finite values", hint="use another importance criterion")
        if g.kind == "block":      # the share of the output the block contributes
            removed[g.name] = np.array([0.0, float(np.clip(imp[0], 0.0, 1.0))])
            continue
        s = np.sort(np.maximum(imp, 0))
        total = float(s.sum()) or 1.0
        removed[g.name] = np.concatenate([[0.0], np.cumsum(s) / total])  # by channels removed
    drops = {}
    if sensitivity:
        base = sensitivity["base_metric"]
        for name, rows in sensitivity["groups"].items():
            drops[name] = {int(r["width"]): max(base - float(r["metric"]), 0.0) for r in rows}

    def risk(g: Group, width: int) -> float:
        share = float(removed[g.name][g.channels - width])
        if g.name in drops and width in drops[g.name]:
            return drops[g.name][width] + 1e-3 * share   # importance breaks ties
        return share
    return risk


def choose_widths(backend: PruneBackend, target: PruneTarget, profile, *,
                  precision: str = "int8", sensitivity: dict | None = None,
                  max_ratio: float = DEFAULT_MAX_RATIO,
                  log: Callable[[str], None] | None = None) -> PrunePlan:
    """Search the per-group widths that meet ``target`` on ``profile`` at ``precision``."""
    log = log or (lambda _m: None)
    target = target.check()
    check_precision(precision)
    if not 0 < max_ratio < 1:
        raise DoptError("max_ratio must be a fraction strictly between 0 and 1",
                        field="max_ratio", found=repr(max_ratio))
    block = profile.channel_block(precision == "int8")
    groups = backend.groups()
    if not groups:
        raise DoptError("the model has no prunable channel group",
                        hint="structured pruning removes convolution output channels; a model "
                             "whose every convolution feeds the output (or is excluded) cannot "
                             "be pruned")
    options = {g.name: group_widths(g, block, max_ratio) for g in groups}
    by_name = {g.name: g for g in groups}
    movable = [g for g in groups if len(options[g.name]) > 1]
    risk = _risk_fn(backend, groups, sensitivity)
    metric = target.metric
    timed = metric == "latency"   # size and MAC targets need the estimate only at the ends

    with tempfile.TemporaryDirectory(prefix="dopt-prune-") as work:
        meter = Meter(backend, profile, precision, Path(work))
        full = {g.name: g.channels for g in groups}
        before = meter(full)
        goal = target.goal(before[metric])
        log(f"unpruned: {_fmt(before, precision)}; goal {metric} <= {goal:.6g}")
        floor_w = {g.name: options[g.name][-1] for g in groups}
        floor = meter(floor_w, timed)
        if floor[metric] > goal:
            raise _unreachable(target, metric, goal, before, floor, block, precision,
                               len(movable), profile, backend, floor_w, Path(work))

        widths = dict(full)
        level = {g.name: 0 for g in groups}
        current = before
        steps: list[dict] = []

        def score(name):
            nxt = options[name][level[name] + 1]
            cand = dict(widths, **{name: nxt})
            m = meter(cand, timed)
            gain = current[metric] - m[metric]
            cost = risk(by_name[name], nxt) - risk(by_name[name], widths[name])
            return gain / (max(cost, 0.0) + EPS) if gain > 0 else -1.0, gain, nxt, m

        heap = []
        for g in movable:
            s, *_ = score(g.name)
            heapq.heappush(heap, (-s, g.name))
        while current[metric] > goal:
            found = None
            while heap:
                _neg, name = heapq.heappop(heap)
                s, gain, nxt, m = score(name)     # refresh against the current widths
                if s > 0 and (not heap or s >= -heap[0][0]):
                    found = (name, gain, nxt, m)
                    break
                if s > 0:
                    heapq.heappush(heap, (-s, name))
                # a step that saves nothing now is dropped; a later step may revive it
            if found is None:
                raise _unreachable(target, metric, goal, before, current, block, precision,
                                   len(movable), profile, backend, widths, Path(work),
                                   stuck=True)
            name, gain, nxt, m = found
            if m[metric] <= goal:
                # the last step: of the steps that reach the goal on their own, the one that
                # risks the least (the best saving per risk may overshoot with a big one)
                name, gain, nxt, m = _finishing_step(
                    (name, gain, nxt, m), movable, options, level, widths, meter, timed,
                    metric, goal, current, risk, by_name)
            steps.append({"group": name, "from": widths[name], "to": nxt,
                          "saved": gain, metric: m[metric]})
            what = ("removed" if by_name[name].kind == "block" else
                    f"{widths[name]} -> {nxt} channels")
            log(f"step {len(steps)}: {name} {what}, "
                f"{metric} {current[metric]:.6g} -> {m[metric]:.6g}")
            widths[name] = nxt
            level[name] += 1
            current = m
            if level[name] + 1 < len(options[name]):
                s, *_ = score(name)
                heapq.heappush(heap, (-s, name))
            # steps dropped earlier may pay now that the network changed: reconsider them
            queued = {n for _s, n in heap}
            for g in movable:
                if g.name not in queued and g.name != name and \
                        level[g.name] + 1 < len(options[g.name]):
                    s, *_ = score(g.name)
                    if s > 0:
                        heapq.heappush(heap, (-s, g.name))
        after = meter(widths)
        estimates = meter.calls

    table = [{"group": g.name, "kind": g.kind, "channels": g.channels, "kept": widths[g.name],
              "members": list(g.members),
              "aligned": (g.kind == "block" or widths[g.name] % block == 0
                          or widths[g.name] == g.channels)}
             for g in groups]
    changed = {k: v for k, v in widths.items() if v != full[k]}
    return PrunePlan(target=target.text(), precision=precision, block=block, groups=table,
                     widths=changed, before=_public(before), after=_public(after),
                     steps=steps, estimates=estimates)


def _finishing_step(found, movable, options, level, widths, meter, timed, metric, goal,
                    current, risk, by_name):
    """``found`` or, among the one-step moves from ``widths`` that meet ``goal``, the one
    with the smallest added risk."""
    def added(name, nxt):
        return risk(by_name[name], nxt) - risk(by_name[name], widths[name])

    best, best_risk = found, added(found[0], found[2])
    for g in movable:
        if g.name == found[0] or level[g.name] + 1 >= len(options[g.name]):
            continue
        nxt = options[g.name][level[g.name] + 1]
        m = meter(dict(widths, **{g.name: nxt}), timed)
        r = added(g.name, nxt)
        if m[metric] <= goal and r < best_risk:
            best, best_risk = (g.name, current[metric] - m[metric], nxt, m), r
    return best


def _public(m: dict) -> dict:
    return {k: m[k] for k in ("latency_fp16_ms", "latency_int8_ms", "params", "macs")}


def _fmt(m: dict, precision: str) -> str:
    return (f"estimated {precision.upper()} latency {m[f'latency_{precision}_ms']:.4f} ms, "
            f"{m['params']} parameters, {m['macs'] / 1e6:.2f} M MACs")


def _launch_floor(profile, backend, widths, work: Path, precision: str) -> tuple[int, float]:
    """(NPU kernels, their launch time in ms) of the network at ``widths``: the part of the
    estimate no channel count changes."""
    import onnx

    from ..npu.compiler import analyze
    from ..npu.precheck import precheck
    path = work / "floor.onnx"
    backend.export_onnx(widths, path)
    _, graph, report = analyze(onnx.load(str(path)), profile, fp16_check=False)
    if precision == "int8":
        report = precheck(graph, profile, [n.name for n in graph.nodes
                                           if n.op and profile.int8_form(n.op)])
    from ..npu.costmodel import estimate
    kernels = estimate(graph, report, profile)["summary"]["npu_kernels"]
    return kernels, kernels * profile.cost_model["kernel_launch_us"] / 1e3


def _unreachable(target, metric, goal, before, reached, block, precision, movable, profile,
                 backend, widths, work, stuck=False) -> DoptError:
    unit = {"latency": " ms (estimate)", "params": " parameters", "macs": " MACs"}[metric]
    how = ("no remaining one-block step lowers it" if stuck else
           f"every prunable group at its smallest width ({block}-channel blocks, "
           f"{movable} group(s) can shrink)")
    what = (f"the pruning target {target.text()} cannot be met: it asks for {metric} <= "
            f"{goal:.6g}{unit}, the unpruned network has {before[metric]:.6g} and {how} "
            f"reaches {reached[metric]:.6g}")
    if metric == "latency":
        n, ms = _launch_floor(profile, backend, widths, work, precision)
        blocks = [g for g in backend.groups() if g.kind == "block"]
        what += (f"; {n} NPU kernels cost {ms:.4f} ms in launches alone, which channel "
                 f"pruning cannot remove" +
                 (f" (with all {len(blocks)} removable residual block(s) removed)"
                  if blocks and not stuck else ""))
    if metric == "latency":
        best = math.floor(before[metric] / max(reached[metric], EPS) * 1000) / 1000
        hint = (f"ask for at most speedup={best:g} "
                f"(or target_ms={reached[metric]:.4g}), or raise max_ratio")
        if not any(g.kind == "block" for g in backend.groups()):
            hint += (", or let whole residual blocks go (depth=True, dopt prune --depth), "
                     "which removes their kernels")
    else:
        hint = (f"ask for {target.kind}={reached[metric] / max(before[metric], EPS):.3f} or "
                f"more, or raise max_ratio")
    return DoptError(what, field="target", hint=hint)
