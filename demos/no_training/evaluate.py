"""Last step of ``run_release.sh``: accuracy of the float model, the QDQ model on ONNX Runtime
and the compiled INT8 ``.om`` on the emulated NPU, over the 10k Fashion-MNIST test images."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dopt import runtime
from dopt.formats.qdq import ort_session


def onnx_top1(path, x, input_name="input", batch=1000):
    s = ort_session(str(path))
    return np.concatenate([s.run(None, {input_name: x[i:i + batch]})[0].argmax(1)
                           for i in range(0, len(x), batch)])


def report(fl, qd, npu, y) -> dict:
    """Top-1 (%) of float, QDQ and NPU predictions, and NPU-vs-QDQ agreement."""
    def pct(a, b):
        return round(float((a == b).mean() * 100), 2)
    return {"float_top1": pct(fl, y), "qdq_top1": pct(qd, y), "npu_int8_top1": pct(npu, y),
            "npu_vs_qdq_agreement": pct(npu, qd)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default=".")
    ap.add_argument("--om", default="m_int8.om")
    a = ap.parse_args(argv)
    d = Path(a.dir)
    x, y = np.load(d / "test.npy"), np.load(d / "labels.npy")
    fl = onnx_top1(d / "m.onnx", x)
    qd = onnx_top1(d / "m_quant.onnx", x)
    npu = runtime.load(str(d / a.om)).predict(x).argmax(1)
    print(json.dumps(report(fl, qd, npu, y)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
