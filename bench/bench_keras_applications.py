"""``keras.applications`` architectures through ``dopt omg --framework 3``, FP16 and INT8.

    python -m bench.bench_keras_applications [--models MobileNetV2 ResNet50 InceptionV3]

Each model is built with ``weights=None`` (no download), saved as ``.keras`` and:
(1) compiled to an FP16 ``.om`` straight from the ``.keras`` file; (2) quantized with a
calibration-only parameter file by ``dopt_so --framework 3`` (16 random images, the
default algorithm), then compiled to an INT8 ``.om`` from the ``.pb`` it writes. The
pre-check report of each compile lists every CPU fallback with its rule and reason; the
table counts them. Wall time and peak RSS of each command are measured from outside.
Writes bench/results/keras_applications.json and prints a Markdown table.
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

from dopt.formats.fileio import write_json_atomic

OUT = Path(__file__).resolve().parent / "results"
SIZES = {"MobileNetV2": 224, "ResNet50": 224, "InceptionV3": 299}
CONF = """strategy: "Quant_INT8-8"
device: USE_CPU
preprocess_parameter:
{
    input_type: BINARY
    input_file_path: "calib.bin"
}
"""


def _run(cmd, cwd) -> dict:
    """Run a command; wall time and its peak RSS (GNU time's %M, when GNU time exists)."""
    gnu_time = Path("/usr/bin/time").is_file()
    t = time.perf_counter()
    r = subprocess.run((["/usr/bin/time", "-f", "%M"] if gnu_time else []) + cmd, cwd=cwd,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    peak = None
    if gnu_time:
        peak = round(int(r.stderr.strip().splitlines()[-1]) / 1024)
    return {"wall_s": round(wall, 1), "peak_rss_mib": peak, "stdout": r.stdout}


def _report(path: Path) -> dict:
    rep = json.loads(path.read_text())
    cpu = [{"node": n["node"], "op": n.get("op"), "reason": n.get("reason")}
           for n in rep["nodes"] if n["outcome"] == "cpu"]
    return {"summary": rep["summary"], "cpu_fallbacks": cpu}


def run_model(name: str, work: Path) -> dict:
    import keras
    from dopt.calib.sets import write_bin610
    size = SIZES[name]
    m = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    m.save(work / f"{name}.keras")
    write_bin610(work / "calib.bin", np.random.default_rng(0).uniform(
        -1, 1, (16, size, size, 3)).astype(np.float32))
    (work / "calib.prototxt").write_text(CONF)
    # the InputLayer's name: 'input_layer' in a fresh process, numbered after that
    shape = f"{m.inputs[0]._keras_history[0].name}:1,{size},{size},3"
    py = [sys.executable, "-W", "ignore"]
    r = {"model": name, "params": int(m.count_params()), "input": shape}
    fp16 = _run(py + ["-m", "dopt", "omg", "--framework", "3", "--model", f"{name}.keras",
                      "--input_shape", shape, "--output", "fp16", "--check_report",
                      "fp16.json"], work)
    so = _run(py + ["-m", "dopt.dopt_so", "--mode", "0", "--framework", "3", "--model",
                    f"{name}.keras", "--cal_conf", "calib.prototxt", "--output", "q.pb",
                    "--input_format", "NHWC", "--input_shape", shape, "--compress_conf",
                    "param", "--relax_path_rules"], work)
    int8 = _run(py + ["-m", "dopt", "omg", "--framework", "3", "--model", "q.pb",
                      "--input_shape", shape, "--compress_conf", "param", "--output", "int8",
                      "--check_report", "int8.json"], work)
    for key, res, om, rep in (("fp16", fp16, "fp16.om", "fp16.json"),
                              ("int8", int8, "int8.om", "int8.json")):
        r[key] = {"wall_s": res["wall_s"], "peak_rss_mib": res["peak_rss_mib"],
                  "om_mb": round((work / om).stat().st_size / 1e6, 3),
                  "summary_line": res["stdout"].strip().splitlines()[-1]} | _report(work / rep)
    r["dopt_so"] = {"wall_s": so["wall_s"], "peak_rss_mib": so["peak_rss_mib"]}
    r["int8_layers"] = len(json.loads((work / "param").read_text())["layers"])
    return r


def table(rows) -> str:
    lines = ["| model | params | FP16 .om MB | INT8 .om MB | INT8 layers | CPU fallbacks "
             "FP16 / INT8 | omg FP16 s | dopt_so s | omg INT8 s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r['fp16']['om_mb']:.1f} | "
                     f"{r['int8']['om_mb']:.1f} | {r['int8_layers']} | "
                     f"{len(r['fp16']['cpu_fallbacks'])} / {len(r['int8']['cpu_fallbacks'])} | "
                     f"{r['fp16']['wall_s']} | {r['dopt_so']['wall_s']} | {r['int8']['wall_s']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(SIZES), choices=list(SIZES))
    a = ap.parse_args(argv)
    rows = []
    for name in a.models:
        with tempfile.TemporaryDirectory(prefix=f"kapp-{name}-") as d:
            rows.append(run_model(name, Path(d)))
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("fp16", "int8")}),
              flush=True)
    import tensorflow as tf
    doc = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
           "tensorflow": tf.__version__,
           "command": "python -m bench.bench_keras_applications " + " ".join(argv or sys.argv[1:]),
           "results": rows}
    OUT.mkdir(exist_ok=True)
    write_json_atomic(OUT / "keras_applications.json", doc, indent=1)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
