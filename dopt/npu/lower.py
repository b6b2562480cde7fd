"""ONNX graph -> the NPU's IR operator set (names of the reference's operator guide).

Lowering keeps every original node name, records the facts the rules need
(channels, groups, kernel, concat offsets) and marks what the offline compiler
folds away (Conv + BatchNorm / per-channel Mul / Add, shape-only ops). Nothing
here decides placement: ``rules.py`` does, from the hardware profile.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import DoptError
from ..formats.qdq import require_onnx, weight_axis

# ONNX op -> IR op; a callable picks by attributes/shapes. Ops absent here have no NPU form.
_ACTIVATIONS = {"Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "Softplus", "Softsign",
                "HardSigmoid", "Clip", "Relu6", "Gelu", "Mish"}
_SIMPLE = {
    "BatchNormalization": "BNInference", "HardSwish": "HardSwish", "PRelu": "PRelu",
    "MaxPool": "PoolingD", "AveragePool": "PoolingD", "GlobalAveragePool": "PoolingD",
    "GlobalMaxPool": "PoolingD", "Softmax": "Softmax", "LogSoftmax": "LogSoftmax",
    "Concat": "ConcatD", "Split": "SplitD", "Reshape": "Reshape", "Squeeze": "Squeeze",
    "Unsqueeze": "ExpandDims", "Shape": "Shape", "Size": "Size", "Transpose": "Permute",
    "Pad": "Pad", "Slice": "StridedSlice", "Gather": "GatherV2D", "GatherND": "GatherNd",
    "Tile": "Tile", "DepthToSpace": "DepthToSpace", "SpaceToDepth": "SpaceToDepth",
    "ReduceMean": "ReduceMean", "ReduceSum": "ReduceSum", "ReduceMax": "ReduceMax",
    "ReduceMin": "ReduceMin", "ReduceProd": "ReduceProdD", "ArgMax": "ArgMaxExt2",
    "Exp": "Exp", "Log": "Log", "Sqrt": "Sqrt", "Reciprocal": "Reciprocal", "Neg": "Neg",
    "Abs": "Activation", "Floor": "Floor", "Ceil": "Ceil", "Round": "Round", "Sign": "Sign",
    "Sin": "Sin", "Cos": "Cos", "Tan": "Tan", "Asin": "Asin", "Acos": "Acos", "Atan": "Atan",
    "Pow": "Pow", "Div": "RealDiv", "Equal": "Equal", "Greater": "Greater", "Less": "Less",
    "GreaterOrEqual": "GreaterEqual", "LessOrEqual": "LessEqual", "Not": "LogicalNot",
    "And": "LogicalAnd", "Or": "LogicalOr", "Xor": "LogicalXor", "Where": "Select",
    "Max": "Maximum", "Min": "Minimum", "Cast": "CastT", "Expand": "Tile",
    "LRN": "LRN", "InstanceNormalization": "InstanceNorm",
    "LayerNormalization": "LayerNorm", "TopK": "TopK", "OneHot": "OneHot",
    "ScatterND": "ScatterNd", "Range": "Range", "Identity": "Reshape", "Dropout": "Reshape",
    "ConvTranspose": "ConvTranspose", "LSTM": "LSTM", "Einsum": None, "NonZero": None,
    "QuantizeLinear": "Quantize", "DequantizeLinear": "Dequantize", "Flatten": "Flatten",
    "Resize": "ResizeBilinear", "Upsample": "Upsample", "SpaceToBatchND": "SpaceToBatchND",
}


@dataclass
class IRNode:
    name: str
    onnx_op: str
    op: str | None              # IR operator, None when the NPU has none
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)
    fused_into: str | None = None   # set when the compiler folds this node into another


@dataclass
class IRGraph:
    nodes: list[IRNode]
    shapes: dict[str, tuple]        # tensor -> static shape (where known)
    initializers: set[str]
    inputs: list[str]
    outputs: list[str]

    def node(self, name: str) -> IRNode:
        return next(n for n in self.nodes if n.name == name)

    def consumers(self, tensor: str) -> list[IRNode]:
        return [n for n in self.nodes if tensor in n.inputs]


def _attr(node, name, default=None):
    from onnx import helper
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _pad_value_is_zero(node, model) -> bool:
    """Whether a constant-mode Pad fills with 0 (attribute ``value`` before opset 11, the
    optional third input after; an input that is not an initializer counts as unknown)."""
    if len(node.input) > 2 and node.input[2]:
        from onnx import numpy_helper
        init = next((i for i in model.graph.initializer if i.name == node.input[2]), None)
        return init is not None and not numpy_helper.to_array(init).any()
    return float(_attr(node, "value", 0.0) or 0.0) == 0.0


def _shape_map(model) -> dict[str, tuple]:
    out = {}
    vis = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    for v in vis:
        t = v.type.tensor_type
        if t.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            out[v.name] = dims
    for i in model.graph.initializer:
        out[i.name] = tuple(i.dims)
    return out


def _conv_attrs(node, shapes, inits) -> dict:
    w = shapes.get(node.input[1], ())
    group = int(_attr(node, "group", 1))
    cout = w[0] if w else -1
    cin = (w[1] * group) if len(w) > 1 else -1
    return {"cin": cin, "cout": cout, "groups": group, "kernel": list(w[2:]),
            "strides": list(_attr(node, "strides", [1] * max(len(w) - 2, 0))),
            "weight": node.input[1] if node.input[1] in inits else None}


def lower_onnx(model, input_shapes: dict | None = None) -> IRGraph:
    """Lower an ``onnx.ModelProto``; ``input_shapes`` overrides graph input dims first."""
    from .prepare import skeleton
    require_onnx()
    m = skeleton(model)   # structure only: input dims change below, weights are not read
    inits = {i.name for i in m.graph.initializer}
    graph_inputs = [i.name for i in m.graph.input if i.name not in inits]
    for name, dims in (input_shapes or {}).items():
        vi = next((i for i in m.graph.input if i.name == name), None)
        if vi is None:
            raise DoptError(f"--input_shape names input '{name}', which the model does not have",
                            field="--input_shape", expected="one of " + ", ".join(graph_inputs))
        shp = vi.type.tensor_type.shape
        if len(shp.dim) != len(dims):
            raise DoptError(f"--input_shape gives {len(dims)} dims for input '{name}'",
                            field="--input_shape", expected=f"{len(shp.dim)} dims")
        for d, v in zip(shp.dim, dims):
            d.ClearField("dim_param")
            if v > 0:
                d.dim_value = v
    try:
        m = require_onnx().shape_inference.infer_shapes(m, strict_mode=False)
    except Exception:  # noqa: BLE001 - shapes are advisory; rules say when one is unknown
        pass
    shapes = _shape_map(m)
    nodes = []
    for i, n in enumerate(m.graph.node):
        name = n.name or f"{n.op_type}_{i}"
        op = n.op_type
        attrs: dict = {}
        if op == "Conv":
            attrs = _conv_attrs(n, shapes, inits)
            g, cin = attrs["groups"], attrs["cin"]
            ir = "ConvolutionDepthwise" if g > 1 and g == cin and cin > 0 else "Convolution"
        elif op in ("Gemm", "MatMul"):
            const_w = len(n.input) > 1 and n.input[1] in inits
            w = shapes.get(n.input[1], ())
            ir = "FullyConnection" if const_w else ("MatMul" if len(w) <= 2 else "BatchMatMul")
            if const_w and len(w) == 2:
                ax = weight_axis(n)
                attrs = {"cin": w[1 - ax], "cout": w[ax], "weight": n.input[1]}
        elif op in ("Add", "Sub", "Mul"):
            consts = [x for x in n.input if x in inits]
            ir = {"Add": "Add", "Sub": "Sub", "Mul": "Mul"}[op] if consts else "Eltwise"
            attrs = {"const_inputs": consts}
        elif op in _ACTIVATIONS:
            ir = "Activation"
        elif op == "Concat":
            ir = "ConcatD"
            attrs = {"axis": int(_attr(n, "axis", 1)),
                     "input_dims": [shapes.get(x) for x in n.input]}
        elif op == "Split":
            ir = "SplitD"
            attrs = {"axis": int(_attr(n, "axis", 0)),
                     "output_dims": [shapes.get(x) for x in n.output]}
        elif op == "Pad":
            ir = "Pad"
            attrs = {"mode": _text(_attr(n, "mode", b"constant")),
                     "zero_value": _pad_value_is_zero(n, m)}
        elif op == "Flatten":
            s = shapes.get(n.input[0])
            ir = "Reshape" if s and all(d == 1 for d in s[2:]) else "Flatten"
        elif op == "Resize":
            mode = _attr(n, "mode", b"nearest")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            ir = "ResizeBilinear" if mode == "linear" else "ResizeNearestNeighbor"
        else:
            ir = _SIMPLE.get(op)
        if n.domain not in ("", "ai.onnx"):
            ir = None
        nodes.append(IRNode(name, op, ir, list(n.input), list(n.output), attrs))
    g = IRGraph(nodes, shapes, inits, graph_inputs, [o.name for o in m.graph.output])
    _mark_fusions(g)
    return g


def _mark_fusions(g: IRGraph) -> None:
    """Conv(depthwise) + BNInference / per-channel Mul (Scale) / Add (BiasAdd) fold away."""
    for n in g.nodes:
        if n.op not in ("Convolution", "ConvolutionDepthwise") or n.fused_into:
            continue
        head = n
        while True:
            users = g.consumers(head.outputs[0])
            if len(users) != 1 or head.outputs[0] in g.outputs:
                break
            u = users[0]
            foldable = (u.op == "BNInference"
                        or (u.op in ("Mul", "Add") and len(u.attrs.get("const_inputs", [])) == 1
                            and _per_channel(g, u.attrs["const_inputs"][0], n.attrs["cout"])))
            if not foldable:
                break
            u.fused_into = n.name
            u.attrs["fused_as"] = {"BNInference": "BNInference", "Mul": "Scale",
                                   "Add": "BiasAdd"}[u.op]
            head = u
        if head is not n:
            n.attrs["fused_output"] = head.outputs[0]


def _per_channel(g: IRGraph, tensor: str, channels: int) -> bool:
    s = g.shapes.get(tensor)
    if s is None:
        return False
    dims = [d for d in s if d != 1]
    return len(dims) == 0 or (dims == [channels] and (len(s) < 3 or s[-1] == 1))
