"""The README's main job, end to end on the shipped data."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from demos.fashion_mnist import demo  # noqa: E402


def test_demo_resnet8_short(tmp_path):
    r = demo.main(["--model", "resnet8", "--qat-epochs", "0.1", "--out", str(tmp_path / "out")])
    assert r["float"] > 90.0
    assert r["calibrated"] >= r["float"] - 0.5
    assert r["agreement"] >= 99.9
    assert r["npu"]["int8"]["agree"] >= 99.9      # fake-quant predicts the compiled INT8 .om
    assert r["npu"]["fp16"]["agree"] >= 99.9      # FP16 .om vs the float model
    assert r["npu"]["int8"]["size"] < 0.7 * r["npu"]["fp16"]["size"]
    final = tmp_path / "out" / "final"
    assert {p.name for p in final.iterdir()} == {
        "model_fused.onnx", "model_qdq.onnx", "quant_param.json", "model_fp16.om",
        "model_int8.om", "check_report_fp16.json", "check_report_int8.json"}


@pytest.mark.slow
def test_demo_default_mobilenetv2_meets_bars(tmp_path):
    r = demo.main(["--out", str(tmp_path / "out")])
    assert r["calibrated"] >= r["float"] - 1.0
    assert r["qat"] >= r["float"] - 0.3
    assert r["agreement"] >= 99.9
    assert r["npu"]["int8"]["agree"] >= 99.9


@pytest.mark.slow   # the whole shell demo; tests/test_dopt_so.py runs the reference's dopt_so
# examples and tests/test_npu_compile.py the compile-and-run step in the default set
def test_no_training_demo_runs(tmp_path):
    """demos/no_training/run_release.sh: prepare -> dopt_so (reference flags) -> omg -> NPU."""
    import json
    import subprocess
    r = subprocess.run(["bash", str(ROOT / "demos" / "no_training" / "run_release.sh"),
                        str(tmp_path / "out"), "image"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["float_top1"] - res["qdq_top1"] <= 1.0
    assert res["npu_vs_qdq_agreement"] >= 99.0
