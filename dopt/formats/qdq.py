"""ONNX is dopt's interchange format: graph facts, QDQ rewriting and ORT checks.

Imports ``onnx``/``onnxruntime`` lazily so the core stays framework-free.
The QDQ form places QuantizeLinear/DequantizeLinear on each quantized node's
input, int8 per-channel weights and int32 bias behind DequantizeLinear — the
same arithmetic as ``dopt.quant.numerics``, runnable on ONNX Runtime and other stacks.
"""
from __future__ import annotations

import numpy as np

from ..quant import numerics as nm
from .param_file import ONNX_OP_TYPES
from ..errors import DoptError, MissingExtraError

QDQ_MIN_OPSET = 13
MAX_MODEL_BYTES = 2 << 30


def require_onnx(purpose: str = "Reading ONNX models"):
    """The ``onnx`` module, or a MissingExtraError naming what needed it."""
    try:
        import onnx
    except ImportError:
        raise MissingExtraError("onnx", "onnx", purpose) from None
    return onnx


def load_model(path, *, field: str = "--model", purpose: str = "Reading ONNX models"):
    """A user's ``.onnx`` file: size-bounded, parsed without external data, errors in one line."""
    from .fileio import existing_file
    p = existing_file(path, field=field, max_bytes=MAX_MODEL_BYTES, what="model file")
    onnx = require_onnx(purpose)
    try:
        m = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise DoptError(f"the model file is not a readable ONNX model ({e.__class__.__name__})",
                        file=str(path), field=field,
                        hint="pass an .onnx file written by an ONNX exporter") from None
    if any(i.data_location == onnx.TensorProto.EXTERNAL for i in m.graph.initializer):
        raise DoptError("the model keeps its weights in external data files", file=str(path),
                        field=field, hint="save it as one file: onnx.save(model, path, "
                        "save_as_external_data=False)")
    return m


def _onnx():
    onnx = require_onnx("Writing ONNX models")
    from onnx import numpy_helper
    return onnx, numpy_helper


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingExtraError("onnxruntime", "onnx", "Checking ONNX models") from None
    return ort


def weight_axis(node) -> int:
    """Axis of the output channels in the node's weight tensor."""
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return 1
    if node.op_type == "ConvTranspose":
        return 1
    return 0


def graph_layers(model) -> dict[str, dict]:
    """``{node name: {"op_type", "weight", "weight_shape"}}`` for nodes with a constant weight."""
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type in ONNX_OP_TYPES and len(n.input) > 1 \
                and n.input[1] in inits:
            dims = list(inits[n.input[1]].dims)
            ax = weight_axis(n)
            shape = [dims[ax]] + [d for i, d in enumerate(dims) if i != ax]
            out[n.name] = {"op_type": n.op_type, "weight": n.input[1], "weight_shape": shape}
    return out


def build_qdq(model, params: dict):
    """Return a copy of float ONNX ``model`` with the records of ``params`` applied as QDQ."""
    onnx, nh = _onnx()
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    opset = next((o for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset.version < QDQ_MIN_OPSET:
        raise DoptError("the model's opset is too old for per-channel QDQ",
                        expected=f"opset >= {QDQ_MIN_OPSET}",
                        found=str(opset.version if opset else None))
    inits = {i.name: i for i in m.graph.initializer}
    nodes = {n.name: n for n in m.graph.node}
    new_nodes: dict[str, list] = {}
    new_inits = []
    replaced: set[str] = set()

    def const(name, arr):
        new_inits.append(nh.from_array(np.asarray(arr), name))
        return name

    for node_name, rec in params["layers"].items():
        node = nodes.get(node_name)
        if node is None:
            raise DoptError(f"parameter record for node '{node_name}' has no node in the model",
                            field=f"layers.{node_name}")
        s_d = np.float32(rec["input"]["scale"])
        o_d = int(rec["input"]["offset"])
        w_scales = np.asarray(rec["weight"]["scales"], dtype=np.float32)
        x = node.input[0]
        pre = []
        sc = const(f"{node_name}.input_scale", s_d)
        zp = const(f"{node_name}.input_zero_point", np.int8(o_d))
        pre.append(helper.make_node("QuantizeLinear", [x, sc, zp], [f"{node_name}.input_q"],
                                    name=f"{node_name}.input_Quantize"))
        pre.append(helper.make_node("DequantizeLinear", [f"{node_name}.input_q", sc, zp],
                                    [f"{node_name}.input_dq"],
                                    name=f"{node_name}.input_Dequantize"))
        node.input[0] = f"{node_name}.input_dq"
        # weight and bias: the DequantizeLinear output keeps the float tensor's name, so
        # the parameter file's tensor names hold in the QDQ model and after QDQ stripping
        w_name = node.input[1]
        if w_name in replaced:
            raise DoptError(f"weight '{w_name}' is shared by several quantized nodes",
                            field=f"layers.{node_name}",
                            hint="give each layer its own weight tensor or leave one float")
        w = nh.to_array(inits[w_name]).astype(np.float32)
        ax = weight_axis(node)
        wq = nm.quantize_weight(np.moveaxis(w, ax, 0), w_scales, axis=0)
        wq = np.moveaxis(wq, 0, ax)
        const(f"{w_name}.quantized", wq)
        const(f"{w_name}.scale", w_scales)
        const(f"{w_name}.zero_point", np.zeros(len(w_scales), np.int8))
        pre.append(helper.make_node("DequantizeLinear",
                                    [f"{w_name}.quantized", f"{w_name}.scale",
                                     f"{w_name}.zero_point"], [w_name], axis=ax,
                                    name=f"{node_name}.weight_Dequantize"))
        replaced.add(w_name)
        if len(node.input) > 2 and node.input[2] and node.op_type in ("Conv", "Gemm"):
            b_name = node.input[2]
            b = nh.to_array(inits[b_name]).astype(np.float32)
            if b.ndim == 1 and b.shape[0] == len(w_scales) and b_name not in replaced:
                const(f"{b_name}.quantized", nm.quantize_bias(b, s_d, w_scales))
                const(f"{b_name}.scale", nm.bias_scales(s_d, w_scales))
                const(f"{b_name}.zero_point", np.zeros(len(w_scales), np.int32))
                pre.append(helper.make_node("DequantizeLinear",
                                            [f"{b_name}.quantized", f"{b_name}.scale",
                                             f"{b_name}.zero_point"], [b_name], axis=0,
                                            name=f"{node_name}.bias_Dequantize"))
                replaced.add(b_name)
        new_nodes[node_name] = pre
    ordered = []
    for n in m.graph.node:
        ordered.extend(new_nodes.get(n.name, []))
        ordered.append(n)
    del m.graph.node[:]
    m.graph.node.extend(ordered)
    m.graph.initializer.extend(new_inits)
    # drop float weights/biases that no node reads any more
    used = {i for n in m.graph.node for i in n.input}
    keep = [i for i in m.graph.initializer if i.name in used and i.name not in replaced]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    graph_in = [i for i in m.graph.input if i.name not in replaced]
    del m.graph.input[:]
    m.graph.input.extend(graph_in)
    onnx.checker.check_model(m)
    return m


LAYER_CUT_STEPS = 8   # how far back the cut of a quantized layer may move (Pad, Clip...)


def layer_models(qdq_model, layers, feeds: dict):
    """``model_for(layer, in_shape) -> (model, input name)``: for a quantized layer of
    ``layers`` (a node of ``qdq_model`` whose first input is a ``DequantizeLinear`` of a
    ``QuantizeLinear``), the part of the graph that computes its output from the float
    tensor its input quantization reads.

    ``in_shape``: the layer's input shape as the framework sees it; where the quantized
    tensor has another shape (a ``Pad`` a convolution adds in its own forward, quantized
    after it in the graph), the cut moves back through first inputs, at most
    ``LAYER_CUT_STEPS``, to the tensor whose shape, as one run on ``feeds`` gives it,
    matches. Used to compare the export layer by layer: compared end to end, a rounding tie
    resolved differently in one layer spreads through every later one, and a deep network
    fails a tolerance that a wrong scale would fail the same way.
    """
    onnx, _ = _onnx()
    from onnx import helper
    from onnx.utils import Extractor
    layers = set(layers)
    producer = {o: n for n in qdq_model.graph.node for o in n.output}
    consts = {i.name for i in qdq_model.graph.initializer}

    def data_input(t):  # the first input carries the data (Pad, Clip, Reshape, Cast...)
        p = producer.get(t)
        if p is None or not p.input or p.input[0] in consts \
                or p.op_type in ("QuantizeLinear", "DequantizeLinear"):
            return None
        return p.input[0]

    chains = {}
    for node in qdq_model.graph.node:
        if node.name not in layers:
            continue
        dq = producer.get(node.input[0])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" \
            else None
        if q is None or q.op_type != "QuantizeLinear":
            raise DoptError(f"layer '{node.name}' has no input quantization in the QDQ model",
                            field=node.name, hint="its parameter record was not applied")
        chain, t = [], q.input[0]
        while t is not None and t not in chain and len(chain) < LAYER_CUT_STEPS:
            chain.append(t)
            t = data_input(t)
        chains[node.name] = (chain, node.output[0])
    # the real shapes of the candidate cuts, from one run
    probe = onnx.ModelProto()
    probe.CopyFrom(qdq_model)
    have = {o.name for o in probe.graph.output} | set(feeds)
    for t in dict.fromkeys(t for c, _ in chains.values() for t in c if t not in have):
        probe.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    sess = ort_session(probe.SerializeToString())
    names = [o.name for o in sess.get_outputs()]
    shapes = {n: v.shape for n, v in zip(names, sess.run(None, feeds))}
    shapes.update({k: np.asarray(v).shape for k, v in feeds.items()})
    m = onnx.shape_inference.infer_shapes(qdq_model)
    known = {vi.name for vi in list(m.graph.value_info) + list(m.graph.input)
             + list(m.graph.output)}
    for t in {t for c, y in chains.values() for t in c + [y]} - known:  # the extractor
        m.graph.value_info.append(                                       # needs a type
            helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    ex = Extractor(m)

    def model_for(layer: str, in_shape) -> tuple:
        chain, y = chains[layer]
        cut = next((t for t in chain if shapes.get(t) == tuple(in_shape)), chain[0])
        return ex.extract_model([cut], [y]), cut
    return model_for


def ort_session(path_or_bytes, *, optimize: bool = False, threads: int = 0):
    """A CPU ONNX Runtime session; graph optimizations off unless asked (exact QDQ semantics).

    ``threads``: intra-op threads, 0 for ONNX Runtime's default.
    """
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])



_NO_ROUNDING = ("QuantizeLinear", "DequantizeLinear", "Shape", "Size", "Constant")


def _bn_as_scale_shift(m) -> tuple[set[str], set[str]]:
    """Rewrite each inference BatchNormalization as ``x * k + shift`` with ``k = gamma /
    sqrt(var + eps)`` and ``shift = beta - mean * k`` computed in float32, as the compiler
    folds it: its statistics are never NPU values (a running variance of 1e7 is fine there;
    rounded to FP16 on its own it is inf). Behind a Conv whose only reader it is, the BN is
    part of the convolution's kernel (``dopt.npu.lower`` fuses it): the convolution's output
    and ``x * k`` are not rounded and ``k``, ``shift`` stay float32, as in the compiler's
    float32 folding. Returns (tensors not to round, initializers not to round)."""
    if not any(n.op_type == "BatchNormalization" for n in m.graph.node):
        return set(), set()
    onnx, numpy_helper = _onnx()
    from onnx import helper
    inits = {i.name: i for i in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in m.graph.node:
        for t in n.input:
            readers[t] = readers.get(t, 0) + 1
    outputs = {o.name for o in m.graph.output}
    rank = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in
            list(onnx.shape_inference.infer_shapes(m).graph.value_info) + list(m.graph.input)
            if vi.type.tensor_type.HasField("shape")}
    unrounded: set[str] = set()
    keep: set[str] = set()
    new_nodes, new_inits = [], []
    for n in m.graph.node:
        if (n.op_type != "BatchNormalization" or len(n.input) < 5
                or len([o for o in n.output if o]) != 1
                or not all(t in inits for t in n.input[1:5])):
            new_nodes.append(n)
            continue
        kk, shift = nm.bn_scale_shift(*(numpy_helper.to_array(inits[t]) for t in n.input[1:5]),
                                      next((a.f for a in n.attribute if a.name == "epsilon"),
                                           1e-5))
        src = producer.get(n.input[0])
        fused = (src is not None and src.op_type == "Conv" and readers.get(n.input[0]) == 1
                 and n.input[0] not in outputs)
        bshape = (kk.size,) + (1,) * max(rank.get(n.input[0], 4) - 2, 0)
        kn, sn, mid = f"{n.name}/k", f"{n.name}/shift", f"{n.output[0]}/scaled"
        new_inits += [numpy_helper.from_array(kk.reshape(bshape), kn),
                      numpy_helper.from_array(shift.reshape(bshape), sn)]
        new_nodes += [helper.make_node("Mul", [n.input[0], kn], [mid], name=f"{n.name}/mul"),
                      helper.make_node("Add", [mid, sn], [n.output[0]], name=f"{n.name}/add")]
        unrounded.add(mid)
        if fused:
            unrounded.add(n.input[0])
            keep.update((kn, sn))
    if new_inits:
        del m.graph.node[:]
        m.graph.node.extend(new_nodes)
        used = {t for n in m.graph.node for t in n.input}
        kept = [i for i in m.graph.initializer if i.name in used]
        del m.graph.initializer[:]
        m.graph.initializer.extend(kept + new_inits)
    return unrounded, keep


def with_npu_data_types(model):
    """The QDQ model as the NPU computes it: graph inputs, float weights (of the layers left
    float) and the output of every float op rounded to FP16 (a Cast pair), the Q/DQ pairs
    and their scales left alone. A QDQ file is float32 between its Q/DQ pairs, where the NPU
    computes in FP16; on networks whose top-two logits sit close (squashed by sigmoid or
    tanh) that alone moves top-1 on 0.2-1.2 % of the samples, so this is the form that
    predicts the compiled model (``dopt deploy``'s simulated build, the fidelity tests).
    Integer outputs (shapes, indices) are left as they are."""
    onnx, numpy_helper = _onnx()
    from onnx import TensorProto, helper
    m = onnx.ModelProto()
    m.CopyFrom(model)
    unrounded, keep_f32 = _bn_as_scale_shift(m)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             list(onnx.shape_inference.infer_shapes(m).graph.value_info) + list(m.graph.output)
             + list(m.graph.input)}
    inits = {i.name for i in m.graph.initializer}
    nodes, k = [], 0

    def rounded(src, dst):
        nonlocal k
        k += 1
        return [helper.make_node("Cast", [src], [f"{dst}/h{k}"], to=TensorProto.FLOAT16),
                helper.make_node("Cast", [f"{dst}/h{k}"], [dst], to=TensorProto.FLOAT)]
    renamed = {}
    for i in m.graph.input:
        if i.name not in inits and i.type.tensor_type.elem_type == TensorProto.FLOAT:
            renamed[i.name] = f"{i.name}/f16"
            nodes += rounded(i.name, renamed[i.name])
    for n in m.graph.node:
        for j, t in enumerate(n.input):
            if t in renamed:
                n.input[j] = renamed[t]
        outs = [t for t in n.output if t and types.get(t) == TensorProto.FLOAT
                and t not in unrounded]
        if n.op_type in _NO_ROUNDING or not outs:
            nodes.append(n)
            continue
        for j, t in enumerate(n.output):
            if t in outs:
                n.output[j] = f"{t}/f32"
        nodes.append(n)
        for t in outs:
            nodes += rounded(f"{t}/f32", t)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    qdq_inputs = {t for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                  for t in n.input}
    for i, init in enumerate(m.graph.initializer):
        if (init.data_type == TensorProto.FLOAT and init.name not in qdq_inputs
                and init.name not in keep_f32):
            a = numpy_helper.to_array(init)
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(
                a.astype(np.float16).astype(np.float32), init.name))
    return m
