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
