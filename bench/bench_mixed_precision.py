"""Accuracy-driven mixed precision (``dopt deploy``) on the Fashion-MNIST networks.

For each model and setting: the drop reached against float on the 10k test set (top-1,
the deployed ``.om`` on the emulated NPU and the simulated QDQ model), the layers left
FP16, the estimated NPU latency of the result (all-INT8 and all-FP16 for reference), the
number of full evaluations and the wall time. Settings: dopt's default calibration
(``mse`` + bias correction) and the harder ``minmax`` without bias correction, each with a
tight ``max_drop``.

    python -m bench.bench_mixed_precision [--models mobilenetv2s,resnet8] [--test 10000]

Writes ``bench/results/mixed_precision.json``. NNCF's ``quantize_with_accuracy_control``
is the peer the issue names; it is not installed in the main environment (see
docs/benchmarks.md for the gap).
"""
from __future__ import annotations

import argparse
import json
import platform
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="mobilenetv2s")
    ap.add_argument("--settings", default="default,minmax-nobc")
    ap.add_argument("--max-drop", type=float, default=0.05, help="top-1 points")
    ap.add_argument("--test", type=int, default=10000)
    ap.add_argument("--out", default=str(HERE / "out" / "mixed_precision"))
    ap.add_argument("--results", default=str(HERE / "results" / "mixed_precision.json"))
    a = ap.parse_args(argv)
    from dopt.deploy import run
    rows = []
    for model in a.models.split(","):
        for setting in a.settings.split(","):
            cfg = project(Path(a.out), model, setting, a.max_drop, a.test)
            t0 = time.perf_counter()
            rep = run(cfg, resume=False)
            wall = time.perf_counter() - t0
            r, mp = rep["results"], rep["mixed_precision"] or {}
            row = {"model": model, "setting": setting, "max_drop": a.max_drop,
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
            rows.append(row)
            print(json.dumps(row))
    doc = {"command": "python -m bench.bench_mixed_precision " + " ".join(argv or []),
           "date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
           "python": platform.python_version(), "rows": rows}
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
