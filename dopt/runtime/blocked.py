"""Keep ONNX Runtime's blocked channel layout across the NPU's FP16 rounding.

ONNX Runtime's CPU provider runs convolutions and pooling in a blocked channel layout
(NCHWc) and converts back to NCHW in front of every op that has no blocked kernel. The
fast engine's FP16 rounding is a ``Cast(float16) -> Cast(float)`` pair after each NPU
kernel, and ``Cast`` has no blocked kernel, so every rounded convolution output paid a
``ReorderOutput`` and a ``ReorderInput``: on small feature maps those two conversions
cost more than the rounding itself.

Elementwise ops do not depend on the layout. :func:`keep_blocked` takes the graph as
ONNX Runtime optimized it and runs each chain of layout-free ops (the casts, per-tensor
Quantize/Dequantize, ReLU/Clip, Add/Sub/Mul of two same-shape blocked tensors) on the
blocked tensors themselves; the conversions nobody reads any more are dropped. The
kernels and their order are unchanged, so the values are the same bit for bit
(``tests/test_runtime_blocked.py``).

The channels a block pads (when a count is not a multiple of the block) hold the
producing kernel's activation of zero; the ops allowed here keep them finite, and the
next blocked convolution multiplies them by zero weights, as ONNX Runtime's own blocked
graphs do.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

NCHWC = "com.microsoft.nchwc"
UNARY = {"Cast", "Relu", "Clip", "QuantizeLinear", "DequantizeLinear"}
BINARY = {"Add", "Sub", "Mul"}
FLOAT = 1  # onnx.TensorProto.FLOAT


def _attrs(node) -> dict:
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def optimized_model(model_bytes: bytes, options, disabled: list):
    """The graph ONNX Runtime runs for ``model_bytes`` under ``options`` (a fresh
    ``SessionOptions``) without the ``disabled`` optimizers, as an ONNX model."""
    import onnx
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "optimized.onnx")
        options.optimized_model_filepath = path
        ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=disabled)
        return onnx.load(path)


def _topological(nodes: list) -> list:
    """Kahn's order over ``nodes``; linear in the graph's size."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [{producer[x] for x in n.input if x in producer} for n in nodes]
    readers: list[list[int]] = [[] for _ in nodes]
    for i, ds in enumerate(deps):
        for d in ds:
            readers[d].append(i)
    pending = [len(ds) for ds in deps]
    ready = [i for i, p in enumerate(pending) if p == 0]
    order = []
    while ready:
        i = ready.pop()
        order.append(i)
        for r in readers[i]:
            pending[r] -= 1
            if pending[r] == 0:
                ready.append(r)
    if len(order) != len(nodes):
        raise ValueError("the optimized graph has a cycle")
    return [nodes[i] for i in order]


def _out_dtype(node, in_dtype: int) -> int | None:
    """Element type of an allowed op's output; ``None`` when it cannot be told."""
    if node.op_type == "Cast":
        return int(_attrs(node)["to"])
    if node.op_type == "QuantizeLinear":
        return None  # integer; only ever read by other blocked ops (checked)
    if node.op_type == "DequantizeLinear":
        return FLOAT
    return in_dtype


def keep_blocked(model, shapes: dict) -> int:
    """Rewrite ``model`` (ONNX Runtime's optimized graph) in place; returns how many
    layout conversions were removed. ``shapes``: tensor name -> shape tuple, for the
    same-shape check of binary ops (names ONNX Runtime kept from the input graph)."""
    from onnx import helper
    g = model.graph
    consts = {i.name: i for i in g.initializer}
    nodes = _topological(list(g.node))
    before = sum(n.domain == NCHWC and n.op_type.startswith("Reorder") for n in nodes)
    # NCHW tensor -> (its blocked twin, logical channels, element type)
    blocked: dict[str, tuple[str, int, int | None]] = {}
    for n in nodes:
        if n.domain == NCHWC and n.op_type == "ReorderOutput" \
                and not _attrs(n).get("channels_last", 0):
            blocked[n.output[0]] = (n.input[0], int(_attrs(n)["channels"]), FLOAT)
    twins: dict[str, object] = {}   # NCHW tensor -> the node computing its blocked twin
    twin_of: dict[str, str] = {}    # twin name -> NCHW tensor
    for n in nodes:
        if n.domain or len(n.output) != 1 or n.output[0] in blocked:
            continue
        tensors = [x for x in n.input if x and x not in consts]
        scalars_ok = all(int(np.prod(consts[x].dims)) == 1 for x in n.input if x in consts)
        if n.op_type in UNARY:
            ok = len(tensors) == 1 and n.input[0] == tensors[0] and scalars_ok
            if n.op_type == "Clip":
                ok = ok and all(x in consts for x in n.input[1:] if x)
        elif n.op_type in BINARY:
            ok = (len(tensors) == 2 == len(n.input) and shapes.get(tensors[0]) is not None
                  and shapes.get(tensors[0]) == shapes.get(tensors[1])
                  and None not in shapes[tensors[0]])
        else:
            ok = False
        if not ok or not all(x in blocked for x in tensors):
            continue
        channels = {blocked[x][1] for x in tensors}
        dtypes = {blocked[x][2] for x in tensors}
        if len(channels) != 1 or len(dtypes) != 1:
            continue
        out = n.output[0]
        twin = helper.make_node(n.op_type, [blocked[x][0] if x in blocked else x
                                            for x in n.input],
                                [out + "/nchwc"], name=(n.name or out) + "/nchwc")
        twin.attribute.extend(n.attribute)
        twins[out] = twin
        blocked[out] = (out + "/nchwc", channels.pop(), _out_dtype(n, dtypes.pop()))
        twin_of[out + "/nchwc"] = out
    # a twin that is not float32 cannot be converted back: it may only feed other twins
    outputs = {o.name for o in g.output}
    readers: dict[str, list] = {}
    for n in nodes:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    for _ in range(len(twins) + 1):
        drop = {t for t, tw in twins.items()
                if any(x in twin_of and twin_of[x] not in twins for x in tw.input)
                or blocked[t][2] != FLOAT
                and (t in outputs or any(r.domain or r.output[0] not in twins
                                         for r in readers.get(t, [])))}
        if not drop:
            break
        for t in drop:  # a twin reading a dropped twin goes in the next round
            twins.pop(t)
            blocked.pop(t)
    # each twinned tensor is now produced from its twin; a ReorderInput of it is its twin
    out_nodes, rename = [], {}
    for n in nodes:
        t = n.output[0] if len(n.output) == 1 else None
        if t in twins:
            out_nodes.append(twins[t])
            if blocked[t][2] == FLOAT:
                out_nodes.append(helper.make_node("ReorderOutput", [blocked[t][0]], [t],
                                                  domain=NCHWC, name=t + "/reorder",
                                                  channels=blocked[t][1]))
            continue
        if n.domain == NCHWC and n.op_type == "ReorderInput" and n.input[0] in twins \
                and not _attrs(n).get("channels_last", 0):
            rename[n.output[0]] = blocked[n.input[0]][0]
            continue
        out_nodes.append(n)
    for n in out_nodes:
        for i, x in enumerate(n.input):
            if x in rename:
                n.input[i] = rename[x]
    # drop what nobody reads: one reverse pass
    needed, kept = set(outputs), []
    for n in reversed(out_nodes):
        if any(o in needed for o in n.output if o):
            kept.append(n)
            needed.update(x for x in n.input if x)
    kept.reverse()
    del g.node[:]
    g.node.extend(kept)
    return before - sum(n.domain == NCHWC and n.op_type.startswith("Reorder") for n in kept)


def shapes_of(model) -> dict:
    """Tensor name -> shape (ints, symbolic names, ``None`` unknown) by ONNX inference, on
    a weight-free skeleton (inference serializes what it is given: the weights, again)."""
    import onnx
    from ..npu.prepare import skeleton
    inf = onnx.shape_inference.infer_shapes(skeleton(model))
    out = {}
    for vi in list(inf.graph.value_info) + list(inf.graph.input) + list(inf.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = tuple(d.dim_value or d.dim_param or None for d in tt.shape.dim)
    return out
