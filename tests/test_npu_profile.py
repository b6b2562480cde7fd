"""The hardware profile: faithful to the reference guide, strict on bad input, doc in sync."""
import json
import re
import sys
from pathlib import Path

import pytest

from dopt.errors import DoptError
from dopt.npu.optable import render_markdown
from dopt.npu.profile import PROFILES_DIR, available_profiles, load_profile

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "cann-kit-dopt-omg.md"
BUILTIN = PROFILES_DIR / "kirin9000.json"


def _reference_operators() -> dict:
    """IR operator -> star count, parsed from the reference's operator performance guide."""
    if not REFERENCE.is_file():
        pytest.skip("../shared/reference/cann-kit-dopt-omg.md not present")
    text = REFERENCE.read_text(encoding="utf-8")
    section = text.split("## CANN算子性能指导", 1)[1].split("## 性能友好计算结构", 1)[0]
    ops = {}
    for line in section.splitlines():
        if not line.startswith("|") or line.startswith(("|IR算子", "|:--")):
            continue
        names, _guide, stars = line.strip().strip("|").split("|")
        for name in names.split("<br><br>"):
            assert name.strip() not in ops, f"duplicate operator {name} in the reference"
            ops[name.strip()] = stars.count("☆")
    return ops


def test_builtin_profile_loads():
    p = load_profile()
    assert p.name == "kirin9000" and re.fullmatch(r"\d+\.\d+\.\d+", p.version)
    assert p.stamp() == {"name": "kirin9000", "version": p.version}
    assert "kirin9000" in available_profiles()
    assert load_profile("kirin9000") is p  # built-in loads are cached
    assert p.cost_model["calibrated"] is True  # bench/calibrate_cost_model.py --write-profile


def test_operators_match_reference_guide():
    ref = _reference_operators()
    p = load_profile()
    assert len(p.operators) == len(ref)
    for name, stars in ref.items():
        assert p.stars(name) == stars, name
        assert p.op(name)["low_recommendation"] == (stars <= 2), name


def test_int8_forms_and_flags():
    p = load_profile()
    for fp, q in (("Convolution", "QuantizedConvolution"),
                  ("ConvolutionDepthwise", "QuantizedConvolutionDepthwise"),
                  ("FullyConnection", "QuantizedFullyConnection")):
        assert p.int8_form(fp) == q
        assert p.op(q)["int8"] is True and p.int8_form(q) is None
    assert sorted(n for n, o in p.operators.items() if o["int8"]) == [
        "QuantizedConvolution", "QuantizedConvolutionDepthwise", "QuantizedFullyConnection"]
    assert {n for n, o in p.operators.items() if o["shape_only"]} == {
        "Rank", "Size", "Shape", "ExpandDims", "Squeeze", "Reshape", "Range"}
    assert {n for n, o in p.operators.items() if o["fusable_into_conv"]} == {
        "BNInference", "Scale", "BiasAdd"}
    assert p.is_shape_only("Reshape") and not p.is_shape_only("Convolution")
    assert p.op("NoSuchOp") is None and p.int8_form("NoSuchOp") is None
    assert p.stars("NoSuchOp") is None


def test_channel_blocks():
    p = load_profile()
    assert p.channel_block(int8=False) == 16
    assert p.channel_block(int8=True) == 32
    assert p.alignment["int8_min_cin"] == 17
    assert p.alignment["concat_split_inplace_block"] == 16


def _mutate(raw, case):
    if case == "missing_top":
        del raw["alignment"]
        return "alignment"
    if case == "op_missing_key":
        del raw["operators"]["Softmax"]["category"]
        return "operators.Softmax.category"
    if case == "stars_high":
        raw["operators"]["Softmax"]["stars"] = 6
        return "operators.Softmax.stars"
    if case == "stars_zero":
        raw["operators"]["Sin"]["stars"] = 0
        return "operators.Sin.stars"
    if case == "bad_int8_form":
        raw["operators"]["Convolution"]["int8_form"] = "QuantizedConv"
        return "operators.Convolution.int8_form"
    if case == "alignment_zero":
        raw["alignment"]["int8_channel_block"] = 0
        return "alignment.int8_channel_block"
    if case == "alignment_str":
        raw["alignment"]["fp16_channel_block"] = "16"
        return "alignment.fp16_channel_block"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing_top", "op_missing_key", "stars_high", "stars_zero",
                                  "bad_int8_form", "alignment_zero", "alignment_str"])
def test_bad_profile_names_file_and_field(tmp_path, case):
    raw = json.loads(BUILTIN.read_text(encoding="utf-8"))
    field = _mutate(raw, case)
    path = tmp_path / f"{case}.json"
    path.write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DoptError) as e:
        load_profile(path)
    assert str(path) in str(e.value) and f"field '{field}'" in str(e.value)


def test_invalid_json_reports_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "name": "x",\n  "version": 1.0.0\n}\n', encoding="utf-8")
    with pytest.raises(DoptError) as e:
        load_profile(path)
    assert str(path) in str(e.value) and "line 3, column" in str(e.value)


def test_unreadable_and_oversized(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(DoptError, match="cannot read") as e:
        load_profile(missing)
    assert str(missing) in str(e.value)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (4 * 1024 * 1024 + 1))
    with pytest.raises(DoptError, match="too large") as e:
        load_profile(big)
    assert str(big) in str(e.value)
    with pytest.raises(DoptError, match="unknown hardware profile"):
        load_profile("kirin0")


def test_duplicate_operator_key_is_refused(tmp_path):
    text = BUILTIN.read_text(encoding="utf-8")
    path = tmp_path / "dup.json"
    path.write_text(text.replace('"operators": {', '"operators": {\n    "Sin": {},', 1),
                    encoding="utf-8")
    with pytest.raises(DoptError) as e:
        load_profile(path)
    assert str(path) in str(e.value) and "field 'Sin'" in str(e.value)


def test_operator_doc_is_up_to_date():
    doc = ROOT / "docs" / "npu_operators.md"
    assert doc.read_text(encoding="utf-8") == render_markdown(load_profile()), (
        "docs/npu_operators.md is stale: run `python -m dopt.npu.optable > docs/npu_operators.md`")


def test_profile_module_imports_no_framework():
    import subprocess
    code = ("import sys, dopt.npu.profile, dopt.npu.optable; "
            "bad = [m for m in ('torch', 'tensorflow', 'onnx', 'onnxruntime') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
