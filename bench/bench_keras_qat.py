"""Keras 3 plugin-mode benchmark on Fashion-MNIST (ResNet-style and MobileNetV2-style).

    python -m bench.bench_keras_qat --data ../shared/data/fashion-mnist [--models resnet8]

The networks are the PyTorch benchmark's, written in Keras with the same trained weights
(``demos/keras_fashion_mnist/models.py``), so the float baselines are identical. For each:
float top-1; dopt calibration only (1024 training images, the config's default range
algorithm); dopt QAT (``model.fit``, 1 epoch over the 60k training set, SGD momentum 0.9,
lr 1e-3 cosine, BN frozen half-way, cross-entropy + distillation from the float model);
the deployed model compiled by ``dopt omg`` and run on the emulated NPU (top-1 and
agreement with the fake-quant Keras model); the TFLite converter's full-integer
post-training quantization with the same 1024 images as representative dataset (the peer);
QAT step time vs float training step time (median of 40 ``train_on_batch`` steps, batch 64).
Writes bench/results/keras_qat.json and prints a Markdown table.
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

from demos.fashion_mnist import data
from demos.keras_fashion_mnist import models, qat
from dopt.formats.fileio import write_json_atomic

OUT = Path(__file__).resolve().parent / "results"
WEIGHTS = Path(__file__).resolve().parents[1] / "demos" / "fashion_mnist" / "weights"


def acc(pred, y) -> float:
    return float(100 * (pred == y).mean())


def float_model(name):
    m = models.build(name)
    models.load_torch_weights(m, WEIGHTS / f"{name}.pth")
    return m


def int8_config(model, dst: Path) -> Path:
    from dopt.dopt_tf.opt_main import generate_config_file
    generate_config_file(model, dst_path=str(dst / "gen.json"))
    cfg = json.loads((dst / "gen.json").read_text())
    for e in cfg["layer_strategy"].values():
        e["quant_strategy"] = "Quant_INT8-8"
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst / "config.json"


def calibrate(model, cfg, calib):
    from dopt.dopt_tf.opt_main import optimize_model, set_calibrate_state
    q = optimize_model(model, str(cfg))
    set_calibrate_state(q, True)
    q.predict(calib, batch_size=128, verbose=0)
    set_calibrate_state(q, False)
    return q


def tflite_int8(model, calib, xte, work: Path):
    """TFLite full-integer PTQ (int8 kernels, float I/O kept for a like-for-like top-1)."""
    import tensorflow as tf
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]

    def rep():
        for i in range(len(calib)):
            yield [calib[i:i + 1]]
    conv.representative_dataset = rep
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    t = time.perf_counter()
    blob = conv.convert()
    secs = time.perf_counter() - t
    (work / "model_int8.tflite").write_bytes(blob)
    interp = tf.lite.Interpreter(model_content=blob, num_threads=2)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    batch = 500
    interp.resize_tensor_input(inp["index"], [batch, 28, 28, 1])
    interp.allocate_tensors()
    preds = []
    for i in range(0, len(xte), batch):
        xb = xte[i:i + batch]
        if inp["dtype"] == np.int8:  # int8 input: quantize like the converter says
            s, z = inp["quantization"]
            xb = np.clip(np.round(xb / s + z), -128, 127).astype(np.int8)
        interp.set_tensor(inp["index"], xb)
        interp.invoke()
        preds.append(interp.get_tensor(out["index"]).argmax(1))
    return np.concatenate(preds), secs


def step_time(model, x, y, steps=40, batch=64, seed=0) -> float:
    import keras
    rng = np.random.default_rng(seed)
    model.compile(optimizer=keras.optimizers.Adam(1e-5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    times = []
    for s in range(steps + 5):
        idx = rng.integers(0, len(x), batch)
        t = time.perf_counter()
        model.train_on_batch(x[idx], y[idx])
        if s >= 5:
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def run_model(name, a, xtr, ytr, xte, yte) -> dict:
    import keras
    from dopt import runtime
    from dopt.dopt_tf.opt_main import generate_final_model
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    calib = xtr[rng.permutation(len(xtr))[:a.calib]]
    work = Path(tempfile.mkdtemp(prefix=f"bench-keras-{name}-"))
    fm = float_model(name)
    r = {"model": name, "params": int(fm.count_params())}
    r["float"] = acc(qat.predict_top1(fm, xte), yte)
    cfg = int8_config(fm, work)

    t = time.perf_counter()
    q = calibrate(fm, cfg, calib)
    r["calib_time_s"] = time.perf_counter() - t
    r["calibrated"] = acc(qat.predict_top1(q, xte), yte)

    pred_tfl, r["tflite_convert_s"] = tflite_int8(float_model(name), calib, xte, work)
    r["tflite_int8"] = acc(pred_tfl, yte)

    r["float_step_s"] = step_time(float_model(name), xtr, ytr)
    r["qat_step_s"] = step_time(calibrate(float_model(name), cfg, calib), xtr, ytr)
    r["qat_step_ratio"] = r["qat_step_s"] / r["float_step_s"]

    t = time.perf_counter()
    qat.fit_qat(q, float_model(name), xtr, ytr, epochs=a.qat_epochs, lr=a.lr)
    r["qat_time_s"] = time.perf_counter() - t
    pred_q = qat.predict_top1(q, xte)
    r["qat"] = acc(pred_q, yte)
    q.save(work / "quant.keras")
    files = generate_final_model(float_model(name), str(cfg), str(work / "quant.keras"),
                                 str(work / "final"))
    subprocess.run([sys.executable, "-m", "dopt", "omg", "--framework", "5", "--model",
                    files["float_onnx"], "--compress_conf", files["param_file"], "--output",
                    str(work / "int8")], check=True, capture_output=True)
    pred_npu = runtime.load(str(work / "int8.om")).predict(xte).argmax(1)
    r["npu_int8"] = acc(pred_npu, yte)
    r["npu_vs_fake_quant"] = float(100 * (pred_npu == pred_q).mean())
    from dopt.formats.qdq import ort_session
    s = ort_session(files["qdq_onnx"])
    iname = s.get_inputs()[0].name
    pred_qdq = np.concatenate([s.run(None, {iname: xte[i:i + 1000]})[0].argmax(1)
                               for i in range(0, len(xte), 1000)])
    r["qdq_ort"] = acc(pred_qdq, yte)
    return r


def table(rows) -> str:
    lines = ["| model | float | dopt calibration (drop) | dopt QAT (drop) | TFLite full-int8 PTQ "
             "(drop) | NPU INT8 | NPU vs fake-quant | QAT step / float step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["float"]
        lines.append(
            f"| {r['model']} | {f:.2f} | {r['calibrated']:.2f} ({r['calibrated'] - f:+.2f}) | "
            f"{r['qat']:.2f} ({r['qat'] - f:+.2f}) | {r['tflite_int8']:.2f} "
            f"({r['tflite_int8'] - f:+.2f}) | {r['npu_int8']:.2f} | "
            f"{r['npu_vs_fake_quant']:.2f} % | {r['qat_step_ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder with the full Fashion-MNIST files")
    ap.add_argument("--models", nargs="+", default=["resnet8", "mobilenetv2s"])
    ap.add_argument("--calib", type=int, default=1024)
    ap.add_argument("--qat-epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    a = ap.parse_args(argv)
    xtr, ytr = data.load("train", a.data)
    xte, yte = data.load("test", a.data)
    xtr, xte = qat.nhwc(xtr), qat.nhwc(xte)
    rows = []
    for name in a.models:
        rows.append(run_model(name, a, xtr, ytr, xte, yte))
        print(json.dumps(rows[-1]), flush=True)
    import tensorflow as tf
    doc = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
           "cpus": __import__("os").cpu_count(), "tensorflow": tf.__version__,
           "command": "python -m bench.bench_keras_qat " + " ".join(argv or sys.argv[1:]),
           "results": rows}
    OUT.mkdir(exist_ok=True)
    write_json_atomic(OUT / "keras_qat.json", doc, indent=1)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
