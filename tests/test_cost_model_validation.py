"""The cost model's validation-only data and how the calibration script reads and reports it."""
import csv
from pathlib import Path

import pytest

pytest.importorskip("scipy")
onnx = pytest.importorskip("onnx")
pytest.importorskip("torch")

from bench import calibrate_cost_model as cal  # noqa: E402
from bench import zoo_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VALIDATION = ROOT / "bench" / "data" / "kirin990_5g_paddle_lite.csv"
# every validation file: (rows, the commit its header must name)
FILES = {VALIDATION: (9, "306d09d1"),
         ROOT / "bench" / "data" / "kirin990_5g_paddle_lite_ddk310.csv": (4, "9b9a3182"),
         ROOT / "bench" / "data" / "kirin990_5g_paddle_lite_ddk510.csv": (2, "fec57de8")}


@pytest.mark.parametrize("path", list(FILES), ids=lambda p: p.name)
def test_validation_file_names_its_source_and_every_network_has_a_builder(path):
    text = path.read_text(encoding="utf-8")
    n, commit = FILES[path]
    assert "github.com/PaddlePaddle/Paddle-Lite" in text and commit in text
    rows = cal.read_measurements(path)
    assert len(rows) == n
    for r in rows:
        assert r["model"] in zoo_models.builders(), r["model"]
        assert r["fp16"] > 0 and r["int8"] is None   # the source gives no INT8 times
    # none of the validation-only networks is fitted
    fitted = {r["model"] for r in cal.read_measurements(cal.DATA)} if cal.DATA.is_file() \
        else set(zoo_models.ZOO)
    assert fitted <= set(zoo_models.ZOO)
    assert set(zoo_models.VALIDATION).isdisjoint(fitted)


def test_fit_data_with_an_empty_precision_is_refused(tmp_path):
    bad = tmp_path / "fit.csv"
    with open(bad, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["model", "fp16_ms", "int8_ms"])
        w.writerow(["ResNet18", "2.6", ""])
    with pytest.raises(SystemExit) as e:
        cal.run(bad, write_profile=False, validation=None)
    assert "ResNet18 int8_ms" in str(e.value) and "--validation" in str(e.value)


@pytest.mark.parametrize("header, row, words", [
    ("model,fp16_ms,int8_ms", "ResNet18,fast,1.2", ["data row 1 (ResNet18)", "fp16_ms",
                                                     "'fast'"]),
    ("model,fp16_ms,int8_ms", "ResNet18,2.6,-1", ["int8_ms", "positive"]),
    ("model,fp16_ms,int8_ms,input_side", "ResNet18,2.6,1.2,22.5", ["input_side"]),
    ("model,fp16", "ResNet18,2.6", ["missing: fp16_ms, int8_ms"]),
])
def test_a_bad_latency_file_names_the_row_and_column(tmp_path, header, row, words):
    path = tmp_path / "lat.csv"
    path.write_text(f"# a comment\n{header}\n{row}\n", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        cal.read_measurements(path)
    assert str(path) in str(e.value)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_validation_table_scores_only_what_was_measured():
    v = {"data": "x.csv", "models": [
        {"model": "A", "input": "3x224x224", "gmacs": 0.5, "in_fit": False,
         "fp16_measured_ms": 2.0, "fp16_estimated_ms": 1.0, "fp16_error_pct": -50.0},
        {"model": "B", "input": "3x224x224", "gmacs": 1.0, "in_fit": True,
         "fp16_measured_ms": 2.0, "fp16_estimated_ms": 2.2, "fp16_error_pct": 10.0},
        {"model": "C", "skipped": "no builder in bench/zoo_models.py"}],
        "median_abs_error_pct": {"fp16": 30.0, "int8": None},
        "median_abs_error_pct_not_in_fit": {"fp16": 50.0, "int8": None},
        "median_ratio": {"fp16": 0.75, "int8": None},
        "median_abs_error_pct_rescaled": {"fp16": 23.3, "int8": None}}
    text = cal.render_validation(v)
    assert "| A | 3x224x224 | 0.50 | no | 2.00 | 1.00 | -50 % | - | - | - |" in text
    assert "| C | skipped: no builder" in text
    assert "all: FP16 30.0 %, INT8 -" in text and "not in the fit: FP16 50.0 %" in text
    assert "median estimate/measurement ratio: FP16 0.75, INT8 -" in text


def test_a_validation_network_exports_and_is_estimated(tmp_path):
    """MobileNet v1 (the paper's 13 separable layers) builds, exports and is priced."""
    from dopt.npu.costmodel import estimate
    from dopt.npu.lower import lower_onnx
    from dopt.npu.precheck import precheck
    from dopt.npu.profile import load_profile
    path = zoo_models.export("MobileNetV1", out=tmp_path)
    graph = lower_onnx(onnx.load(str(path)))
    convs = [n for n in graph.nodes if n.op in ("Convolution", "ConvolutionDepthwise")]
    assert len(convs) == 27
    assert sum(n.op == "ConvolutionDepthwise" for n in convs) == 13
    profile = load_profile()
    est = estimate(graph, precheck(graph, profile, ()), profile)
    assert 0.5 < est["summary"]["gmacs"] < 0.65     # 569 M multiply-adds in the paper
    assert est["summary"]["total_ms"] > 0
