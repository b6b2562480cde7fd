"""Keras 3 end to end: float model -> config -> calibration -> QAT with ``model.fit`` ->
``generate_final_model`` -> ``dopt omg`` -> the emulated NPU, on Fashion-MNIST.

    python -m demos.keras_fashion_mnist.demo [--model mobilenetv2s] [--out DIR]

The float network is the PyTorch demo's MobileNetV2-style model written in Keras, with its
trained weights copied in (``models.load_torch_weights``); the data are the Fashion-MNIST
files shipped with the PyTorch demo (10k test images, a 12k training subset).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from demos.fashion_mnist import data
from . import models, qat

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE.parent / "fashion_mnist" / "weights"


def top1(pred, y) -> float:
    return round(float((pred == y).mean() * 100), 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenetv2s", choices=sorted(models.BUILDERS))
    ap.add_argument("--out", default=str(HERE / "out"))
    ap.add_argument("--calib", type=int, default=1024)
    ap.add_argument("--qat-epochs", type=float, default=0.5,
                    help="passes over the shipped 12k training subset")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--test-limit", type=int, default=0,
                    help="evaluate on the first N test images only (0: all 10,000)")
    a = ap.parse_args(argv)
    from dopt.dopt_tf.opt_main import (generate_config_file, generate_final_model,
                                       optimize_model, set_calibrate_state)
    import keras
    keras.utils.set_random_seed(0)
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    xtr, ytr = data.load("train")
    xte, yte = data.load("test")
    xtr, xte = qat.nhwc(xtr), qat.nhwc(xte)
    if a.test_limit:
        xte, yte = xte[:a.test_limit], yte[:a.test_limit]

    def float_model():
        m = models.build(a.model)
        models.load_torch_weights(m, WEIGHTS / f"{a.model}.pth")
        return m
    fm = float_model()
    res = {"model": a.model, "float": top1(qat.predict_top1(fm, xte), yte)}

    # 1. the reference's config file, every layer set to Quant_INT8-8
    generate_config_file(fm, dst_path=str(out / "config_gen.json"))
    cfg = json.loads((out / "config_gen.json").read_text())
    for e in cfg["layer_strategy"].values():
        e["quant_strategy"] = "Quant_INT8-8"
    (out / "config.json").write_text(json.dumps(cfg, indent=1))

    # 2. calibration (no training)
    q = optimize_model(fm, str(out / "config.json"))
    rng = np.random.default_rng(0)
    set_calibrate_state(q, True)
    q.predict(xtr[rng.permutation(len(xtr))[:a.calib]], batch_size=128, verbose=0)
    set_calibrate_state(q, False)
    res["calibrated"] = top1(qat.predict_top1(q, xte), yte)

    # 3. QAT with model.fit (distillation from the float model)
    t = time.perf_counter()
    qat.fit_qat(q, float_model(), xtr, ytr, epochs=a.qat_epochs, lr=a.lr)
    res["qat_s"] = round(time.perf_counter() - t, 1)
    pred_q = qat.predict_top1(q, xte)
    res["qat"] = top1(pred_q, yte)
    q.save(out / "quant_model.keras")

    # 4. deployable float model + parameter file + QDQ ONNX, from a fresh float model
    files = generate_final_model(float_model(), str(out / "config.json"),
                                 str(out / "quant_model.keras"), str(out / "final"))
    print(json.dumps(files, indent=1))

    # 5. compile and run on the emulated NPU
    cmd = [sys.executable, "-m", "dopt", "omg", "--framework", "5", "--model",
           files["float_onnx"], "--compress_conf", files["param_file"], "--output",
           str(out / "model_int8")]
    subprocess.run(cmd, check=True)
    from dopt import runtime
    pred_npu = runtime.load(str(out / "model_int8.om")).predict(xte).argmax(1)
    res["npu_int8"] = top1(pred_npu, yte)
    res["npu_vs_fake_quant_agreement"] = top1(pred_npu, pred_q)
    print(json.dumps(res))
    (out / "result.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
