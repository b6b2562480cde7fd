"""Step 1 of ``run_release.sh``: the user's inputs — a float ONNX model and calibration sets.

Writes into ``--out``: ``m.onnx`` (the MobileNetV2-style Fashion-MNIST network, input
``input``), ``calib.bin`` (512 training images, BINARY magic 610), ``images/`` (the same
images as PNG files, for IMAGE mode), ``test.npy``/``labels.npy`` (the 10k test set) and
the two ``config.prototxt`` variants.
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dopt.calib.sets import write_bin610
from demos.fashion_mnist import data, demo

CONFIG_BIN = """strategy: "Quant_INT8-8"
device: USE_CPU
// BINARY: the data are used as they are (already normalized)
preprocess_parameter:
{
    input_type: BINARY
    input_file_path: "calib.bin"
}
"""
# IMAGE: (x - mean) / std on 0..255 pixel values = the training normalization
CONFIG_IMAGE = f"""strategy: "Quant_INT8-8"
device: USE_CPU
preprocess_parameter:
{{
    input_type: IMAGE
    mean_value: {data.MEAN * 255:.4f}
    standard_deviation: {data.STD * 255:.4f}
    input_file_path: "images"
}}
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out")
    ap.add_argument("--model", default="mobilenetv2s")
    ap.add_argument("--calib", type=int, default=512)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = demo.build_float(a.model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(out / "m.onnx"),
                          dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    x, _ = data.load("train", limit=a.calib)
    write_bin610(out / "calib.bin", x)
    (out / "images").mkdir(exist_ok=True)
    pixels = np.clip(np.rint((x[:, 0] * data.STD + data.MEAN) * 255), 0, 255).astype(np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p, mode="L").save(out / "images" / f"train_{i:05d}.png")
    xt, yt = data.load("test")
    np.save(out / "test.npy", xt)
    np.save(out / "labels.npy", yt)
    (out / "config_bin.prototxt").write_text(CONFIG_BIN)
    (out / "config_image.prototxt").write_text(CONFIG_IMAGE)
    print(f"wrote m.onnx, calib.bin ({len(x)} samples), images/, test set, configs to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
