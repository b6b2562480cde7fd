"""The float variants ``dopt deploy`` builds from one PTQ run, and the simulated build's
NPU data types, on graphs as exporters other than torch write them (PP-OCR's paddle2onnx
export: every weight a ``Constant`` node, BatchNormalization left unfolded with running
variances far beyond FP16)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dopt.deploy.variants import Variants
from dopt.formats import param_file as P
from dopt.formats.qdq import ort_session, with_npu_data_types

RNG = np.random.default_rng(7)


def _const(name, a):
    return helper.make_node("Constant", [], [name], name=f"{name}/const",
                            value=numpy_helper.from_array(np.asarray(a, np.float32), name))


def paddle_like(huge_var: float = 1e7, constants: bool = True,
                standalone: bool = False) -> onnx.ModelProto:
    """x -> Conv(bias) -> BN (running variance ``huge_var``) -> Relu -> Conv(bias) -> y,
    weights in Constant nodes (``constants``) or initializers."""
    c1, c2 = 32, 16
    w1 = RNG.normal(0, 40.0, (c1, 3, 3, 3))      # large activations, as PP-OCR's head
    b1 = RNG.normal(0, 1.0, c1)
    gamma, beta = RNG.uniform(0.5, 1.5, c1), RNG.normal(0, 0.5, c1)
    mean, var = RNG.normal(0, 50, c1), np.full(c1, huge_var) * RNG.uniform(0.5, 2, c1)
    w2 = RNG.normal(0, 0.2, (c2, c1, 3, 3))
    b2 = RNG.normal(0, 0.5, c2)
    weights = (("w1", w1), ("b1", b1), ("g", gamma), ("be", beta), ("mu", mean), ("var", var),
               ("w2", w2), ("b2", b2))
    nodes = [_const(n, a) for n, a in weights] if constants else []
    conv1 = helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4)
    if standalone:      # Conv -> Relu -> BN: the BN is a kernel of its own
        mid = [helper.make_node("Relu", ["c1"], ["c1r"], name="relu1"),
               helper.make_node("BatchNormalization", ["c1r", "g", "be", "mu", "var"], ["r"],
                                name="bn1", epsilon=1e-5)]
    else:               # Conv -> BN -> Relu: the BN folds into the convolution
        mid = [helper.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["bn"],
                                name="bn1", epsilon=1e-5),
               helper.make_node("Relu", ["bn"], ["r"], name="relu1")]
    nodes += [conv1, *mid,
              helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2", pads=[1] * 4)]
    g = helper.make_graph(nodes, "paddle_like",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                         ["n", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                         ["n", 16, 16, 16])],
                          [] if constants else
                          [numpy_helper.from_array(np.asarray(a, np.float32), n)
                           for n, a in weights])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _run(m, x):
    return ort_session(m.SerializeToString()).run(None, {"x": x})[0]


def test_npu_data_types_fold_batchnorm_statistics_beyond_fp16():
    # a running variance of 1e7 is inf in FP16; the NPU never holds it (the compiler folds
    # BN into scale and shift in float32), so the simulation must not either
    m = paddle_like(1e7, constants=False)
    x = RNG.normal(0, 1, (4, 3, 16, 16)).astype(np.float32)
    want = _run(m, x)
    got = _run(with_npu_data_types(m), x)
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()
    # and it still rounds: the result is not the float32 one
    assert not np.array_equal(got, want)


@pytest.mark.parametrize("standalone", [False, True], ids=["fused", "standalone"])
def test_npu_data_types_of_a_batchnorm_match_the_compiled_model(standalone):
    # fused into the convolution before it, or a kernel of its own (after the Relu): the
    # compiled model holds a scale and a shift, finite, and the simulation agrees with it
    from dopt.npu.compiler import compile_onnx
    from dopt.npu.profile import load_profile
    from dopt.runtime import Session
    m = paddle_like(1e7, constants=False, standalone=standalone)
    x = RNG.normal(0, 1, (4, 3, 16, 16)).astype(np.float32)
    om, _ = compile_onnx(m, load_profile(), input_shapes={"x": [1, 3, 16, 16]})
    sess = Session(om)
    got = sess.run(x)[sess.outputs[0]]
    sim = _run(with_npu_data_types(m), x)
    assert np.isfinite(got).all()
    assert np.abs(got - sim).max() <= 4e-3 * np.abs(sim).max()
    want = _run(m, x)
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from dopt_adapters.onnx.ptq_backend import quantize_onnx
    d = tmp_path_factory.mktemp("variants")
    m = paddle_like(1e3)
    onnx.save(m, str(d / "m.onnx"))
    xc = RNG.normal(0, 1, (32, 3, 16, 16)).astype(np.float32)
    quantize_onnx(str(d / "m.onnx"), lambda: iter([{"x": xc[i:i + 8]} for i in range(0, 32, 8)]),
                  output=str(d / "q.onnx"), param_file=str(d / "q_param"),
                  input_shapes={"x": [1, 3, 16, 16]}, check=True)
    return m, onnx.load(str(d / "q.onnx")), P.read_params(d / "q_param")


def test_all_float_variant_is_the_float_model_when_weights_are_constants(quantized):
    # the float weights live in Constant nodes: every layer float must give back the
    # user's float model (it gave zero biases, and PP-OCR det an IoU of 0)
    m, q, params = quantized
    v = Variants(q, params, m)
    assert v.layers
    x = RNG.normal(0, 1, (4, 3, 16, 16)).astype(np.float32)
    want = _run(m, x)
    all_float, doc = v.build(v.layers)
    assert not doc["layers"]
    got = _run(all_float, x)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # and one layer float moves the output towards float
    int8 = _run(v.build([])[0], x)
    one = _run(v.build([v.layers[0]])[0], x)
    assert np.abs(one - want).mean() < np.abs(int8 - want).mean()
