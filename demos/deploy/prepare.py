"""Step 1 of the demo: the user's inputs for ``deploy.yaml``, from what ships in the repo.

Writes into ``data/`` beside this file (or ``--out``): ``calib.bin`` (512 training images,
BINARY magic 610), ``config.prototxt`` (the reference's calibration config, unchanged),
``test.bin`` + ``labels.npy`` (the labelled evaluation set: the first ``--test`` images of
the 10k test set) and, in ``keys/``, a fresh ECDSA P-256 signing key pair
(``dopt sign --generate-key``). Needs no torch: the data are read from the IDX files.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dopt.calib.sets import write_bin610
from demos.fashion_mnist import data

HERE = Path(__file__).resolve().parent
CONFIG = """strategy: "Quant_INT8-8"
device: USE_CPU
// BINARY: the data are used as they are (already normalized)
preprocess_parameter:
{
    input_type: BINARY
    input_file_path: "calib.bin"
}
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(HERE / "data"))
    ap.add_argument("--keys", default=str(HERE / "keys"))
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--test", type=int, default=10000)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    x, _ = data.load("train", limit=a.calib)
    write_bin610(out / "calib.bin", x)
    (out / "config.prototxt").write_text(CONFIG)
    xt, yt = data.load("test", limit=a.test)
    write_bin610(out / "test.bin", xt)
    np.save(out / "labels.npy", yt)
    keys = Path(a.keys)
    if not (keys / "demo.key").is_file():
        from dopt.deploy.signing import generate_key
        keys.mkdir(parents=True, exist_ok=True)
        generate_key(keys / "demo")
    print(f"wrote calib.bin ({len(x)}), test.bin + labels.npy ({len(xt)}), config.prototxt "
          f"to {out}; signing keys in {keys}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
