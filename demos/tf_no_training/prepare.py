"""Step 1 of ``run_release.sh``: the calibration set and the evaluation data.

Writes into ``--out``: ``mnist_test/`` (300 training images as PNG files: the IMAGE
calibration set, as the reference demo's folder), ``calib.bin`` (the same images,
BINARY 510 = N,C,H,W, reordered to NHWC by dopt_so as the reference documents),
``test.npy``/``labels.npy`` (the 10k test set, NHWC) and ``config_image.prototxt`` /
``config_bin.prototxt``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from dopt.calib.sets import write_bin510
from demos.fashion_mnist import data

CONFIG_IMAGE = f"""strategy: "Quant_INT8-8"
device: USE_CPU
preprocess_parameter:
{{
    input_type: IMAGE
    // (x - mean) / std on 0..255 pixels = the training normalization
    mean_value: {data.MEAN * 255:.4f}
    standard_deviation: {data.STD * 255:.4f}
    input_file_path: "mnist_test"
}}
"""
CONFIG_BIN = """strategy: "Quant_INT8-8"
device: USE_CPU
preprocess_parameter:
{
    input_type: BINARY
    input_file_path: "calib.bin"
}
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out")
    ap.add_argument("--calib", type=int, default=300)
    a = ap.parse_args(argv)
    out = Path(a.out)
    imgs = out / "mnist_test"
    imgs.mkdir(parents=True, exist_ok=True)
    raw = data.read_idx(data.find_dir("train") / data.FILES["train"][0])[:a.calib]
    for i, im in enumerate(raw):
        Image.fromarray(im, mode="L").save(imgs / f"{i:04d}.png")
    x = ((raw.astype(np.float32) / 255.0 - data.MEAN) / data.STD)[:, None]  # N,1,28,28
    write_bin510(out / "calib.bin", x)
    xt, yt = data.load("test")
    np.save(out / "test.npy", np.ascontiguousarray(np.transpose(xt, (0, 2, 3, 1))))
    np.save(out / "labels.npy", yt)
    (out / "config_image.prototxt").write_text(CONFIG_IMAGE)
    (out / "config_bin.prototxt").write_text(CONFIG_BIN)
    print(f"prepared {out}: {len(raw)} calibration images, {len(xt)} test images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
