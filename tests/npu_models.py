"""Small ONNX graphs for the compiler and runtime tests, built with onnx.helper."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from dopt.quant import numerics as nm

RNG_SEED = 0


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def _conv(rng, name, x, out, cin, cout, k=3, group=1, bias=True):
    w = (rng.standard_normal((cout, cin // group, k, k)) * (1.0 / np.sqrt(cin // group * k * k))
         ).astype(np.float32)
    inits = [_init(f"{name}.weight", w)]
    ins = [x, f"{name}.weight"]
    if bias:
        inits.append(_init(f"{name}.bias", (rng.standard_normal(cout) * 0.1).astype(np.float32)))
        ins.append(f"{name}.bias")
    node = helper.make_node("Conv", ins, [out], name=name, pads=[k // 2] * 4,
                            kernel_shape=[k, k], group=group)
    return node, inits


def _model(nodes, inits, inputs, outputs, opset=17):
    g = helper.make_graph(nodes, "t", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def mixed_placement_model():
    """24-channel conv, Conv+BN, a 3-way concat at channel offsets 0/24/40, an Einsum."""
    rng = np.random.default_rng(RNG_SEED)
    nodes, inits = [], []
    n, i = _conv(rng, "conv24", "x", "a", 16, 24)
    nodes += [n, helper.make_node("Relu", ["a"], ["a_r"], name="relu24")]
    inits += i
    n, i = _conv(rng, "conv_bn", "x", "b", 16, 16, bias=False)
    nodes.append(n)
    inits += i
    bn = [_init("bn.scale", rng.uniform(0.5, 1.5, 16).astype(np.float32)),
          _init("bn.bias", rng.standard_normal(16).astype(np.float32) * 0.1),
          _init("bn.mean", rng.standard_normal(16).astype(np.float32) * 0.1),
          _init("bn.var", rng.uniform(0.5, 2.0, 16).astype(np.float32))]
    inits += bn
    nodes.append(helper.make_node("BatchNormalization", ["b", "bn.scale", "bn.bias", "bn.mean",
                                                         "bn.var"], ["b_bn"], name="bn",
                                  epsilon=1e-5))
    n, i = _conv(rng, "conv16", "x", "c", 16, 16)
    nodes.append(n)
    inits += i
    nodes.append(helper.make_node("Concat", ["a_r", "b_bn", "c"], ["cat"], name="concat", axis=1))
    inits.append(_init("gain", rng.uniform(0.5, 1.5, 56).astype(np.float32)))
    nodes.append(helper.make_node("Einsum", ["cat", "gain"], ["y"], name="einsum",
                                  equation="nchw,c->nchw"))
    return _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                               [1, 16, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])


def int8_net(opset=17, width=1):
    """Conv(32) -> Relu -> depthwise -> Relu -> MaxPool -> Conv -> GAP -> Flatten -> Gemm."""
    rng = np.random.default_rng(RNG_SEED + 1)
    nodes, inits = [], []
    c1, c2 = 64 * width, 32 * width
    for name, x, out, cin, cout, group in (("c1", "x", "h1", 32, c1, 1),
                                           ("dw", "r1", "h2", c1, c1, c1),
                                           ("c2", "p", "h3", c1, c2, 1)):
        n, i = _conv(rng, name, x, out, cin, cout, group=group)
        nodes.append(n)
        inits += i
        if name == "c1":
            nodes.append(helper.make_node("Relu", ["h1"], ["r1"], name="relu1"))
        if name == "dw":
            nodes.append(helper.make_node("Relu", ["h2"], ["r2"], name="relu2"))
            nodes.append(helper.make_node("MaxPool", ["r2"], ["p"], name="pool",
                                          kernel_shape=[2, 2], strides=[2, 2]))
    nodes.append(helper.make_node("GlobalAveragePool", ["h3"], ["g"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["g"], ["f"], name="flatten", axis=1))
    inits += [_init("fc.weight", (rng.standard_normal((10, c2)) * 0.2).astype(np.float32)),
              _init("fc.bias", (rng.standard_normal(10) * 0.1).astype(np.float32))]
    nodes.append(helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="fc",
                                  transB=1))
    return _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                               ["N", 32, 12, 12])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], opset)


def params_for(model, ranges: dict[str, tuple[float, float]]) -> dict:
    """A parameter file for every Conv/Gemm of ``model`` from given input ranges."""
    from dopt.formats import param_file as P
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    doc = P.new_params({"name": "test"}, "model.onnx")
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm") or n.name not in ranges:
            continue
        w = inits[n.input[1]]
        s, o = nm.activation_qparams(*ranges[n.name])
        doc["layers"][n.name] = {
            "op_type": n.op_type, "strategy": "Quant_INT8-8",
            "input": {"tensor": n.input[0], "bits": 8, "scale": float(s), "offset": int(o)},
            "weight": {"tensor": n.input[1], "bits": 8, "per_channel": True, "symmetric": True,
                       "scales": [float(v) for v in nm.weight_scales(w, 0)]},
            "bias": {"tensor": n.input[2], "bits": 32} if len(n.input) > 2 else None}
    return doc


def blocked_net(big_bias: float = 0.0):
    """Inverted-residual shapes for the runtime's layout rewrite: a 24-channel stem
    (not a multiple of 16), expand -> ReLU6 -> depthwise -> ReLU6 -> project, a residual
    Add, a channel Concat and a classifier. ``big_bias`` is added to the project conv's
    first bias: a bias too large for an integer-exact float32 op as a whole."""
    rng = np.random.default_rng(RNG_SEED + 2)
    nodes, inits = [], []
    inits += [_init("six", np.array(6.0, np.float32)), _init("zero", np.array(0.0, np.float32))]
    for name, x, out, cin, cout, k, group, act in (
            ("stem", "x", "s", 16, 24, 3, 1, True),
            ("expand", "s6", "e", 24, 72, 1, 1, True),
            ("dw", "e6", "d", 72, 72, 3, 72, True),
            ("project", "d6", "p", 72, 24, 1, 1, False),
            ("side", "s6", "q", 24, 40, 1, 1, False)):
        n, i = _conv(rng, name, x, out, cin, cout, k=k, group=group)
        if name == "project" and big_bias:
            b = numpy_helper.to_array(i[1]).copy()
            b[0] += big_bias
            i[1] = _init(f"{name}.bias", b)
        nodes.append(n)
        inits += i
        if act:
            nodes.append(helper.make_node("Clip", [out, "zero", "six"], [out + "6"],
                                          name=name + "_relu6"))
    nodes += [helper.make_node("Add", ["s6", "p"], ["r"], name="residual"),
              helper.make_node("Concat", ["r", "q"], ["cat"], name="concat", axis=1),
              helper.make_node("GlobalAveragePool", ["cat"], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flatten", axis=1)]
    inits += [_init("fc.weight", (rng.standard_normal((10, 64)) * 0.2).astype(np.float32)),
              _init("fc.bias", (rng.standard_normal(10) * 0.1).astype(np.float32))]
    nodes.append(helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="fc",
                                  transB=1))
    return _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                               ["N", 16, 14, 14])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])


BLOCKED_RANGES = {"expand": (0, 6), "dw": (0, 6), "project": (0, 6), "side": (0, 6),
                  "fc": (-3, 3)}
