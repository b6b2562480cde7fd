"""Per-layer quantization sensitivity: which INT8 layer costs how much accuracy.

Two measures per layer:

* cheap: the network output with **only that layer INT8** against the float output, as
  SQNR (dB) and the noise power it adds, on the calibration samples where the all-INT8
  model errs most (``worst`` of ``samples``). Noise from independent rounding adds up,
  so a layer's noise power is the share of the all-INT8 error that keeping it float
  removes; computing it costs one small batch per layer, no labelled evaluation;
* full (``full=True``): the configured metric with only that layer INT8 and with only
  that layer float, two full evaluations per layer.

Layer names are those of the parameter file: the source framework's layer names.
"""
from __future__ import annotations

import math
import time

import numpy as np

from .evaluate import Evaluator, ort_predictor, simulated_predictor
from .variants import Variants


def _sqnr(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(SQNR dB, mean noise power per sample)."""
    ref = ref.astype(np.float64).reshape(len(ref), -1)
    d = got.astype(np.float64).reshape(len(ref), -1) - ref
    noise = float(np.mean(np.sum(d * d, axis=1)))
    sig = float(np.mean(np.sum(ref * ref, axis=1)))
    db = float("inf") if noise == 0 else 10 * math.log10(max(sig, 1e-30) / noise)
    return db, noise


def _run(model_bytes: bytes, feed: dict, *, optimize: bool) -> np.ndarray:
    p = ort_predictor(model_bytes, optimize=optimize)
    out = p(feed)
    return out[p.outputs[0]] if isinstance(out, dict) else out


def worst_samples(float_bytes: bytes, qdq_bytes: bytes, feed: dict, k: int) -> tuple[dict, list]:
    """The ``k`` samples of ``feed`` where the all-INT8 output is farthest from float."""
    ref = _run(float_bytes, feed, optimize=True)
    got = _run(qdq_bytes, feed, optimize=False)
    err = np.sum((got.reshape(len(got), -1).astype(np.float64)
                  - ref.reshape(len(ref), -1)) ** 2, axis=1)
    idx = sorted(np.argsort(-err, kind="stable")[:k].tolist())
    return {n: v[idx] for n, v in feed.items()}, idx


def cheap(variants: Variants, float_bytes: bytes, feed: dict, *, both: bool = True,
          log=print) -> dict:
    """Per layer: SQNR and noise of only-that-layer-INT8, and (``both``) of
    only-that-layer-float."""
    t0 = time.perf_counter()
    ref = _run(float_bytes, feed, optimize=True)
    names = variants.layers
    allq, _ = variants.build(())
    db_all, noise_all = _sqnr(ref, _run(allq.SerializeToString(), feed, optimize=False))
    rows = {}
    for i, name in enumerate(names):
        only_int8, _ = variants.build([n for n in names if n != name])
        db1, noise1 = _sqnr(ref, _run(only_int8.SerializeToString(), feed, optimize=False))
        rows[name] = {"sqnr_only_int8_db": db1, "noise_only_int8": noise1}
        if both:
            only_float, _ = variants.build([name])
            db2, noise2 = _sqnr(ref, _run(only_float.SerializeToString(), feed, optimize=False))
            rows[name].update({"sqnr_only_float_db": db2, "noise_only_float": noise2,
                               "noise_removed": max(noise_all - noise2, 0.0)})
        if (i + 1) % 10 == 0 or i + 1 == len(names):
            log(f"  sensitivity: {i + 1}/{len(names)} layers")
    return {"all_int8_sqnr_db": db_all, "all_int8_noise": noise_all, "samples": len(ref),
            "layers": rows, "seconds": time.perf_counter() - t0}


def full(variants: Variants, evaluator: Evaluator, *, batch_size: int = 256,
         log=print) -> dict:
    """Per layer: the metric with only that layer INT8 and with only that layer float."""
    names = variants.layers
    out = {}
    for i, name in enumerate(names):
        m1, _ = variants.build([n for n in names if n != name])
        m2, _ = variants.build([name])
        out[name] = {
            "metric_only_int8": evaluator(simulated_predictor(m1, batch_size=batch_size)).value,
            "metric_only_float": evaluator(simulated_predictor(m2, batch_size=batch_size)).value}
        log(f"  full sensitivity: {i + 1}/{len(names)} {name}: only INT8 "
            f"{out[name]['metric_only_int8']:.3f}, only float {out[name]['metric_only_float']:.3f}")
    return out


def table(result: dict, latency: dict | None = None) -> list[dict]:
    """Rows ranked most sensitive first (noise of only-that-layer-INT8)."""
    rows = []
    for name, r in result["layers"].items():
        row = {"layer": name, **r}
        if latency and name in latency:
            row.update(latency[name])
        rows.append(row)
    rows.sort(key=lambda r: -r["noise_only_int8"])
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def render_table(rows: list[dict], metric_name: str = "metric") -> str:
    has_full = any("metric_only_int8" in r for r in rows)
    has_lat = any("fp16_extra_ms" in r for r in rows)
    head = ["#", "layer", "SQNR only INT8 (dB)", "SQNR only float (dB)", "noise share"]
    if has_full:
        head += [f"{metric_name}: only INT8", f"{metric_name}: only float"]
    if has_lat:
        head += ["FP16 extra ms (est.)"]
    total = sum(r["noise_only_int8"] for r in rows) or 1.0
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["rank"]), r["layer"], f"{r['sqnr_only_int8_db']:.1f}",
                 f"{r.get('sqnr_only_float_db', float('nan')):.1f}", f"{r['noise_only_int8'] / total:.1%}"]
        if has_full:
            cells += [f"{r.get('metric_only_int8', float('nan')):.3f}",
                      f"{r.get('metric_only_float', float('nan')):.3f}"]
        if has_lat:
            cells += [f"{r.get('fp16_extra_ms', float('nan')):.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
