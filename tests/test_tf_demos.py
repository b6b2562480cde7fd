"""The TensorFlow demos, shortened: Keras QAT with model.fit -> .om, and the reference's TF1
session example. Each runs in its own interpreter (TF1 graph state is process-wide)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-W", "ignore", "-m", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.mark.slow   # ~4 min on 2 cores, most of it building the QAT graph; the Keras
# adapter's own tests cover calibration, QAT with fit and the compiled-model agreement
def test_keras_demo_short(tmp_path):
    r = _run("demos.keras_fashion_mnist.demo", "--out", str(tmp_path), "--calib", "256",
             "--qat-epochs", "0.05")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["float"] > 91.0
    assert res["calibrated"] >= res["float"] - 1.0
    assert res["qat"] >= res["float"] - 0.5
    assert res["npu_vs_fake_quant_agreement"] >= 99.9
    for f in ("model_fused.keras", "model_fused.onnx", "model_qdq.onnx", "quant_param.json"):
        assert (tmp_path / "final" / f).is_file()


@pytest.mark.slow   # tests/test_tf1_api.py covers the TF1 session API in the default set
def test_tf1_session_example_short(tmp_path):
    r = _run("demos.tf1_session.example", "--out", str(tmp_path), "--float-epochs", "0.5",
             "--epochs", "0.1", "--test-limit", "2000")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "INT8 .om on the emulated NPU" in out, out
    agreement = float(out.split("top-1 agreement with the fake-quant model")[1].split("%")[0])
    assert agreement >= 99.0, out


@pytest.mark.slow
def test_keras_demo_full(tmp_path):
    r = _run("demos.keras_fashion_mnist.demo", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["calibrated"] >= res["float"] - 1.0
    assert res["qat"] >= res["float"] - 0.3
    assert res["npu_vs_fake_quant_agreement"] >= 99.9


def test_keras_networks_equal_the_pytorch_ones():
    """The Keras ports carry the PyTorch demo's trained weights: same logits."""
    import numpy as np
    import torch
    from demos.fashion_mnist import data, models as tm
    from demos.keras_fashion_mnist import models as km
    x, _ = data.load("test", limit=64)
    for name in ("resnet8", "mobilenetv2s"):
        pth = ROOT / "demos" / "fashion_mnist" / "weights" / f"{name}.pth"
        k = km.build(name)
        km.load_torch_weights(k, pth)
        t = tm.build(name)
        t.load_state_dict(torch.load(pth, weights_only=True))
        with torch.no_grad():
            ref = t.eval()(torch.from_numpy(x)).numpy()
        got = k.predict(np.transpose(x, (0, 2, 3, 1)), verbose=0)
        assert np.abs(ref - got).max() < 1e-4, name
