"""The placement rule registry: ids, texts, the generated doc table, and each rule on IR nodes."""
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dopt.errors import DoptError
from dopt.npu import rules as R
from dopt.npu.lower import IRGraph, IRNode
from dopt.npu.optable import render_markdown as render_optable
from dopt.npu.profile import load_profile

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "npu_precheck.md"


def _node(name, op, ir_op, **attrs):
    fused_into = attrs.pop("fused_into", None)
    return IRNode(name, op, ir_op, ["x"], ["y"], attrs, fused_into)


def _conv(cin, cout, groups=1, name="conv"):
    op = "ConvolutionDepthwise" if groups > 1 and groups == cin else "Convolution"
    return _node(name, "Conv", op, cin=cin, cout=cout, groups=groups)


def _concat(*channels):
    return _node("cat", "Concat", "ConcatD", axis=1, input_dims=[[1, c, 8, 8] for c in channels])


def _op_rated(profile, low: bool) -> str:
    return next(name for name, op in profile.operators.items()
                if (op["stars"] <= R.LOW_STARS) == low and not op["shape_only"])


def _cases(profile):
    """rule id -> (node that breaks it, its offending values, node that passes, INT8 nodes)."""
    low, good = _op_rated(profile, True), _op_rated(profile, False)
    return {
        "unsupported_op": (_node("e", "Einsum", None), {"onnx_op": "Einsum"},
                           _node("r", "Relu", "Activation"), ()),
        "fused_into_conv": (_node("bn", "BatchNormalization", "BNInference", fused_as="BNInference",
                                  fused_into="conv"), {"into": "conv"},
                            _node("bn", "BatchNormalization", "BNInference"), ()),
        "shape_only": (_node("rs", "Reshape", "Reshape"), {}, _node("r", "Relu", "Activation"), ()),
        "int8_min_cin": (_conv(16, 32), {"cin": 16}, _conv(17, 32), {"conv"}),
        "conv_channel_alignment": (_conv(16, 24), {"cin": 16, "cout": 24, "block": 16,
                                                   "padding_waste": 0.25}, _conv(16, 32), ()),
        "concat_split_in_place": (_concat(24, 16), {"channels": [24, 16], "offsets": [0, 24],
                                                     "block": 16}, _concat(16, 32), ()),
        "low_recommendation": (_node("l", low, low), {"stars": profile.stars(low)},
                               _node("g", good, good), ()),
        "fp16_range": (_measured(9e4), {"kind": "overflow", "tensor": "y",
                                        "range": [-9e4, 9e4], "amax": 9e4},
                       _measured(6e4), ()),
        "fp16_drift": (_drifted("conv"), {"output": "y", "drift": 0.05, "drift_here": 0.03,
                                          "tolerance": 0.02},
                       _drifted("other"), ()),
    }


def _drifted(first):
    """A convolution in a network whose output FP16 moves by 5 %, the drift first passing
    the bound at ``first``."""
    n = _conv(16, 32)
    n.attrs["drift"] = {"tolerance": 0.02, "outputs": {"y": 0.05}, "kernels": {"conv": 0.03},
                        "first": first}
    return n


def _measured(amax):
    """A convolution whose output the FP16 range analysis measured at +-amax."""
    n = _conv(16, 32)
    n.attrs["measured"] = {"tensor": "y", "amax": amax, "min": -amax, "max": amax,
                           "nonfinite": 0}
    return n


def _ctx(profile, node, int8=()):
    measured = {node.name: node.attrs["measured"]} if "measured" in node.attrs else {}
    return R.Context(IRGraph([node], {}, set(), ["x"], ["y"]), profile, frozenset(int8),
                     measured, node.attrs.get("drift", {}))


def test_doc_table_is_up_to_date():
    assert R.doc_table(DOC.read_text(encoding="utf-8")) == R.render_markdown(load_profile()), (
        "docs/npu_precheck.md is stale: run `python -m dopt.npu.rules --write-doc "
        "docs/npu_precheck.md`")


def test_ids_are_function_names_and_unique():
    assert len(R.RULES) == len({r.check for r in R.RULES.values()})
    for rid, r in R.RULES.items():
        assert rid == r.id == r.check.__name__ and getattr(R, rid) is r.check
    with pytest.raises(ValueError, match="registered twice"):
        R.rule(R.NPU, hint="")(R.RULES["shape_only"].check)


def test_every_rule_has_a_text_filled_from_the_profile():
    profile = load_profile()
    for r in R.RULES.values():
        assert r.check.__doc__ and r.check.__doc__.strip(), f"rule {r.id} has no docstring"
        # a rule text names profile facts only, never a node's values
        inspect.cleandoc(r.check.__doc__).format(**R.profile_facts(profile))
        assert "`" not in r.text(profile) and "{" not in r.text(profile)


def test_every_rule_has_a_case():
    assert set(_cases(load_profile())) == set(R.RULES)


@pytest.mark.parametrize("rid", list(R.RULES))
def test_rule_fails_with_offending_values_and_passes(rid):
    profile = load_profile()
    bad, values, good, int8 = _cases(profile)[rid]
    f = R.RULES[rid](bad, _ctx(profile, bad, int8))
    assert f is not None and f.rule == rid and f.outcome is R.RULES[rid].outcome
    assert f.values == values and f.message
    assert f.hint and "`" not in f.hint  # every placeholder filled from the node
    assert set(f.as_dict()) == {"rule", "outcome", "message", "values", "hint"}
    assert R.RULES[rid](good, _ctx(profile, good, int8)) is None
    assert rid in {x.rule for x in R.evaluate(bad, _ctx(profile, bad, int8))[1]}


def test_depthwise_is_exempt_from_int8_min_cin():
    profile = load_profile()
    dw = _conv(8, 8, groups=8)
    assert R.int8_min_cin(dw, _ctx(profile, dw, {"conv"})) is None


def test_outcome_enum_reads_as_the_report_strings():
    assert [o.value for o in R.Outcome] == ["cpu", "fused", "npu_degraded", "npu"]
    assert (R.CPU, R.FUSED, R.DEGRADED, R.NPU) == tuple(R.Outcome)
    assert R.DEGRADED == "npu_degraded" and {"npu_degraded": 1}[R.DEGRADED] == 1
    assert json.dumps({R.CPU: R.FUSED}) == '{"cpu": "fused"}' and f"{R.NPU}" == "npu"
    assert R.Outcome("npu_degraded") is R.DEGRADED
    assert R.strongest([R.DEGRADED, R.CPU, R.FUSED]) is R.CPU and R.strongest([]) is R.NPU
    assert R.CPU.device == "cpu" and R.FUSED.device is R.DEGRADED.device is R.Device.NPU


def test_int8_threshold_comes_from_the_profile_alone(tmp_path):
    """Rule text, skip reason, rule message and the operator doc follow one profile value."""
    raw = json.loads(Path(load_profile().path).read_text(encoding="utf-8"))
    raw["alignment"]["int8_min_cin"] = 33
    path = tmp_path / "p.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    p = load_profile(path)
    text = R.rule_text("int8_min_cin", p)
    assert "33" in text and f"- {text}\n" in render_optable(p)
    assert R.int8_skip_reason(20, p) == "Cin=20 <= 32: the NPU runs it in FP16"
    assert R.int8_skipped(32, 1, p) and not R.int8_skipped(33, 1, p)
    conv = _conv(20, 32)
    f = R.RULES["int8_min_cin"](conv, _ctx(p, conv, {"conv"}))
    assert R.int8_skip_reason(20, p) in f.message
    assert not re.search(r"\b1[67]\b", R.RULES["int8_min_cin"].fix(p) + text)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dopt.npu.rules", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_cli_lists_and_writes_the_doc(tmp_path):
    profile = load_profile()
    r = _cli("--list")
    assert r.returncode == 0 and r.stdout == R.render_markdown(profile), r.stderr
    r = _cli("--list", "--format", "text", "--profile", "kirin9000")
    assert r.returncode == 0 and r.stdout == R.render_text(profile)
    assert all(f"{rid} (" in r.stdout for rid in R.RULES)
    doc = tmp_path / "d.md"
    doc.write_text(f"intro\n{R.DOC_BEGIN}\nold | table\n{R.DOC_END}\nafter\n", encoding="utf-8")
    assert _cli("--write-doc", str(doc)).returncode == 0
    assert doc.read_text(encoding="utf-8") == (
        f"intro\n{R.DOC_BEGIN}\n{R.render_markdown(profile)}{R.DOC_END}\nafter\n")
    doc.write_text("no markers\n", encoding="utf-8")
    r = _cli("--write-doc", str(doc))
    assert r.returncode == 2 and "markers" in r.stderr and doc.read_text() == "no markers\n"
    with pytest.raises(DoptError, match="markers"):
        R.doc_table("no markers")
