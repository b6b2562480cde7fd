"""An exporter's cancelling Transpose pairs leave the compiled graph (dopt/npu/transposes.py).

The graphs are written the way tf2onnx writes a Keras block that TensorFlow ran in NHWC:
the convolutions in NCHW, everything between them wrapped in Transpose(0,2,3,1) ...
Transpose(0,3,1,2)."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from dopt import runtime  # noqa: E402
from dopt.npu.compiler import compile_onnx  # noqa: E402
from dopt.npu.costmodel import estimate  # noqa: E402
from dopt.npu.lower import lower_onnx  # noqa: E402
from dopt.npu.precheck import precheck, render_text  # noqa: E402
from dopt.npu.prepare import prepare  # noqa: E402
from dopt.npu.profile import load_profile  # noqa: E402
from dopt.npu.transposes import cancel_transposes  # noqa: E402

NHWC, NCHW = [0, 2, 3, 1], [0, 3, 1, 2]
RNG = np.random.default_rng(0)


def _init(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _keras_block(c=16):
    """conv -> [NHWC: hard-swish, per-channel scale and shift, squeeze-and-excite gate by a
    keep-dims ReduceMean, an H/W zero Pad] -> conv, as tf2onnx exports it."""
    inits = [
        _init("w1", RNG.standard_normal((c, 8, 3, 3)) * 0.2), _init("w2", RNG.standard_normal(
            (4, c, 3, 3)) * 0.2), _init("three", 3.0), _init("zero", 0.0), _init("six", 6.0),
        _init("sixth", 1 / 6), _init("scale", RNG.uniform(0.5, 1.5, c)),
        _init("shift", RNG.standard_normal((1, 1, 1, c))),
        numpy_helper.from_array(np.array([0, 1, 1, 0, 0, 1, 1, 0], np.int64), "pads")]
    mk = helper.make_node
    nodes = [
        mk("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        mk("Transpose", ["c1"], ["t1"], name="to_nhwc", perm=NHWC),
        mk("Add", ["t1", "three"], ["a"], name="hs_add"),
        mk("Clip", ["a", "zero", "six"], ["r"], name="hs_relu6"),
        mk("Mul", ["r", "sixth"], ["hsig"], name="hs_div"),
        mk("Mul", ["t1", "hsig"], ["hs"], name="hs_mul"),
        mk("Mul", ["hs", "scale"], ["sc"], name="bn_scale"),
        mk("Add", ["sc", "shift"], ["sh"], name="bn_shift"),
        mk("ReduceMean", ["sh"], ["se"], name="se_pool", axes=[1, 2], keepdims=1),
        mk("Sigmoid", ["se"], ["gate"], name="se_gate"),
        mk("Mul", ["sh", "gate"], ["g"], name="se_mul"),
        mk("Pad", ["g", "pads"], ["p"], name="pad"),
        mk("Transpose", ["p"], ["t2"], name="to_nchw", perm=NCHW),
        mk("Conv", ["t2", "w2"], ["y"], name="conv2"),
    ]
    g = helper.make_graph(nodes, "keras_block",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 10, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _ort(model, x):
    return ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _ops(model):
    return [n.op_type for n in model.graph.node]


def test_keras_style_block_loses_both_transposes_and_computes_the_same():
    model = _keras_block()
    x = RNG.standard_normal((1, 8, 10, 10)).astype(np.float32)
    want = _ort(model, x)
    prepared = prepare(model)
    assert "Transpose" not in _ops(prepared)
    names = {n.name for n in prepared.graph.node}
    assert {"conv1", "conv2", "hs_mul", "se_pool", "pad"} <= names   # names are kept
    got = _ort(prepared, x)
    assert got.shape == want.shape == (1, 4, 10, 10)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the constants were permuted, not dropped: the per-channel scale now broadcasts on C
    scale = next(t for t in prepared.graph.initializer if t.name.startswith("scale"))
    assert list(scale.dims) == [1, 16, 1, 1]


def test_the_compiled_model_runs_on_the_emulated_npu_without_permute_kernels():
    model = _keras_block()
    x = RNG.standard_normal((1, 8, 10, 10)).astype(np.float32)
    want = _ort(model, x)
    om, report = compile_onnx(model, load_profile())
    assert not [r for r in report["nodes"] if r["ir_op"] == "Permute"]
    # the report says what the compiler rewrote (the hard-swish too)
    assert report["prepared"] == {"transposes_cancelled": 2, "hard_activations_formed": 1}
    text = render_text(report)
    assert "2 Transposes cancelled" in text and "1 HardSigmoid/HardSwish formed" in text
    got = runtime.Session(om, device="npu").run({"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)   # the NPU computes in FP16


def test_the_estimate_no_longer_pays_for_the_exporters_layout():
    profile = load_profile()
    model = _keras_block()
    raw = lower_onnx(model)
    clean = lower_onnx(prepare(model))
    t_raw = estimate(raw, precheck(raw, profile, ()), profile)
    t_clean = estimate(clean, precheck(clean, profile, ()), profile)
    assert [k for k in t_raw["kernels"] if k["op"] == "Permute"]
    assert not [k for k in t_clean["kernels"] if k["op"] == "Permute"]
    assert t_clean["summary"]["kernels"] <= t_raw["summary"]["kernels"] - 2
    assert t_clean["summary"]["total_ms"] < t_raw["summary"]["total_ms"]


def _graph(nodes, inits=(), out_shape=None):
    g = helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                          list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_transpose_that_meets_no_inverse_is_left_as_it_was():
    mk = helper.make_node
    model = _graph([mk("Transpose", ["x"], ["t"], name="t", perm=NHWC),
                    mk("Relu", ["t"], ["r"], name="relu"),
                    mk("Reshape", ["r", "shape"], ["y"], name="flat")],
                   [numpy_helper.from_array(np.array([1, -1], np.int64), "shape")])
    before = model.SerializeToString()
    assert cancel_transposes(model) == 0
    assert model.SerializeToString() == before


def test_inverse_pairs_cancel_and_other_pairs_compose_into_one():
    mk = helper.make_node
    x = RNG.standard_normal((1, 3, 4, 5)).astype(np.float32)
    pair = _graph([mk("Transpose", ["x"], ["t"], name="a", perm=NHWC),
                   mk("Transpose", ["t"], ["u"], name="b", perm=NCHW),
                   mk("Relu", ["u"], ["y"], name="relu")])
    want = _ort(pair, x)
    assert cancel_transposes(pair) == 2
    assert _ops(pair) == ["Relu"]
    np.testing.assert_array_equal(_ort(pair, x), want)
    three = _graph([mk("Transpose", ["x"], ["t"], name="a", perm=NHWC),
                    mk("Transpose", ["t"], ["u"], name="b", perm=[0, 2, 1, 3]),
                    mk("Transpose", ["u"], ["y"], name="c", perm=[1, 0, 2, 3])])
    want = _ort(three, x)
    assert cancel_transposes(three) == 2
    assert _ops(three) == ["Transpose"]
    np.testing.assert_array_equal(_ort(three, x), want)


def test_a_graph_output_inside_the_stretch_keeps_its_layout():
    """A tensor the user reads in NHWC stays NHWC; the rest of the stretch still cancels."""
    mk = helper.make_node
    x = RNG.standard_normal((1, 3, 4, 5)).astype(np.float32)
    g = helper.make_graph(
        [mk("Transpose", ["x"], ["t"], name="a", perm=NHWC),
         mk("Relu", ["t"], ["mid"], name="relu"),
         mk("Sigmoid", ["mid"], ["s"], name="sig"),
         mk("Transpose", ["s"], ["y"], name="b", perm=NCHW)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("mid", TensorProto.FLOAT, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": x})
    cancel_transposes(model)
    got = ort.InferenceSession(model.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert got[1].shape == (1, 4, 5, 3)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert _ops(model).count("Transpose") == 1


def test_a_long_stretch_cancels_and_the_rewrite_is_bounded():
    mk = helper.make_node
    n = 300
    nodes = [mk("Transpose", ["x"], ["t0"], name="a", perm=NHWC)]
    nodes += [mk("Relu" if i % 2 else "Neg", [f"t{i}"], [f"t{i + 1}"], name=f"op{i}")
              for i in range(n)]
    nodes.append(mk("Transpose", [f"t{n}"], ["y"], name="b", perm=NCHW))
    model = _graph(nodes)
    x = RNG.standard_normal((1, 3, 4, 5)).astype(np.float32)
    want = _ort(model, x)
    assert cancel_transposes(model) == 2
    assert "Transpose" not in _ops(model) and len(model.graph.node) == n
    np.testing.assert_array_equal(_ort(model, x), want)


def test_many_pairs_in_a_row_all_cancel():
    """Each NHWC Transpose must catch its own inverse before that one moves on: 40 pairs in
    a chain, separated by element-wise ops, all leave (sinking every Transpose in turn would
    leave them chasing each other down to the output)."""
    mk = helper.make_node
    nodes, t = [], "x"
    for p in range(40):
        nodes += [mk("Transpose", [t], [f"a{p}"], name=f"ta{p}", perm=NHWC),
                  mk("Relu", [f"a{p}"], [f"r{p}"], name=f"r{p}"),
                  mk("Transpose", [f"r{p}"], [f"b{p}"], name=f"tb{p}", perm=NCHW),
                  mk("Sigmoid", [f"b{p}"], [f"s{p}"], name=f"s{p}")]
        t = f"s{p}"
    nodes.append(mk("Neg", [t], ["y"], name="out"))
    model = _graph(nodes)
    x = RNG.standard_normal((1, 3, 4, 5)).astype(np.float32)
    want = _ort(model, x)
    assert cancel_transposes(model) == 80
    assert "Transpose" not in _ops(model) and len(model.graph.node) == 81
    np.testing.assert_array_equal(_ort(model, x), want)


def _random_graph(seed):
    """A random chain-and-branch graph of Transposes (several perms), element-wise ops with
    scalar / per-channel / broadcast constants on either side, two-tensor Add/Sub, keep-dims
    ReduceMean and Pad, with one or two outputs."""
    rng = np.random.default_rng(seed)
    mk = helper.make_node
    perms = [NHWC, NCHW, [0, 1, 3, 2], [0, 2, 1, 3], [1, 0, 2, 3]]
    tensors, nodes, inits = [("x", [1, 3, 4, 5])], [], []
    inits += [numpy_helper.from_array(np.array(v, np.float32), k)
              for k, v in (("lo", -0.5), ("hi", 0.7))]
    for i in range(int(rng.integers(4, 25))):
        name, shape = tensors[int(rng.integers(max(0, len(tensors) - 4), len(tensors)))]
        op = str(rng.choice(["T", "T", "T", "Relu", "Sigmoid", "Clip", "AddC", "MulC", "Add",
                             "Sub", "Reduce", "Pad"]))
        out, new = f"t{i}", shape
        if op == "T":
            p = perms[int(rng.integers(len(perms)))]
            nodes.append(mk("Transpose", [name], [out], name=f"n{i}", perm=p))
            new = [shape[j] for j in p]
        elif op in ("Relu", "Sigmoid"):
            nodes.append(mk(op, [name], [out], name=f"n{i}"))
        elif op == "Clip":
            nodes.append(mk("Clip", [name, "lo", "hi"], [out], name=f"n{i}"))
        elif op in ("AddC", "MulC"):
            kind = int(rng.integers(3))
            cshape = [] if kind == 0 else [shape[-1]] if kind == 1 else [1, shape[1], 1, 1]
            inits.append(numpy_helper.from_array(
                rng.standard_normal(cshape).astype(np.float32), f"c{i}"))
            args = [name, f"c{i}"] if rng.random() < 0.7 else [f"c{i}", name]
            nodes.append(mk(op[:-1], args, [out], name=f"n{i}"))
        elif op in ("Add", "Sub"):
            same = [t for t, s in tensors if s == shape]
            nodes.append(mk(op, [name, same[int(rng.integers(len(same)))]], [out],
                            name=f"n{i}"))
        elif op == "Reduce":
            axes = sorted({int(a) for a in rng.choice([1, 2, 3], size=int(rng.integers(1, 3)))})
            nodes.append(mk("ReduceMean", [name], [out], name=f"n{i}", axes=axes, keepdims=1))
            new = [1 if j in axes else d for j, d in enumerate(shape)]
        else:
            pads = [int(v) for v in rng.integers(0, 2, 8)]
            pads[0] = pads[4] = 0
            inits.append(numpy_helper.from_array(np.array(pads, np.int64), f"p{i}"))
            nodes.append(mk("Pad", [name, f"p{i}"], [out], name=f"n{i}"))
            new = [d + pads[j] + pads[j + 4] for j, d in enumerate(shape)]
        tensors.append((out, new))
    outs = [tensors[-1][0]]
    if rng.random() < 0.5:
        outs.append(tensors[len(tensors) // 2][0])
    outs = [o for o in dict.fromkeys(outs) if o != "x"]
    g = helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 5])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                           for o in outs], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_random_graphs_compute_the_same_after_the_rewrite():
    """Property check on 150 seeded random graphs: whatever the pass does (about two thirds
    change), every output keeps its shape and values."""
    changed = 0
    for seed in range(150):
        model = _random_graph(seed)
        x = np.random.default_rng(seed).standard_normal((1, 3, 4, 5)).astype(np.float32)
        sess = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        want = sess.run(None, {"x": x})
        changed += cancel_transposes(model) > 0
        got = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"]).run(None, {"x": x})
        for a, b in zip(got, want):
            assert a.shape == b.shape, seed
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=f"seed {seed}")
    assert changed > 50
