"""Peak memory and wall time of ``dopt omg`` and ``dopt_so`` against the model's size.

    python -m bench.bench_compile_memory [--models resnet18 resnet50 wide_resnet50_2 vgg16]

For each torchvision network (random weights, exported to ONNX opset 17 by
``bench.compat_models``; torchvision in ``.compat/torchvision``): ``dopt omg`` FP16,
``dopt_so --framework 5`` (calibration-only, 8 random samples) and ``dopt omg`` INT8 from
its output, each in its own process, measured from outside with GNU time (peak RSS, the
process's whole footprint: Python, NumPy, ONNX and ONNX Runtime included). The ratio is
peak RSS over the FP32 ONNX file's size. Writes ``bench/results/compile_memory.json`` and
prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
WORK = HERE / "out" / "compile_memory"
CONF = """strategy: "Quant_INT8-8"
device: USE_CPU
preprocess_parameter:
{
    input_type: BINARY
    input_file_path: "calib.bin"
}
"""


def _run(cmd, cwd) -> dict:
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, cwd=cwd, capture_output=True,
                       text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return {"wall_s": round(wall, 1),
            "peak_rss_mib": round(int(r.stderr.strip().splitlines()[-1]) / 1024)}


def _baseline(cwd) -> dict:
    """The footprint of the imports alone, for reading the rest."""
    return _run([sys.executable, "-c", "import onnx, onnxruntime, numpy; "
                 "import dopt.npu.compiler, dopt.runtime"], cwd)


def run_model(name: str) -> dict:
    import onnx
    from bench.compat_models import export_torchvision
    from dopt.calib.sets import write_bin610
    d = WORK / name
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.onnx"
    if not path.is_file():
        export_torchvision(name, path)
    inp = onnx.load(str(path), load_external_data=False).graph.input[0]
    dims = [x.dim_value or 1 for x in inp.type.tensor_type.shape.dim]
    shape = f"{inp.name}:1,{','.join(map(str, dims[1:]))}"
    write_bin610(d / "calib.bin", np.random.default_rng(0).standard_normal(
        [8] + dims[1:]).astype(np.float32))
    (d / "calib.prototxt").write_text(CONF)
    py = [sys.executable, "-W", "ignore"]
    mb = path.stat().st_size / 2**20
    r = {"model": name, "onnx_mib": round(mb, 1)}
    r["omg_fp16"] = _run(py + ["-m", "dopt", "omg", "--framework", "5", "--model", path.name,
                               "--input_shape", shape, "--output", "fp16"], d)
    r["dopt_so"] = _run(py + ["-m", "dopt.dopt_so", "--mode", "0", "--framework", "5",
                              "--model", path.name, "--cal_conf", "calib.prototxt", "--output",
                              "q.onnx", "--input_shape", shape, "--compress_conf", "param",
                              "--relax_path_rules"], d)
    r["omg_int8"] = _run(py + ["-m", "dopt", "omg", "--framework", "5", "--model", "q.onnx",
                               "--compress_conf", "param", "--input_shape", shape, "--output",
                               "int8"], d)
    for k in ("omg_fp16", "dopt_so", "omg_int8"):
        r[k]["ratio"] = round(r[k]["peak_rss_mib"] / mb, 2)
    return r


def table(rows, base) -> str:
    lines = [f"Imports alone: {base['peak_rss_mib']} MiB.", "",
             "| model | FP32 ONNX | omg FP16: peak (x model), wall | dopt_so: peak (x), wall | "
             "omg INT8: peak (x), wall |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k]['peak_rss_mib']} MiB ({r[k]['ratio']}x), {r[k]['wall_s']} s"
                 for k in ("omg_fp16", "dopt_so", "omg_int8")]
        lines.append(f"| {r['model']} | {r['onnx_mib']} MiB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+",
                    default=["resnet18", "resnet50", "wide_resnet50_2", "vgg16"])
    a = ap.parse_args(argv)
    if not Path("/usr/bin/time").is_file():
        print("GNU time (/usr/bin/time) is needed to measure peak RSS", file=sys.stderr)
        return 2
    WORK.mkdir(parents=True, exist_ok=True)
    base = _baseline(WORK)
    rows = []
    for name in a.models:
        rows.append(run_model(name))
        print(json.dumps(rows[-1]), flush=True)
    OUT.mkdir(exist_ok=True)
    path = OUT / "compile_memory.json"
    # rows of models not measured in this run are kept (each row carries its date)
    kept = json.loads(path.read_text()).get("rows", []) if path.is_file() else []
    day = time.strftime("%Y-%m-%d")
    for r in rows:
        r["date"] = day
    rows = [r for r in kept if r["model"] not in a.models] + rows
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                               "date": day, "imports": base, "rows": rows}, indent=1))
    tmp.replace(path)
    print(table(rows, base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
