"""INT8 compatibility: public networks through the no-training INT8 path, on the emulated NPU.

    python -m bench.bench_compat_int8                  # one torchvision net per family
    python -m bench.bench_compat_int8 --models resnet18,mobilenet_v2
    python -m bench.bench_compat_int8 --write-doc      # regenerate the table in the doc

Each torchvision network (``bench/compat_models.py``: random weights, BatchNorm statistics
re-estimated, ONNX opset 17) takes the path a user of an ONNX model takes, in a fresh worker
process under a time limit: ``dopt_so`` calibration (8 random inputs, the defaults: every
weighted layer INT8) writes the QDQ model and the parameter file, ``dopt omg`` compiles the
INT8 ``.om``, and the emulated NPU (fast engine) runs it on 2 random inputs. Checked: the
compile and the run succeed, the outputs are finite, every INT8 kernel is bit-exact to the
reference interpreter on one input (``dopt.runtime.verify``), and the outputs against the
QDQ model on ONNX Runtime (max |difference| / max |QDQ output|, top-1 agreement). The QDQ
model computes float32 between quantization points where the NPU computes FP16, so the two
differ by FP16 rounding; a network whose FP16 range the pre-check flagged is reported as
such. Results: ``bench/results/compat_int8.json`` and the table in
``docs/compatibility.md``.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .bench_compat import merge_rerun, rel_err, run_worker, write_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "compat_int8.json"
DOC = ROOT / "docs" / "compatibility.md"
TAG = "COMPAT_INT8_RESULT "
CALIB_SAMPLES = 8


def check(name: str) -> dict:
    import onnxruntime as ort

    from bench.bench_npu_runtime import CALIB_CONF
    from bench.compat_models import export_torchvision
    from dopt import runtime
    from dopt.calib.sets import write_bin610
    from dopt.runtime.verify import kernel_agreement

    row: dict = {"model": name, "status": "ok"}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _, shape = export_torchvision(name, d / "float.onnx")
        rng = np.random.default_rng(0)
        calib = rng.standard_normal((CALIB_SAMPLES,) + tuple(shape[1:])).astype(np.float32)
        write_bin610(d / "calib.bin", calib)
        (d / "calib.prototxt").write_text(CALIB_CONF)
        dims = "input:" + ",".join(map(str, shape))
        t0 = time.perf_counter()
        for cmd in (["-m", "dopt.dopt_so", "--mode", "0", "--framework", "5", "--model",
                     "float.onnx", "--cal_conf", "calib.prototxt", "--output", "q.onnx",
                     "--input_shape", dims, "--compress_conf", "param", "--relax_path_rules"],
                    ["-m", "dopt", "omg", "--framework", "5", "--model", "q.onnx",
                     "--compress_conf", "param", "--input_shape", dims, "--output", "int8",
                     "--check_report", "report.json"]):
            r = subprocess.run([sys.executable, "-W", "ignore"] + cmd, cwd=d,
                               capture_output=True, text=True)
            if r.returncode:
                tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
                row.update(status=f"refused by {cmd[1].split('.')[-1]}", reason=tail[:400])
                return row
        row["quantize_and_compile_s"] = round(time.perf_counter() - t0, 1)
        row["fp16_range"] = bool(json.loads((d / "report.json").read_text())["fp16_range"])
        sess = runtime.load(d / "int8.om")
        kernels = sess.om.graph["kernels"]
        row["int8_layers"] = len(sess.om.quant["int8_layers"])
        row["kernels"] = len(kernels)
        row["cpu_kernels"] = sum(k["device"] != "npu" for k in kernels)
        x = rng.standard_normal((2,) + tuple(shape[1:])).astype(np.float32)
        y = next(iter(sess.run(x).values()))
        q = ort.InferenceSession(str(d / "q.onnx"), providers=["CPUExecutionProvider"])
        ref = q.run(None, {q.get_inputs()[0].name: x})[0]
        row["finite"] = bool(np.all(np.isfinite(y)))
        row["rel_err_vs_qdq"] = rel_err(ref, y) if row["finite"] else None
        row["top1_agree_vs_qdq"] = float(np.mean(ref.reshape(len(ref), -1).argmax(1)
                                                 == y.reshape(len(y), -1).argmax(1)))
        rows = kernel_agreement(sess.om, {sess.inputs[0]["name"]: x[:1]})
        int8 = [r for r in rows if r["precision"] == "int8"]
        row["int8_kernels_exact"] = f"{sum(r['exact'] for r in int8)}/{len(int8)}"
        row["kernels_outside_bound"] = [r["kernel"] for r in rows if not r["within_bound"]][:10]
    if row["kernels_outside_bound"] or any(not r["exact"] for r in int8):
        row["status"] = "mismatch (engine vs reference)"
    elif not row["finite"]:
        row["status"] = "FP16 range (predicted)" if row["fp16_range"] else "non-finite"
    elif row["top1_agree_vs_qdq"] < 1.0 and row["fp16_range"]:
        row["status"] = "FP16 range (predicted)"
    return row


def _worker(name: str) -> int:
    t0 = time.perf_counter()
    try:
        row = check(name)
    except Exception as e:  # noqa: BLE001 - a crash is a result here
        import traceback
        traceback.print_exc()
        row = {"model": name, "status": "crash", "reason": f"{type(e).__name__}: {e}"[:400]}
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    print(TAG + json.dumps(row), flush=True)
    return 0


def run_one(name: str, timeout: int) -> dict:
    return run_worker(["-W", "ignore", "-m", "bench.bench_compat_int8", "--worker", name], TAG,
                      timeout, {"model": name})


def table(rows: list[dict]) -> str:
    lines = ["| network | result | INT8 layers | kernels (CPU) | INT8 kernels bit-exact | "
             "NPU vs QDQ on ORT | top-1 vs QDQ | quantize + compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] in ("crash", "timeout") or r["status"].startswith("refused"):
            lines.append(f"| {r['model']} | {r['status']}: {r.get('reason', '')} | | | | | | |")
            continue
        err = "non-finite" if r["rel_err_vs_qdq"] is None else f"{r['rel_err_vs_qdq']:.1e}"
        lines.append(f"| {r['model']} | {r['status']} | {r['int8_layers']} | {r['kernels']} "
                     f"({r['cpu_kernels']}) | {r['int8_kernels_exact']} | {err} | "
                     f"{r['top1_agree_vs_qdq']:.0%} | {r['quantize_and_compile_s']} |")
    return "\n".join(lines)


def write_doc(result: dict) -> None:
    write_table(DOC, "compat-int8", result, table)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="", help="comma-separated names (default: one per "
                                                 "torchvision family)")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--write-doc", action="store_true", help="only rewrite the doc table")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return _worker(a.worker)
    if a.write_doc:
        write_doc(json.loads(RESULTS.read_text()))
        return 0
    from bench.compat_models import torchvision_names
    names = a.models.split(",") if a.models else torchvision_names()
    rows = []
    for name in names:
        row = run_one(name, a.timeout)
        print(f"{name}: {row['status']}", flush=True)
        rows.append(row)
    result = {"command": ("python -m bench.bench_compat_int8 "
                          + " ".join(sys.argv[1:] if argv is None else argv)).rstrip(),
              "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
              "rows": rows}
    if a.models and RESULTS.is_file():
        # a re-run of some networks replaces their rows in the last full result and says so
        result = merge_rerun(RESULTS, result, lambda r: r["model"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(RESULTS)
    write_doc(result)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
