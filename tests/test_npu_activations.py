"""Hard-sigmoid / hard-swish spelled out op by op become one operator (dopt/npu/activations.py)."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from dopt.npu.activations import fuse_hard_activations  # noqa: E402
from dopt.npu.costmodel import estimate  # noqa: E402
from dopt.npu.lower import lower_onnx  # noqa: E402
from dopt.npu.precheck import precheck  # noqa: E402
from dopt.npu.prepare import prepare  # noqa: E402
from dopt.npu.profile import load_profile  # noqa: E402

RNG = np.random.default_rng(0)
mk = helper.make_node
SCALARS = {"three": 3.0, "two": 2.0, "zero": 0.0, "six": 6.0, "sixth": 1 / 6}


def _model(nodes, outputs=("y",), extra_inits=()):
    inits = [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in SCALARS.items()]
    inits.append(numpy_helper.from_array(
        (RNG.standard_normal((8, 8, 1, 1)) * 0.3).astype(np.float32), "w"))
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 5])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        inits + list(extra_inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _relu6_plus3(src, tag, three="three"):
    return [mk("Add", [src, three], [f"{tag}_a"], name=f"{tag}_add"),
            mk("Clip", [f"{tag}_a", "zero", "six"], [f"{tag}_r"], name=f"{tag}_relu6")]


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _check_same(model, want_ops):
    x = (RNG.standard_normal((1, 8, 5, 5)) * 4).astype(np.float32)
    want = _run(model, x)
    fuse_hard_activations(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops == want_ops
    for a, b in zip(_run(model, x), want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    return model


def test_keras3_hard_swish_and_squeeze_excite_gate():
    """x * (relu6(x + 3) * 1/6) and a gate relu6(s + 3) * 1/6 applied to another tensor."""
    nodes = [mk("Conv", ["x", "w"], ["c"], name="conv"),
             *_relu6_plus3("c", "hs"),
             mk("Mul", ["hs_r", "sixth"], ["hs_sig"], name="hs_div"),
             mk("Mul", ["c", "hs_sig"], ["h"], name="hs_mul"),
             mk("ReduceMean", ["h"], ["s"], name="se_pool", axes=[2, 3], keepdims=1),
             *_relu6_plus3("s", "gate"),
             mk("Mul", ["gate_r", "sixth"], ["g"], name="gate_div"),
             mk("Mul", ["h", "g"], ["y"], name="se_mul")]
    m = _check_same(_model(nodes), ["Conv", "HardSwish", "ReduceMean", "HardSigmoid", "Mul"])
    names = [n.name for n in m.graph.node]
    assert names[1] == "hs_mul" and names[3] == "gate_div"   # the result's writer names it


def test_keras2_grouping_and_division_by_six():
    """(x * relu6(x + 3)) * 1/6, and relu6(x + 3) / 6 as a Div."""
    nodes = [*_relu6_plus3("x", "a"),
             mk("Mul", ["x", "a_r"], ["m"], name="a_mul"),
             mk("Mul", ["m", "sixth"], ["h"], name="a_scale"),
             *_relu6_plus3("h", "b"),
             mk("Div", ["b_r", "six"], ["y"], name="b_div")]
    _check_same(_model(nodes), ["HardSwish", "HardSigmoid"])


def test_chains_that_are_not_the_formula_or_are_read_elsewhere_stay():
    nodes = [*_relu6_plus3("x", "a", three="two"),                 # x + 2: not hard-sigmoid
             mk("Mul", ["a_r", "sixth"], ["p"], name="a_div"),
             *_relu6_plus3("x", "b"),                              # relu6(x + 3) read twice
             mk("Mul", ["b_r", "sixth"], ["q"], name="b_div"),
             mk("Add", ["p", "q"], ["s"], name="sum"),
             mk("Add", ["s", "b_r"], ["y"], name="y")]
    model = _model(nodes)
    before = [n.op_type for n in model.graph.node]
    assert fuse_hard_activations(model) == 0
    assert [n.op_type for n in model.graph.node] == before


def test_a_spelled_out_hard_swish_is_priced_like_the_operator():
    """The estimate of a network no longer depends on how its exporter wrote hard-swish."""
    profile = load_profile()
    spelled = _model([mk("Conv", ["x", "w"], ["c"], name="conv"), *_relu6_plus3("c", "hs"),
                      mk("Mul", ["hs_r", "sixth"], ["s"], name="hs_div"),
                      mk("Mul", ["c", "s"], ["h"], name="hs_mul"),
                      mk("Conv", ["h", "w"], ["y"], name="conv2")])
    native = _model([mk("Conv", ["x", "w"], ["c"], name="conv"),
                     mk("HardSwish", ["c"], ["h"], name="hs_mul"),
                     mk("Conv", ["h", "w"], ["y"], name="conv2")])
    totals = []
    for m in (spelled, native):
        g = lower_onnx(prepare(m))
        est = estimate(g, precheck(g, profile, ()), profile)
        assert est["summary"]["kernels"] == 2          # HardSwish rides in conv's epilogue
        totals.append(est["summary"]["total_ms"])
    assert totals[0] == pytest.approx(totals[1])


def test_an_exported_hard_sigmoid_times_its_input_counts_as_one_swish_formed():
    """``x * HardSigmoid(x)`` (how some exporters write hard-swish) becomes HardSwish and is
    counted; a HardSigmoid with other constants is not hard-swish and stays."""
    nodes = [mk("HardSigmoid", ["x"], ["s"], name="sig", alpha=1 / 6, beta=0.5),
             mk("Mul", ["x", "s"], ["h"], name="swish"),
             mk("HardSigmoid", ["h"], ["t"], name="other", alpha=0.2, beta=0.5),
             mk("Mul", ["h", "t"], ["y"], name="not_swish")]
    model = _model(nodes)
    x = (RNG.standard_normal((1, 8, 5, 5)) * 4).astype(np.float32)
    want = _run(model, x)
    assert fuse_hard_activations(model) == 1
    assert [n.op_type for n in model.graph.node] == ["HardSwish", "HardSigmoid", "Mul"]
    np.testing.assert_allclose(_run(model, x)[0], want[0], rtol=1e-6, atol=1e-6)
