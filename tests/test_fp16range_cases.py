"""FP16 range check: mechanisms the float32 output ranges alone do not show.

The case behind Swin-V2's inf/NaN on the NPU: cosine attention normalizes with
``x / max(||x||, 1e-12)`` (``F.normalize``), and its window padding gives rows that are all
zero. In float32 the quotient is 0 / 1e-12 = 0, finite, its range healthy; in FP16 the
epsilon is 0, so 0 / 0 is NaN. The pre-check must name the division before compiling,
whether the norm runs on the CPU (``ReduceL2``) or on the NPU (``ReduceSum`` + ``Sqrt``),
and a network whose epsilon FP16 can hold must compile unflagged and match ONNX Runtime.
"""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from dopt import runtime  # noqa: E402
from dopt.npu.compiler import compile_onnx  # noqa: E402
from dopt.npu.fp16range import flushed_to_zero, problem  # noqa: E402
from dopt.quant.numerics import FP16_DRIFT_TOLERANCE  # noqa: E402
from dopt.npu.profile import load_profile  # noqa: E402
from dopt.runtime.reference import first_nonfinite  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

TOKENS, PADDED, DIM = 6, 8, 8      # two zero rows of window padding, as Swin pads 28 to 32
FP16_RTOL = FP16_DRIFT_TOLERANCE   # the compatibility suite's FP16 tolerance


def _normalize_net(eps: float, norm: str) -> onnx.ModelProto:
    """Pad zero rows, then ``x / max(||x||_2, eps)`` over the last axis, as F.normalize."""
    c = [numpy_helper.from_array(np.array([0, 0, 0, 0, PADDED - TOKENS, 0], np.int64), "pads"),
         numpy_helper.from_array(np.array(eps, np.float32), "eps"),
         numpy_helper.from_array(np.array([1, PADDED, DIM], np.int64), "shape"),
         numpy_helper.from_array(np.array([-1], np.int64), "axes")]
    nodes = [helper.make_node("Pad", ["x", "pads"], ["q"], name="pad")]
    if norm == "cpu":       # ReduceL2 has no NPU operator: the norm crosses CPU -> NPU
        nodes.append(helper.make_node("ReduceL2", ["q"], ["n"], axes=[-1], keepdims=1,
                                      name="norm"))
    else:                   # the same norm with NPU operators only
        nodes += [helper.make_node("Mul", ["q", "q"], ["sq"], name="square"),
                  helper.make_node("ReduceSum", ["sq", "axes"], ["ss"], keepdims=1, name="sum"),
                  helper.make_node("Sqrt", ["ss"], ["n"], name="norm")]
    nodes += [helper.make_node("Clip", ["n", "eps"], ["d"], name="clip"),
              helper.make_node("Expand", ["d", "shape"], ["e"], name="expand"),
              helper.make_node("Div", ["q", "e"], ["y"], name="div")]
    g = helper.make_graph(nodes, "normalize",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                         [1, TOKENS, DIM])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                         [1, PADDED, DIM])], c)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model):
    x = np.random.default_rng(0).standard_normal((1, TOKENS, DIM)).astype(np.float32)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = ort.InferenceSession(model.SerializeToString(), so,
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    om, report = compile_onnx(model, load_profile())
    npu = runtime.Session(om, device="npu").run({"x": x})["y"]
    return x, ref, om, report, npu


@pytest.mark.parametrize("norm", ["cpu", "npu"])
def test_epsilon_fp16_flushes_to_zero_is_flagged_at_the_division(norm):
    x, ref, om, report, npu = _run(_normalize_net(1e-12, norm))
    assert np.all(np.isfinite(ref))                        # float32 is fine ...
    assert not np.all(np.isfinite(npu))                    # ... FP16 is not, on the phone too
    rows = {r["node"]: r for r in report["fp16_range"]}
    assert set(rows) == {"div"}, rows                      # named before compiling
    assert rows["div"]["kind"] == "underflow"
    assert rows["div"]["range"][1] <= 1.0                  # the quotient's range looked healthy
    hit = first_nonfinite(om, {"x": x})                    # and it is where NaN first appears
    assert hit and hit["kernel"] == "div"


@pytest.mark.parametrize("norm", ["cpu", "npu"])
def test_epsilon_fp16_can_hold_is_not_flagged_and_matches(norm):
    _, ref, _, report, npu = _run(_normalize_net(1e-6, norm))   # 1e-6: an FP16 subnormal
    assert report["fp16_range"] == []
    assert np.all(np.isfinite(npu))
    err = float(np.max(np.abs(npu.astype(np.float64) - ref))) / float(np.max(np.abs(ref)))
    assert err <= FP16_RTOL


def test_flushed_to_zero_counts_what_fp16_rounds_to_zero():
    v = np.array([0.0, -1e-12, 2.9e-8, 6e-8, 1e-6, 1.0, np.inf, np.nan], np.float32)
    n, smallest = flushed_to_zero(v)
    assert n == 2 and smallest == pytest.approx(1e-12)
    info = {"amax": 1.0, "min": 0.0, "max": 1.0, "nonfinite": 0}
    assert problem(info) is None
    assert problem(dict(info, divisor="d", flushed=n, flushed_min=smallest)) == "underflow"


# --- drift: values FP16 holds, an output it does not -------------------------------------

def _cancelling_net(gap: float) -> onnx.ModelProto:
    """``x @ W - x @ (W + gap)``: two large products whose difference is small, so FP16's
    rounding of each product (a step of 0.25 near 400) is large against what is left."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((16, 16)) * 100).astype(np.float32)
    c = [numpy_helper.from_array(w, "wa"),
         numpy_helper.from_array(w + gap * rng.standard_normal((16, 16)).astype(np.float32),
                                 "wb")]
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"], name="fc_a"),
             helper.make_node("MatMul", ["x", "wb"], ["b"], name="fc_b"),
             helper.make_node("Sub", ["a", "b"], ["y"], name="sub")]
    g = helper.make_graph(nodes, "cancel",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], c)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _npu_drift(model, report):
    """The emulated NPU's drift on the inputs the compiler measured (seeded, as compiled)."""
    from dopt.npu.fp16range import sample_feeds
    feeds = sample_feeds(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = ort.InferenceSession(model.SerializeToString(), so,
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    om, _ = compile_onnx(model, load_profile())
    npu = runtime.Session(om, device="npu").run(feeds)["y"]
    return float(np.max(np.abs(npu.astype(np.float64) - ref))) / float(np.max(np.abs(ref)))


def test_fp16_drift_is_flagged_at_compile_with_the_layer_named():
    model = _cancelling_net(0.05)
    _, report = compile_onnx(model, load_profile())
    assert report["fp16_range"] == []                        # every value fits FP16 ...
    d = report["fp16_drift"]
    assert d["exceeded"] and d["first"] == "sub"             # ... the output does not hold
    assert d["outputs"]["y"] > FP16_DRIFT_TOLERANCE
    assert d["most_drift"]["fc_a"] < FP16_DRIFT_TOLERANCE    # the products themselves hold
    rows = [(x["node"], f) for x in report["nodes"] for f in x["findings"]
            if f["rule"] == "fp16_drift"]
    assert [n for n, _ in rows] == ["sub"] and rows[0][1]["outcome"] == "npu_degraded"
    # the prediction is what the emulated NPU then does, within a factor of two
    actual = _npu_drift(model, report)
    assert actual > FP16_DRIFT_TOLERANCE
    assert 0.5 <= d["outputs"]["y"] / actual <= 2.0


def test_no_drift_finding_where_fp16_holds():
    model = _cancelling_net(50.0)          # the difference is as large as the products
    _, report = compile_onnx(model, load_profile())
    d = report["fp16_drift"]
    assert not d["exceeded"] and d["first"] is None and d["outputs"]["y"] < 5e-3
    assert not any(f["rule"] == "fp16_drift" for x in report["nodes"] for f in x["findings"])
    assert _npu_drift(model, report) <= FP16_DRIFT_TOLERANCE


def test_fp16_drift_warning_names_the_layer(tmp_path, capsys):
    from dopt.npu.omg import main as omg_main
    path = tmp_path / "cancel.onnx"
    onnx.save(_cancelling_net(0.05), str(path))
    rc = omg_main(["--model", str(path), "--framework", "5", "--output", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 0 and (tmp_path / "c.om").is_file()
    assert "FP16 drift" in err and "first passes the bound at sub" in err
