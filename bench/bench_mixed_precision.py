"""Accuracy-driven mixed precision (``dopt deploy``), alone and against NNCF.

**Comparison rows** (``--compare``, the default): on models where INT8 loses accuracy,
``dopt deploy`` against NNCF's ``quantize_with_accuracy_control`` on the same float ONNX
file, the same calibration samples, the same evaluation set and metric, the same absolute
``max_drop`` (``bench/mp_models.py``): EfficientNet-Lite0 (ImageNet weights; top-1
agreement with float on photo crops), PP-OCRv4 det (text-mask IoU vs float) and
Fashion-MNIST MobileNetV2S (top-1 on the real test labels; dopt calibrates with ``minmax``
without bias correction there, NNCF with its defaults). Per tool: the drop reached, the
layers left float, the estimated NPU latency of the result, the full evaluations and the
wall time. NNCF's result is a QDQ model, which ``dopt omg`` would read as its float graph
(QDQ stripped, no parameter file); its latency is therefore that of dopt's build with the
same layers float (``mp_models.dopt_variant``).

**dopt-only rows** (``--models``): the Fashion-MNIST networks through the PyTorch path, the
drop on the 10k test set, in dopt's default calibration (``mse`` + bias correction) and
``minmax`` without bias correction.

    python -m bench.bench_mixed_precision                 # comparison rows (~1.5 h, 2 cores)
    python -m bench.bench_mixed_precision --compare efficientnet_lite0 --drops efficientnet_lite0=3
    python -m bench.bench_mixed_precision --compare '' --models mobilenetv2s   # dopt-only rows

Writes ``bench/results/mixed_precision.json`` (rows not re-run are kept) and prints a
Markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CONFIG = """strategy: "Quant_INT8-8"
device: USE_CPU
{extra}preprocess_parameter:
{{
    input_type: BINARY
    input_file_path: "calib.bin"
}}
"""
SETTINGS = {
    "default": "",
    "minmax-nobc": 'calibration_algorithm: "minmax"\nbias_correction: false\n',
}
CLASSES = {"mobilenetv2s": "MobileNetV2S", "resnet8": "ResNet8"}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --- dopt-only rows (Fashion-MNIST, PyTorch path) ------------------------------------------

def project(out: Path, model: str, setting: str, max_drop: float, n_test: int) -> Path:
    import numpy as np
    from dopt.calib.sets import write_bin610
    from demos.fashion_mnist import data
    d = out / f"{model}_{setting}"
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "calib.bin").is_file():
        x, _ = data.load("train", limit=512)
        write_bin610(d / "calib.bin", x)
        xt, yt = data.load("test", limit=n_test)
        write_bin610(d / "test.bin", xt)
        np.save(d / "labels.npy", yt)
    (d / "config.prototxt").write_text(CONFIG.format(extra=SETTINGS[setting]))
    fm = ROOT / "demos" / "fashion_mnist"
    (d / "deploy.yaml").write_text(f"""model: {fm / 'models.py'}:{CLASSES[model]}
weights: {fm / 'weights' / (model + '.pth')}
input_shape: "x:1,1,28,28"
calibration: config.prototxt
evaluation: {{binary: test.bin, labels: labels.npy}}
mixed_precision: {{max_evaluations: 12}}
gates:
  accuracy: {{max_drop: {max_drop}}}
output: out
""")
    return d / "deploy.yaml"


def dopt_only_row(out: Path, model: str, setting: str, max_drop: float, n_test: int) -> dict:
    from dopt.deploy import run
    cfg = project(out, model, setting, max_drop, n_test)
    t0 = time.perf_counter()
    rep = run(cfg, resume=False)
    wall = time.perf_counter() - t0
    r, mp = rep["results"], rep["mixed_precision"] or {}
    return {"model": model, "setting": setting, "max_drop": max_drop,
            "float": r["float"]["metric"],
            "all_int8_simulated_drop": r["simulated_all_int8"]["drop"],
            "simulated_drop": r["simulated"]["drop"], "deployed_drop": r["deployed"]["drop"],
            "fp16_layers": rep["quantization"]["fp16_layers"],
            "int8_layers": len(rep["quantization"]["int8_layers"]),
            "latency_ms": r["latency_ms"]["deployed"],
            "latency_all_int8_ms": r["latency_ms"]["int8_all"],
            "latency_fp16_ms": r["latency_ms"]["fp16"],
            "full_evaluations": mp.get("full_evaluations", 0),
            "search_s": mp.get("seconds", 0.0), "wall_s": round(wall, 1),
            "status": rep["status"]}


# --- comparison rows (dopt deploy vs NNCF) -------------------------------------------------

def _step_s(rep: dict, name: str) -> float | None:
    return next((s["seconds"] for s in rep["steps"] if s["step"] == name), None)


def compare_row(name: str, out: Path, max_drop: float, n_calib=None, n_eval=None,
                max_evaluations: int = 12, nncf_row: dict | None = None) -> dict:
    """One comparison row. ``nncf_row``: NNCF's figures from an earlier run of the same
    row (same data, model and max_drop) to reuse instead of running NNCF again; its float
    set is still compiled by this run's dopt build for the latency."""
    from bench import mp_models as M
    from dopt.deploy import run

    work = out / name
    info = M.prepare(name, work, n_calib, n_eval)
    n = info["n_eval"]
    log(f"[{name}] prepared: {info}")
    cfg = M.write_project(name, work, max_drop, max_evaluations)
    M.CALLS["dopt"].clear()
    t0 = time.perf_counter()
    rep = run(cfg, resume=False)
    dopt_wall = time.perf_counter() - t0
    r, mp = rep["results"], rep["mixed_precision"] or {}
    calls = list(M.CALLS["dopt"])
    fp16 = rep["quantization"]["fp16_layers"]
    dopt = {
        "tool": f"dopt {rep['versions']['dopt']}", "calibration": rep["quantization"]["algorithm"]
        + ("" if rep["quantization"]["bias_correction"] else ", no bias correction"),
        "float_metric": r["float"]["metric"],
        "all_int8_drop": r["simulated_all_int8"]["drop"],
        "drop": r["simulated"]["drop"], "deployed_drop": r["deployed"]["drop"],
        "deployed_fp16_drop": r["deployed_fp16"]["drop"],
        "float_layers": fp16, "int8_layers": len(rep["quantization"]["int8_layers"]),
        "float_layers_ptq": rep["quantization"]["float_layers_ptq"],
        "latency_ms": r["latency_ms"]["deployed"], "latency_all_int8_ms": r["latency_ms"]["int8_all"],
        "latency_fp16_ms": r["latency_ms"]["fp16"],
        "full_evaluations": mp.get("full_evaluations", 0),
        "budget_exhausted": mp.get("budget_exhausted", False),
        "metric_calls": len(calls), "full_evaluation_equivalents": round(sum(calls) / n, 2),
        "search_s": mp.get("seconds", 0.0), "sensitivity_s": _step_s(rep, "sensitivity"),
        "wall_s": round(dopt_wall, 1), "status": rep["status"],
        "met_max_drop": r["simulated"]["drop"] <= max_drop,
    }
    log(f"[{name}] dopt: {json.dumps({k: v for k, v in dopt.items() if k != 'float_layers_ptq'})}")
    if nncf_row is not None:
        nn = dict(nncf_row)
        nn["reused_from"] = nncf_row.get("run_at") or "an earlier run"
    else:
        nn = M.nncf_accuracy_control(name, work, max_drop)
    nn["met_max_drop"] = nn["drop"] is not None and nn["drop"] <= max_drop
    # NNCF's choice compiled by dopt: the same layers float in dopt's build
    chosen = nn["float_layers"] + nn["partly_quantized"]
    var = M.dopt_variant(work / "out", chosen)
    nn["latency_ms"] = var["latency_ms"]
    nn["dopt_build_with_nncf_float_set"] = {
        "fp16_layers": len(var["fp16_layers"]), "not_int8_in_dopt": var["not_int8_in_dopt"],
        "simulated_drop": r["float"]["metric"] - var["simulated_metric"]}
    nn["latency_qdq_compiled_directly_ms"] = M.compile_qdq_directly(work / "out", work / "nncf.onnx")
    log(f"[{name}] nncf: {json.dumps(nn)}")
    return {"model": name, "metric": info["metric"], "max_drop": max_drop,
            "n_calib": info["n_calib"], "n_eval": n, "data": info, "dopt": dopt, "nncf": nn}


# --- output -----------------------------------------------------------------------------------

def _f(v, d=2):
    return "-" if v is None else f"{v:.{d}f}"


def table_compare(rows) -> str:
    lines = ["| model (metric, max_drop) | tool | all-INT8 drop | result drop | layers float | "
             "est. latency ms (result / all-INT8 / all-FP16) | full evals in search "
             "(all metric calls, in full-set units) | wall s |",
             "|---|---|---:|---:|---|---|---|---:|"]
    for row in rows:
        d, nn = row["dopt"], row["nncf"]
        head = (f"{row['model']} ({row['metric']}, {row['max_drop']:g}; "
                f"K={row['n_calib']}, N={row['n_eval']})")
        lines.append(
            f"| {head} | dopt | {_f(d['all_int8_drop'])} | {_f(d['drop'])} "
            f"(deployed {_f(d['deployed_drop'])}) | {len(d['float_layers'])} | "
            f"{_f(d['latency_ms'], 4)} / {_f(d['latency_all_int8_ms'], 4)} / "
            f"{_f(d['latency_fp16_ms'], 4)} | {d['full_evaluations']} "
            f"({d['metric_calls']} calls, {_f(d['full_evaluation_equivalents'], 1)}) | "
            f"{d['wall_s']:.0f} |")
        ai = None if nn["all_int8_metric"] is None else nn["float_metric"] - nn["all_int8_metric"]
        nfl = len(nn["float_layers"]) + len(nn["partly_quantized"])
        lines.append(
            f"| | NNCF | {_f(ai)} | {_f(nn['drop'])} | {nfl}"
            f" | {_f(nn['latency_ms'], 4)} (dopt build, same float layers) | "
            f"{max(nn['full_set_calls'] - 2, 0)} + {nn['subset_calls']} ranking "
            f"({nn['validation_calls']} calls, {_f(nn['full_evaluation_equivalents'], 1)}) | "
            f"{nn['wall_s']:.0f} |")
    return "\n".join(lines)


def table_dopt_only(rows) -> str:
    lines = ["| model, calibration | float | all-INT8 drop (sim.) | result drop (sim. / deployed) | "
             "FP16 layers | est. latency (result / all-INT8 / all-FP16) | full evaluations | wall |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']}, {r['setting']} | {r['float']:.2f} | "
                     f"{r['all_int8_simulated_drop']:.2f} | {r['simulated_drop']:.2f} / "
                     f"{r['deployed_drop']:.2f} | {len(r['fp16_layers'])} | "
                     f"{r['latency_ms']:.4f} / {r['latency_all_int8_ms']:.4f} / "
                     f"{r['latency_fp16_ms']:.4f} ms | {r['full_evaluations']} | {r['wall_s']:.0f} s |")
    return "\n".join(lines)


def _versions() -> dict:
    import importlib.metadata as md
    v = {"python": platform.python_version()}
    for pkg in ("dopt", "numpy", "torch", "onnx", "onnxruntime", "nncf", "rapidocr-onnxruntime"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    return v


def main(argv=None) -> int:
    from bench import mp_models as M
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compare", default=",".join(M.MODELS),
                    help=f"comparison rows, from {list(M.MODELS)} ('' for none)")
    ap.add_argument("--drops", default="",
                    help="max_drop per comparison model, e.g. efficientnet_lite0=3,ppocr_det=3 "
                         "(default: " + ", ".join(f"{k} {v['max_drop']}" for k, v in M.MODELS.items())
                    + ")")
    ap.add_argument("--calib", type=int, default=0, help="calibration samples (comparison rows)")
    ap.add_argument("--eval", type=int, default=0, help="evaluation samples (comparison rows)")
    ap.add_argument("--max-evaluations", type=int, default=12, help="dopt's search budget")
    ap.add_argument("--reuse-nncf", action="store_true",
                    help="comparison rows: take NNCF's figures from the results file (same "
                         "model and max_drop) instead of running it again")
    ap.add_argument("--models", default="", help="dopt-only rows: mobilenetv2s,resnet8")
    ap.add_argument("--settings", default="default,minmax-nobc")
    ap.add_argument("--max-drop", type=float, default=0.05, help="dopt-only rows, top-1 points")
    ap.add_argument("--test", type=int, default=10000, help="dopt-only rows: test images")
    ap.add_argument("--out", default=str(HERE / "out" / "mixed_precision"))
    ap.add_argument("--results", default=str(HERE / "results" / "mixed_precision.json"))
    a = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    command = "python -m bench.bench_mixed_precision " + " ".join(argv)
    drops = {k: float(v) for k, v in (p.split("=") for p in a.drops.split(",") if p)}
    res_path = Path(a.results)
    doc = json.loads(res_path.read_text()) if res_path.is_file() else {}
    doc.setdefault("rows", [])
    for r in doc["rows"]:          # rows of files written before rows carried their command
        r.setdefault("command", doc.get("command"))
    doc.pop("command", None)
    doc.setdefault("comparison", [])
    out = Path(a.out)

    def save():
        doc.update(date=time.strftime("%Y-%m-%d"), machine=platform.platform(),
                   versions=_versions(), python=platform.python_version())
        res_path.parent.mkdir(parents=True, exist_ok=True)
        from dopt.formats.fileio import atomic_path
        with atomic_path(res_path) as tmp:      # an interrupted save keeps the last file
            tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")

    for name in [m for m in a.compare.split(",") if m]:
        if name not in M.MODELS:
            raise SystemExit(f"unknown comparison model {name!r}; known: {list(M.MODELS)}")
        drop = drops.get(name, M.MODELS[name]["max_drop"])
        prev = next((r for r in doc["comparison"] if r["model"] == name
                     and r["max_drop"] == drop), None)
        if a.reuse_nncf and prev is None:
            raise SystemExit(f"--reuse-nncf: no earlier {name} row with max_drop {drop} in "
                             f"{res_path}")
        nncf_row = dict(prev["nncf"], run_at=prev.get("run_at")) if a.reuse_nncf else None
        row = compare_row(name, out / "compare", drop, a.calib or None, a.eval or None,
                          a.max_evaluations, nncf_row=nncf_row)
        row.update(command=command, run_at=time.strftime("%Y-%m-%d %H:%M:%S"))
        doc["comparison"] = [r for r in doc["comparison"] if r["model"] != name] + [row]
        save()
    for model in [m for m in a.models.split(",") if m]:
        for setting in a.settings.split(","):
            row = dopt_only_row(out, model, setting, a.max_drop, a.test)
            row.update(command=command)
            doc["rows"] = [r for r in doc["rows"]
                           if (r["model"], r["setting"]) != (model, setting)] + [row]
            print(json.dumps(row))
            save()
    if doc["comparison"]:
        print(table_compare(doc["comparison"]))
    if doc["rows"]:
        print(table_dopt_only(doc["rows"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
