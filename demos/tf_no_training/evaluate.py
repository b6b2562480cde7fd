"""Last step of ``run_release.sh``: top-1 of the float frozen graph (TensorFlow), the QDQ model
(ONNX Runtime) and the compiled INT8 ``.om`` (emulated NPU) on the 10k test images."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dopt import runtime
from demos.no_training.evaluate import onnx_top1, report


def _tf_top1(pb: Path, x, batch=1000):
    import tensorflow as tf
    gd = tf.compat.v1.GraphDef()
    gd.ParseFromString(pb.read_bytes())
    g = tf.Graph()
    with g.as_default():
        tf.compat.v1.import_graph_def(gd, name="")
    with tf.compat.v1.Session(graph=g) as s:
        return np.concatenate([s.run("output:0", {"input:0": x[i:i + batch]}).argmax(1)
                               for i in range(0, len(x), batch)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default=".")
    ap.add_argument("--pb", default="basemodel/mnist.pb")
    ap.add_argument("--om", default="mnist_int8.om")
    a = ap.parse_args(argv)
    d = Path(a.dir)
    x, y = np.load(d / "test.npy"), np.load(d / "labels.npy")
    fl = _tf_top1(d / a.pb, x)
    qd = onnx_top1(d / "mnist_quant_qdq.onnx", x, "input:0")
    npu = runtime.load(str(d / a.om)).predict(x).argmax(1)
    print(json.dumps(report(fl, qd, npu, y)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
