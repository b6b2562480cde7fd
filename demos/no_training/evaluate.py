"""Last step of ``run_release.sh``: accuracy of the float model, the QDQ model on ONNX Runtime
and the compiled INT8 ``.om`` on the emulated NPU, over the 10k Fashion-MNIST test images."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dopt import runtime
from dopt.onnx_qdq import ort_session


def _onnx_top1(path, x, batch=1000):
    s = ort_session(str(path))
    return np.concatenate([s.run(None, {"input": x[i:i + batch]})[0].argmax(1)
                           for i in range(0, len(x), batch)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default=".")
    ap.add_argument("--om", default="m_int8.om")
    a = ap.parse_args(argv)
    d = Path(a.dir)
    x, y = np.load(d / "test.npy"), np.load(d / "labels.npy")
    fl = _onnx_top1(d / "m.onnx", x)
    qd = _onnx_top1(d / "m_quant.onnx", x)
    npu = runtime.load(str(d / a.om)).predict(x).argmax(1)
    res = {"float_top1": round(float((fl == y).mean() * 100), 2),
           "qdq_top1": round(float((qd == y).mean() * 100), 2),
           "npu_int8_top1": round(float((npu == y).mean() * 100), 2),
           "npu_vs_qdq_agreement": round(float((npu == qd).mean() * 100), 2)}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
