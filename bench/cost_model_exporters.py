"""The same network exported from Keras and from PyTorch: does the estimate agree?

    python -m bench.cost_model_exporters [--models MobileNetV3Large ResNet50 ...]

Each network is built twice with random weights: ``keras.applications`` exported to ONNX by
tf2onnx (opset 17), and the torchvision twin exported by ``torch.onnx`` (opset 17). Each
file is estimated FP16 and INT8 (every weighted layer requested), as ``dopt omg`` compiles
it, and also lowered without the compiler's preparation (``raw``: the exporter's Transposes
and spelled-out activations left in), to show what the preparation changes. Files are
cached in ``bench/out/exporters``. Writes ``bench/results/cost_model_exporters.json``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from pathlib import Path

from dopt.formats.fileio import write_json_atomic

from .calibrate_cost_model import INT8_OPS   # every weighted layer, as the calibration

OUT = Path(__file__).resolve().parent / "out" / "exporters"
RESULTS = Path(__file__).resolve().parent / "results" / "cost_model_exporters.json"
# name -> (keras.applications class, torchvision name, input side)
NETS = {
    "MobileNetV2": ("MobileNetV2", "mobilenet_v2", 224),
    "MobileNetV3Large": ("MobileNetV3Large", "mobilenet_v3_large", 224),
    "MobileNetV3Small": ("MobileNetV3Small", "mobilenet_v3_small", 224),
    "ResNet50": ("ResNet50", "resnet50", 224),
    "InceptionV3": ("InceptionV3", "inception_v3", 299),
    "DenseNet121": ("DenseNet121", "densenet121", 224),
    "EfficientNetB0": ("EfficientNetB0", "efficientnet_b0", 224),
}


def export_keras(name: str) -> Path:
    path = OUT / f"{name}.keras.onnx"
    if not path.exists():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import keras
        import tensorflow as tf
        import tf2onnx
        cls, _, side = NETS[name]
        model = getattr(keras.applications, cls)(weights=None, input_shape=(side, side, 3))
        spec = (tf.TensorSpec((1, side, side, 3), tf.float32, name="input"),)
        OUT.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=str(tmp))
        tmp.replace(path)
    return path


def export_torch(name: str) -> Path:
    path = OUT / f"{name}.torch.onnx"
    if not path.exists():
        import torch

        from .compat_models import torchvision_models_module
        _, tv, side = NETS[name]
        kw = {"aux_logits": False, "init_weights": False} if tv == "inception_v3" else {}
        model = torchvision_models_module().get_model(tv, weights=None, **kw).eval()
        OUT.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.onnx.export(model, torch.zeros(1, 3, side, side), str(tmp), opset_version=17,
                          dynamo=False)
        tmp.replace(path)
    return path


def estimates(path: Path, prepared: bool) -> dict:
    import onnx

    from dopt.npu.costmodel import estimate
    from dopt.npu.lower import lower_onnx
    from dopt.npu.precheck import precheck
    from dopt.npu.prepare import prepare
    from dopt.npu.profile import DEFAULT_PROFILE, load_profile
    profile = load_profile(DEFAULT_PROFILE)
    model = onnx.load(str(path))
    graph = lower_onnx(prepare(model) if prepared else model)
    int8 = [n.name for n in graph.nodes if n.op in INT8_OPS]
    out = {}
    for prec, nodes in (("fp16", ()), ("int8", int8)):
        s = estimate(graph, precheck(graph, profile, nodes), profile)["summary"]
        out[prec + "_ms"] = round(s["total_ms"], 3)
        out["kernels"] = s["kernels"]
    out["permute_nodes"] = sum(n.op == "Permute" for n in graph.nodes)
    return out


def run(models) -> dict:
    rows = []
    for name in models:
        k, t = export_keras(name), export_torch(name)
        row = {"model": name, "keras_raw": estimates(k, False), "keras": estimates(k, True),
               "torch": estimates(t, True)}
        for p in ("fp16", "int8"):
            row[f"{p}_keras_over_torch"] = round(row["keras"][f"{p}_ms"]
                                                 / row["torch"][f"{p}_ms"], 3)
            row[f"{p}_raw_keras_over_torch"] = round(row["keras_raw"][f"{p}_ms"]
                                                     / row["torch"][f"{p}_ms"], 3)
        rows.append(row)
        print(line(row), flush=True)
    result = {"date": dt.date.today().isoformat(), "models": rows}
    write_json_atomic(RESULTS, result)
    return result


HEADER = ("| model | Permute nodes, Keras raw / prepared | kernels Keras raw / prepared / "
          "PyTorch | FP16 ms Keras raw / prepared / PyTorch | INT8 ms Keras raw / prepared / "
          "PyTorch |\n|---|---|---|---|---|")


def line(r: dict) -> str:
    kr, k, t = r["keras_raw"], r["keras"], r["torch"]
    return (f"| {r['model']} | {kr['permute_nodes']} / {k['permute_nodes']} | {kr['kernels']} / "
            f"{k['kernels']} / {t['kernels']} | "
            + " | ".join(f"{kr[p]:.2f} / {k[p]:.2f} / {t[p]:.2f}" for p in ("fp16_ms", "int8_ms"))
            + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(NETS), choices=list(NETS))
    args = ap.parse_args(argv)
    print(HEADER, flush=True)
    run(args.models)
    print(json.dumps({"results": str(RESULTS.relative_to(RESULTS.parents[2]))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
