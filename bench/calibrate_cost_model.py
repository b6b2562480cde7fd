"""Fit the NPU cost model's constants, with priors, and validate it honestly.

    python -m bench.calibrate_cost_model [--data ../shared/data/kirin9000_model_zoo.csv]
                                         [--write-profile] [--validation FILE.csv ...]

Builds the eleven model-zoo networks (``bench/zoo_models.py``, cached ONNX), lowers each,
pre-checks it twice (FP16; INT8 with every layer that has weights requested as INT8) and
fits the five constants the measurements can identify (FP16/INT8 MAC rates, DDR
bandwidth, kernel launch, depthwise block utilisation; the on-chip buffer size is chosen on
a grid) by least squares on log(estimate / measurement) **plus** a penalty that keeps each
constant near its prior (``cost_model.priors`` in the profile: value, bounds and source).

Validation, per model:
- in-fit error;
- leave-one-model-out (LOMO): refit without the model, predict it;
- leave-one-family-out (LOFO): refit without every model of its family (plain CNN,
  residual, depthwise, detection, segmentation, super-resolution), predict them;
- ``--validation``: CSVs of other measured networks (same columns), each predicted without
  refitting and scored on its own (``bench/data/``; see docs/cost_model.md).

The uncertainty band every estimate carries (``cost_model.band``) is the 10th-90th
percentile of the LOFO estimate/measurement ratios. ``--write-profile`` stores the
constants, the band and the calibration record in the profile. Sensitivity of each zoo
estimate to its guesses (input size +-12.5 %, INT8 layer set) is reported too.
Writes ``bench/results/cost_model.json`` and prints the tables of docs/cost_model.md.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import platform
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from dopt.formats.fileio import write_json_atomic
from dopt.npu.costmodel import estimate
from dopt.npu.lower import lower_onnx
from dopt.npu.precheck import precheck
from dopt.npu.prepare import prepare
from dopt.npu.profile import DEFAULT_PROFILE, PROFILES_DIR, load_profile

from . import zoo_models

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "kirin9000_model_zoo.csv"
RESULTS = ROOT / "bench" / "results" / "cost_model.json"
# Every layer with weights is requested as INT8, as the reference's Quant_INT8-8 does.
INT8_OPS = ("Convolution", "ConvolutionDepthwise", "FullyConnection", "ConvTranspose")
FITTED = ("fp16_tops", "int8_tops", "ddr_gbps", "kernel_launch_us",
          "depthwise_block_utilization")
BUFFER_GRID_KB = tuple(128 * 2 ** (k / 2) for k in range(13))      # 128 KB .. 8 MB
FAMILIES = {"AlexNet": "plain CNN", "SqueezeNet_v1": "plain CNN", "GoogLeNet": "plain CNN",
            "Inception_v4": "plain CNN", "ResNet18": "residual",
            "SSD_MobileNetV2_VOC": "depthwise", "YOLOv5": "detection",
            "FCN": "segmentation", "DeepLab_v3": "segmentation",
            "VDSR": "super-resolution", "FSRCNN": "super-resolution"}
# Measurements left out of the fit (still reported): an INT8/FP16 speed-up of 21x cannot come
# from the data type (2x MAC rate, half the bytes); something else was measured there.
OUTLIERS = {("GoogLeNet", "fp16"): "FP16 is 21x slower than INT8, which the data type "
                                   "cannot explain; excluded from the fit, reported as is"}
PRECISIONS = ("fp16", "int8")


def read_measurements(path: Path) -> list[dict]:
    """Rows of a latency CSV (``#`` lines are comments): model, fp16_ms, int8_ms and an
    optional input_side. An empty time is a precision that was not measured."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    except OSError as e:
        raise SystemExit(f"{path}: cannot read the latency file ({e.strerror})") from None
    missing = {"model", "fp16_ms", "int8_ms"} - set(rows[0] if rows else ())
    if missing:
        raise SystemExit(f"{path}: the header needs the columns model, fp16_ms, int8_ms "
                         f"(missing: {', '.join(sorted(missing))})")

    def cell(i, row, key, kind):
        v = (row.get(key) or "").strip()
        if not v:
            return None
        try:
            x = kind(v)
        except ValueError:
            x = None
        if x is None or not x > 0 or not math.isfinite(x):
            raise SystemExit(f"{path}: data row {i} ({row.get('model')}), column {key}: "
                             f"expected a positive number, got {v!r}")
        return x
    return [{"model": r["model"], "fp16": cell(i, r, "fp16_ms", float),
             "int8": cell(i, r, "int8_ms", float), "side": cell(i, r, "input_side", int)}
            for i, r in enumerate(rows, 1)]


# -- features: what the estimate depends on, per NPU kernel ------------------------------------

def features(est: dict) -> dict:
    """Per NPU kernel: the work and bytes the constants multiply (buffer size already
    applied to the feature-map traffic)."""
    npu = [k for k in est["kernels"] if k["device"] == "npu"]
    return {
        "padded_macs": np.array([k["padded_macs"] for k in npu], float),
        "mac": np.array([k["padded_macs"] > 0 for k in npu], bool),
        "vector_elems": np.array([k.get("vector_elems", 0) for k in npu], float),
        "ddr_bytes": np.array([k["ddr_bytes"] for k in npu], float),
        "int8": np.array([k["int8"] for k in npu], bool),
        "depthwise": np.array([k["op"] == "ConvolutionDepthwise" for k in npu], bool),
        "block": np.array([32 if k["int8"] else 16 for k in npu], float),
        "slow": np.array([k.get("slowdown", 1.0) for k in npu], float),
        "fixed_us": sum(k["time_us"] for k in est["kernels"] if k["device"] == "cpu")
        + sum(x["time_us"] for x in est["transfers"]),
    }


def predict_ms(f: dict, c: dict) -> float:
    """The cost model's network time for constants ``c`` (mirrors dopt.npu.costmodel)."""
    rate = np.where(f["int8"], c["int8_tops"], c["fp16_tops"]) * 1e6 / 2
    rate = rate * np.where(f["depthwise"], c["depthwise_block_utilization"] / f["block"], 1.0)
    compute = np.where(f["mac"], f["padded_macs"] / rate,
                       f["vector_elems"] / (c["vector_gops"] * 1e3) * f["slow"])
    memory = f["ddr_bytes"] / (c["ddr_gbps"] * 1e3) * f["slow"]
    t = np.maximum(compute, memory) + c["kernel_launch_us"]
    return float((t.sum() + f["fixed_us"]) / 1e3)


def analyse(name: str, profile, side: int | None = None, int8_skip: int = 0,
            variant: int | None = None) -> dict:
    """Lower one zoo network; pre-check it FP16 and INT8; features on the buffer grid.

    ``int8_skip``: leave the first and last ``int8_skip`` weighted layers FP16 (a user's
    usual choice, for the sensitivity table); ``variant``: an index into
    ``zoo_models.VARIANTS[name]`` instead of the network fitted."""
    import onnx
    if variant is None:
        path, shape = zoo_models.export(name, side=side), zoo_models.input_shape(name, side)
    else:
        path, shape = (zoo_models.export_variant(name, variant),
                       zoo_models.VARIANTS[name][variant][2])
    graph = lower_onnx(prepare(onnx.load(str(path))))   # as dopt omg compiles it
    int8 = [n.name for n in graph.nodes if n.op in INT8_OPS]
    if int8_skip:
        int8 = int8[int8_skip:-int8_skip]
    out = {"input": "x".join(map(str, shape[1:])), "graph": graph}
    for prec, nodes in (("fp16", ()), ("int8", int8)):
        report = precheck(graph, profile, nodes)
        out[prec + "_report"] = report
        grid = []
        for kb in BUFFER_GRID_KB:
            prof = replace(profile, cost_model=dict(profile.cost_model, onchip_buffer_kb=kb))
            est = estimate(graph, report, prof)
            grid.append(features(est))
            out["gmacs"] = est["summary"]["gmacs"]
        out[prec] = grid
    return out


# -- the fit ----------------------------------------------------------------------------------

def _prior_residuals(c: dict, priors: dict, names) -> list[float]:
    return [math.log(c[k] / priors[k]["value"]) / priors[k]["sigma_log"] for k in names]


def fit(points: list[tuple[list, float]], base: dict, priors: dict) -> dict:
    """Regularized least squares on log(estimate / measurement), buffer size on a grid.

    ``points``: (features on the buffer grid, measured ms). Returns the constants."""
    lo = np.log([priors[k]["bounds"][0] for k in FITTED])
    hi = np.log([priors[k]["bounds"][1] for k in FITTED])
    x0 = np.clip(np.log([priors[k]["value"] for k in FITTED]), lo + 1e-9, hi - 1e-9)
    best = None
    for gi, kb in enumerate(BUFFER_GRID_KB):
        bp = priors["onchip_buffer_kb"]
        if not bp["bounds"][0] <= kb <= bp["bounds"][1]:
            continue

        def consts(x, kb=kb):
            return dict(base, onchip_buffer_kb=kb, **{k: float(np.exp(v))
                                                      for k, v in zip(FITTED, x)})

        def residuals(x, gi=gi, consts=consts):
            c = consts(x)
            data = [math.log(predict_ms(f[gi], c) / ms) for f, ms in points]
            return np.array(data + _prior_residuals(c, priors, FITTED + ("onchip_buffer_kb",)))

        r = least_squares(residuals, x0, bounds=(lo, hi), x_scale=1.0)
        if best is None or r.cost < best[0]:
            best = (r.cost, consts(r.x))
    c = best[1]
    return dict({k: float(f"{c[k]:.4g}") for k in FITTED},
                onchip_buffer_kb=round(c["onchip_buffer_kb"], 1))


def _grid_index(kb: float) -> int:
    return int(np.argmin([abs(math.log(kb / g)) for g in BUFFER_GRID_KB]))


def predict(feats_grid: list, c: dict) -> float:
    return predict_ms(feats_grid[_grid_index(c["onchip_buffer_kb"])], c)


def run(data: Path, write_profile: bool, validation: Path | list[Path] | None,
        sensitivity: bool = False) -> dict:
    profile = load_profile(DEFAULT_PROFILE)
    meas = read_measurements(data)
    missing = [f"{m['model']} {p}_ms" for m in meas for p in PRECISIONS if m[p] is None]
    if missing:
        raise SystemExit(f"{data}: the fit needs both precisions of every network; empty: "
                         f"{', '.join(missing)} (give such a network with --validation)")
    feats = {m["model"]: analyse(m["model"], profile) for m in meas}
    cm = profile.cost_model
    priors = cm["priors"]
    base = {k: v for k, v in cm.items()
            if k not in ("note", "calibration", "priors", "band", "calibrated")}

    def points(exclude=()):
        return [(feats[m["model"]][p], m[p]) for m in meas for p in PRECISIONS
                if (m["model"], p) not in OUTLIERS and m["model"] not in exclude]

    fitted = fit(points(), base, priors)
    consts = dict(base, **fitted)
    fams = sorted(set(FAMILIES.values()))
    lofo = {fam: dict(base, **fit(points([m for m, f in FAMILIES.items() if f == fam]),
                                  base, priors)) for fam in fams}
    rows = []
    for m in meas:
        loo = dict(base, **fit(points([m["model"]]), base, priors))
        f = feats[m["model"]]
        fam = FAMILIES.get(m["model"], "other")
        row = {"model": m["model"], "family": fam, "input": f["input"],
               "gmacs": round(f["gmacs"], 3)}
        for p in PRECISIONS:
            est = predict(f[p], consts)
            est_loo = predict(f[p], loo)
            est_lofo = predict(f[p], lofo[fam]) if fam in lofo else est_loo
            row.update({f"{p}_measured_ms": m[p], f"{p}_estimated_ms": round(est, 3),
                        f"{p}_error_pct": round(100 * (est / m[p] - 1), 1),
                        f"{p}_loo_error_pct": round(100 * (est_loo / m[p] - 1), 1),
                        f"{p}_lofo_error_pct": round(100 * (est_lofo / m[p] - 1), 1),
                        f"{p}_in_fit": (m["model"], p) not in OUTLIERS})
        rows.append(row)
    _check_consistency(feats, consts, profile)

    def med(p, key, rows_=rows):
        vals = [abs(r[f"{p}_{key}"]) for r in rows_ if r[f"{p}_in_fit"]]
        return round(float(np.median(vals)), 1) if vals else None

    summary = {p: {"median_abs_error_pct": med(p, "error_pct"),
                   "loo_median_abs_error_pct": med(p, "loo_error_pct"),
                   "lofo_median_abs_error_pct": med(p, "lofo_error_pct"),
                   "lofo_by_family": {fam: med(p, "lofo_error_pct",
                                               [r for r in rows if r["family"] == fam])
                                      for fam in fams}}
               for p in PRECISIONS}
    band = {}
    for p in PRECISIONS:
        ratios = [1 + r[f"{p}_lofo_error_pct"] / 100 for r in rows if r[f"{p}_in_fit"]]
        lo_q, hi_q = np.percentile(ratios, [10, 90])
        band[p] = [round(min(float(lo_q), 1.0), 2), round(max(float(hi_q), 1.0), 2)]
    result = {"date": dt.date.today().isoformat(), "data": data.name,
              "machine": f"{platform.machine()} {platform.system()}, Python "
                         f"{platform.python_version()} (the fit is deterministic, CPU only)",
              "profile": profile.stamp(), "int8_ops": list(INT8_OPS), "fitted": fitted,
              "priors": {k: priors[k]["value"] for k in fitted},
              "band": band, "families": FAMILIES,
              "outliers": {f"{k[0]} {k[1]}": v for k, v in OUTLIERS.items()},
              "models": rows, "summary": summary,
              "sensitivity": [_sensitivity(m["model"], feats[m["model"]], consts, profile)
                              for m in meas] if sensitivity else [],
              "validation": [_validate(Path(v), consts, profile) for v in (
                  [validation] if isinstance(validation, (str, Path)) else validation or [])]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS, result)
    print(render(result))
    if write_profile:
        path = write_constants(fitted, band, result)
        print(f"\nwrote the fitted constants and band to {path.relative_to(ROOT)}")
    return result


def _sensitivity(name: str, f: dict, consts: dict, profile) -> dict:
    """How much each guess moves the estimate: input side +-12.5 %, INT8 layer set."""
    side = zoo_models.input_shape(name)[-1]
    row = {"model": name}
    for p in PRECISIONS:
        base = predict(f[p], consts)
        for tag, s in (("side_-12.5%", round(side * 0.875)), ("side_+12.5%", round(side * 1.125))):
            try:
                g = analyse(name, profile, side=s)
            except RuntimeError:    # a fixed-size classifier head (AlexNet's 256x6x6 FC)
                row[f"{p}_{tag}_pct"] = None
                continue
            row[f"{p}_{tag}_pct"] = round(100 * (predict(g[p], consts) / base - 1), 1)
    g = analyse(name, profile, int8_skip=1)
    row["int8_first_last_fp16_pct"] = round(
        100 * (predict(g["int8"], consts) / predict(f["int8"], consts) - 1), 1)
    row["variants"] = []
    for i, (label, _, _) in enumerate(zoo_models.VARIANTS.get(name, [])):
        g = analyse(name, profile, variant=i)
        row["variants"].append({"variant": label, "input": g["input"], "gmacs": g["gmacs"], **{
            f"{p}_pct": round(100 * (predict(g[p], consts) / predict(f[p], consts) - 1), 1)
            for p in PRECISIONS}})
    return row


def _validate(path: Path, consts: dict, profile) -> dict:
    """Networks of another measured source (same CSV columns), predicted without refit.

    An optional ``input_side`` column gives the square input size the source measured at.
    A precision left empty in the CSV was not measured and is not scored; networks that
    are also in the fit are marked, and the medians are given with and without them."""
    rows = []
    for m in read_measurements(path):
        if m["model"] not in zoo_models.builders():
            rows.append({"model": m["model"], "skipped": "no builder in bench/zoo_models.py"})
            continue
        # the source's input size where it states one (a square side), else the builder's
        side = m["side"] if m["side"] != zoo_models.input_shape(m["model"])[-1] else None
        f = analyse(m["model"], profile, side=side)
        row = {"model": m["model"], "input": f["input"], "gmacs": round(f["gmacs"], 3),
               "in_fit": m["model"] in zoo_models.ZOO}
        for p in PRECISIONS:
            if m[p] is not None:
                est = predict(f[p], consts)
                row.update({f"{p}_measured_ms": m[p], f"{p}_estimated_ms": round(est, 3),
                            f"{p}_error_pct": round(100 * (est / m[p] - 1), 1)})
        rows.append(row)

    def med(p, only_new):
        vals = [abs(r[f"{p}_error_pct"]) for r in rows if f"{p}_error_pct" in r
                and not (only_new and r["in_fit"])]
        return round(float(np.median(vals)), 1) if vals else None

    def rescaled(p):
        """Median |error| once one factor for the whole source (the median ratio) is taken
        out: how well the model orders the networks, apart from a platform offset."""
        ratios = [1 + r[f"{p}_error_pct"] / 100 for r in rows if f"{p}_error_pct" in r]
        if not ratios:
            return None, None
        k = float(np.median(ratios))
        return round(k, 3), round(float(np.median([abs(x / k - 1) for x in ratios])) * 100, 1)
    scaled = {p: rescaled(p) for p in PRECISIONS}
    return {"data": path.name, "models": rows,
            "median_abs_error_pct": {p: med(p, False) for p in PRECISIONS},
            "median_abs_error_pct_not_in_fit": {p: med(p, True) for p in PRECISIONS},
            "median_ratio": {p: scaled[p][0] for p in PRECISIONS},
            "median_abs_error_pct_rescaled": {p: scaled[p][1] for p in PRECISIONS}}


def _check_consistency(feats: dict, consts: dict, profile) -> None:
    """The vectorised fit must price exactly what dopt.npu.costmodel.estimate prices."""
    gi = _grid_index(consts["onchip_buffer_kb"])
    prof = replace(profile, cost_model=dict(profile.cost_model, **dict(
        consts, onchip_buffer_kb=BUFFER_GRID_KB[gi])))
    for name, f in feats.items():
        for p in PRECISIONS:
            got = estimate(f["graph"], f[p + "_report"], prof)["summary"]["total_ms"]
            want = predict_ms(f[p][gi], prof.cost_model)
            if abs(got - want) > 1e-6 * max(1.0, want):
                raise AssertionError(f"{name} {p}: costmodel {got} ms, fit {want} ms")


def write_constants(fitted: dict, band: dict, result: dict) -> Path:
    """Rewrite only the profile's ``cost_model`` constants, band and calibration record."""
    path = PROFILES_DIR / f"{DEFAULT_PROFILE}.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    cm = raw["cost_model"]
    cm.update(fitted)
    cm["band"] = band
    cm["calibrated"] = True
    s = result["summary"]
    cm["calibration"] = {
        "date": result["date"], "data": result["data"],
        "command": "python -m bench.calibrate_cost_model --write-profile",
        "fitted": list(fitted),
        "median_abs_error_pct": {p: s[p]["median_abs_error_pct"] for p in s},
        "loo_median_abs_error_pct": {p: s[p]["loo_median_abs_error_pct"] for p in s},
        "lofo_median_abs_error_pct": {p: s[p]["lofo_median_abs_error_pct"] for p in s},
        "band": "10th-90th percentile of the leave-one-family-out estimate/measurement ratios"}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    load_profile(path)  # validate what was written
    return path


def render(result: dict) -> str:
    fitted = ", ".join(f"{k} = {v:g} (prior {result['priors'][k]:g})"
                       for k, v in result["fitted"].items())
    lines = [f"cost-model calibration on {result['data']} ({result['date']}), profile "
             f"{result['profile']['name']} {result['profile']['version']}",
             f"fitted: {fitted}", "",
             "| model | family | input | GMACs | FP16 measured ms | FP16 est. ms | error | "
             "LOMO | LOFO | INT8 measured ms | INT8 est. ms | error | LOMO | LOFO |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def err(r, p, key="error_pct"):
        return f"{r[f'{p}_{key}']:+.0f} %" + ("" if r[f"{p}_in_fit"] else " (not fitted)")

    for r in result["models"]:
        lines.append(f"| {r['model']} | {r['family']} | {r['input']} | {r['gmacs']:.2f} | "
                     + " | ".join(f"{r[f'{p}_measured_ms']:.2f} | {r[f'{p}_estimated_ms']:.2f} | "
                                  f"{err(r, p)} | {err(r, p, 'loo_error_pct')} | "
                                  f"{err(r, p, 'lofo_error_pct')}" for p in PRECISIONS) + " |")
    s = result["summary"]
    lines += ["", "| median abs error | FP16 | INT8 |", "|---|---|---|"]
    for key, label in (("median_abs_error_pct", "in fit"),
                       ("loo_median_abs_error_pct", "leave-one-model-out"),
                       ("lofo_median_abs_error_pct", "leave-one-family-out")):
        lines.append(f"| {label} | {s['fp16'][key]:.1f} % | {s['int8'][key]:.1f} % |")
    lines += ["", "| family (LOFO median abs error) | FP16 | INT8 |", "|---|---|---|"]
    for fam in s["fp16"]["lofo_by_family"]:
        a, b = s["fp16"]["lofo_by_family"][fam], s["int8"]["lofo_by_family"][fam]
        lines.append(f"| {fam} | {'-' if a is None else f'{a:.1f} %'} | "
                     f"{'-' if b is None else f'{b:.1f} %'} |")
    lines += ["", "band (estimate/measurement, 10th-90th percentile LOFO): "
              + ", ".join(f"{p} {v[0]:.2f}-{v[1]:.2f}" for p, v in result["band"].items())]
    if result["sensitivity"]:
        lines += ["", "| sensitivity | FP16 side -12.5 % | FP16 side +12.5 % | "
                  "INT8 side -12.5 % | INT8 side +12.5 % | INT8 first/last layer FP16 |",
                  "|---|---|---|---|---|---|"]

    def pct(v):
        return "n/a" if v is None else f"{v:+.0f} %"

    for r in result["sensitivity"]:
        lines.append(f"| {r['model']} | " + " | ".join(pct(r[k]) for k in (
            "fp16_side_-12.5%_pct", "fp16_side_+12.5%_pct", "int8_side_-12.5%_pct",
            "int8_side_+12.5%_pct", "int8_first_last_fp16_pct")) + " |")
    variants = [(r, v) for r in result["sensitivity"] for v in r.get("variants", [])]
    if variants:
        lines += ["", "| model variant (another reading of the row's name) | input | GMACs | "
                  "FP16 estimate | INT8 estimate |", "|---|---|---|---|---|"]
        for r, v in variants:
            lines.append(f"| {r['model']}: {v['variant']} | {v['input']} | {v['gmacs']:.2f} | "
                         f"{pct(v['fp16_pct'])} | {pct(v['int8_pct'])} |")
    for v in result.get("validation") or []:
        lines += ["", render_validation(v)]
    return "\n".join(lines)


def render_validation(v: dict) -> str:
    """The validation-only networks: measured, estimated (no refit), error."""
    lines = [f"validation on {v['data']} (predicted with the fitted constants, not refitted)",
             "", "| model | input | GMACs | also in the fit | "
             + " | ".join(f"{p.upper()} measured ms | {p.upper()} est. ms | error"
                          for p in PRECISIONS) + " |",
             "|---|---|---|---|" + "---|---|---|" * len(PRECISIONS)]
    for r in v["models"]:
        if "skipped" in r:
            lines.append(f"| {r['model']} | skipped: {r['skipped']} |")
            continue
        cells = [f"{r[f'{p}_measured_ms']:.2f} | {r[f'{p}_estimated_ms']:.2f} | "
                 f"{r[f'{p}_error_pct']:+.0f} %" if f"{p}_error_pct" in r else "- | - | -"
                 for p in PRECISIONS]
        lines.append(f"| {r['model']} | {r['input']} | {r['gmacs']:.2f} | "
                     f"{'yes' if r['in_fit'] else 'no'} | " + " | ".join(cells) + " |")

    def fmt(x):
        return "-" if x is None else f"{x:.1f} %"
    lines.append("")
    for key, label in (("median_abs_error_pct", "all"),
                       ("median_abs_error_pct_not_in_fit", "not in the fit"),
                       ("median_abs_error_pct_rescaled",
                        "all, after dividing by the median estimate/measurement ratio")):
        lines.append(f"median abs error, {label}: " + ", ".join(
            f"{p.upper()} {fmt(v.get(key, {}).get(p))}" for p in PRECISIONS))
    ratios = v.get("median_ratio", {})
    lines.append("median estimate/measurement ratio: " + ", ".join(
        f"{p.upper()} {'-' if ratios.get(p) is None else f'{ratios[p]:.2f}'}"
        for p in PRECISIONS))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA, help="measured latencies (CSV)")
    ap.add_argument("--write-profile", action="store_true",
                    help="store the fitted constants and the band in the hardware profile")
    ap.add_argument("--validation", type=Path, nargs="+", default=None,
                    help="CSV of other measured networks, predicted without refitting")
    ap.add_argument("--sensitivity", action="store_true",
                    help="also estimate each network at +-12.5 %% input side, with its "
                         "first/last layer FP16 and as the other model variants its name "
                         "may mean (exports about 28 more networks, minutes)")
    args = ap.parse_args(argv)
    run(args.data, args.write_profile, args.validation, args.sensitivity)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
