"""Bring a user's ONNX model into the one form the compiler lowers.

Old opsets are converted to ``TARGET_OPSET`` (so every later stage knows one set of
operator semantics), ``--input_shape`` fixes the input dims, ``--out_nodes`` cuts
the graph, ``Constant`` nodes and nodes whose inputs are all constants are folded
into initializers. Shape computations on activations are kept: they make the compiled
graph independent of the batch size, which the emulator uses to evaluate many
samples in one call.
"""
from __future__ import annotations

from ..errors import DoptError
from ..formats.qdq import require_onnx

TARGET_OPSET = 17
MIN_OPSET = 7
MAX_OPSET = 21
IR_VERSION = 8
MAX_FOLD_ELEMENTS = 1 << 24  # never materialise a huge folded constant


def model_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def convert_opset(model, file=None):
    onnx = require_onnx("Compiling ONNX models")
    v = model_opset(model)
    if not MIN_OPSET <= v <= MAX_OPSET:
        raise DoptError(f"the model uses ONNX opset {v}", file=file, field="opset_import",
                        expected=f"opset {MIN_OPSET}..{MAX_OPSET}",
                        hint=f"re-export the model with an opset in {MIN_OPSET}..{MAX_OPSET}")
    if v != TARGET_OPSET:
        from onnx import version_converter
        try:
            model = version_converter.convert_version(model, TARGET_OPSET)
        except Exception as e:  # noqa: BLE001 - the converter raises many types
            raise DoptError(f"the model (opset {v}) cannot be converted to opset {TARGET_OPSET} "
                            f"({e.__class__.__name__}: {str(e)[:200]})", file=file,
                            field="opset_import",
                            hint=f"re-export the model with opset {TARGET_OPSET}") from None
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.ir_version = min(m.ir_version, IR_VERSION) if m.ir_version else IR_VERSION
    return m


def set_input_shapes(model, shapes: dict, file=None) -> None:
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    for name, dims in shapes.items():
        vi = next((i for i in model.graph.input if i.name == name and name not in inits), None)
        if vi is None:
            raise DoptError(f"--input_shape names input '{name}', which the model does not have",
                            file=file, field="--input_shape",
                            expected="one of: " + ", ".join(names),
                            hint="use the ONNX graph input names")
        shp = vi.type.tensor_type.shape
        if len(shp.dim) != len(dims):
            raise DoptError(f"--input_shape gives {len(dims)} dims for input '{name}'", file=file,
                            field="--input_shape", expected=f"{len(shp.dim)} dims",
                            found=",".join(map(str, dims)))
        for i, (d, v) in enumerate(zip(shp.dim, dims)):
            if d.HasField("dim_value") and d.dim_value > 0 and v > 0 and d.dim_value != v:
                raise DoptError(f"--input_shape sets dim {i} of input '{name}' to {v}, but the "
                                f"model fixes it to {d.dim_value}", file=file,
                                field="--input_shape", expected=str(d.dim_value), found=str(v),
                                hint="only dims the model leaves free may be set")
            if v > 0:
                d.ClearField("dim_param")
                d.dim_value = v
            else:
                d.ClearField("dim_value")
                d.dim_param = f"{name}_d{i}"
    for vi in model.graph.input:
        if vi.name in inits or vi.name in shapes:
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and (not dims[0].HasField("dim_value") or dims[0].dim_value <= 0):
            dims[0].ClearField("dim_param")
            dims[0].dim_value = 1  # a free batch compiles as batch 1, as the device runs it
        if any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims[1:]):
            raise DoptError(f"input '{vi.name}' has free dimensions besides the batch", file=file,
                            field="--input_shape",
                            hint=f"give its shape: --input_shape \"{vi.name}:n,c,h,w\"")


def cut_outputs(model, out_nodes: str, file=None) -> None:
    """``--out_nodes``: ONNX tensor names, or ``node:index``, separated by ';'."""
    produced = {}
    for n in model.graph.node:
        for i, t in enumerate(n.output):
            if t:
                produced[t] = (n, i)
    by_node = {n.name: n for n in model.graph.node if n.name}
    wanted = []
    for item in [s.strip() for s in out_nodes.split(";")]:
        if not item:
            raise DoptError("--out_nodes has an empty entry", field="--out_nodes",
                            found=repr(out_nodes), expected="'tensor1;tensor2' or 'node:0;node:1'")
        if item in produced:
            wanted.append(item)
            continue
        name, _, idx = item.rpartition(":")
        node = by_node.get(name) if idx.isdigit() else by_node.get(item)
        k = int(idx) if idx.isdigit() and name else 0
        if node is None or k >= len(node.output):
            raise DoptError(f"--out_nodes names '{item}', which is neither a tensor nor a "
                            f"node output of the model", field="--out_nodes",
                            expected="ONNX tensor names or node_name:index",
                            hint="list the tensor names with 'dopt omg --mode 1 --framework 5 "
                                 "--model ... --json ...'")
        wanted.append(node.output[k])
    from onnx import helper
    keep = set(wanted)
    needed_nodes = []
    for n in reversed(model.graph.node):
        if keep.intersection(n.output):
            needed_nodes.append(n)
            keep.update(x for x in n.input if x)
    needed_nodes.reverse()
    del model.graph.node[:]
    model.graph.node.extend(needed_nodes)
    del model.graph.output[:]
    model.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in wanted)
    used = {x for n in needed_nodes for x in n.input}
    kept_inits = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept_inits)


def fold_constants(model) -> None:
    """Constant nodes -> initializers; evaluate nodes whose inputs are all constants."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator
    inits = {i.name: i for i in model.graph.initializer}
    kept = []
    for n in model.graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            node_model = helper.make_model(helper.make_graph(
                [n], "c", [], [helper.make_empty_tensor_value_info(n.output[0])]),
                opset_imports=list(model.opset_import), ir_version=IR_VERSION)
            val = ReferenceEvaluator(node_model).run(None, {})[0]
            inits[n.output[0]] = numpy_helper.from_array(val, n.output[0])
            continue
        real_inputs = [x for x in n.input if x]
        if (real_inputs and all(x in inits for x in real_inputs) and n.domain in ("", "ai.onnx")
                and n.op_type not in ("RandomNormal", "RandomUniform", "RandomNormalLike",
                                      "RandomUniformLike", "Multinomial")
                and sum(_numel(inits[x]) for x in real_inputs) <= MAX_FOLD_ELEMENTS):
            node_model = helper.make_model(helper.make_graph(
                [n], "f", [], [helper.make_empty_tensor_value_info(t) for t in n.output if t],
                [inits[x] for x in dict.fromkeys(real_inputs)]),
                opset_imports=list(model.opset_import), ir_version=IR_VERSION)
            try:
                vals = ReferenceEvaluator(node_model).run(None, {})
            except Exception:  # noqa: BLE001 - leave the node for the runtime to evaluate
                kept.append(n)
                continue
            for t, v in zip([t for t in n.output if t], vals):
                inits[t] = numpy_helper.from_array(v, t)
            continue
        kept.append(n)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    used = {x for n in kept for x in n.input} | {o.name for o in model.graph.output}
    del model.graph.initializer[:]
    model.graph.initializer.extend(v for k, v in inits.items() if k in used)
    graph_in = [i for i in model.graph.input if i.name not in inits or i.name in used]
    del model.graph.input[:]
    model.graph.input.extend(graph_in)


def _fold_constant_dequantize(model) -> None:
    """DequantizeLinear on constant tensors -> float initializers: ``(q - zp) * scale`` in
    float32 along ``axis``, exactly as the operator defines it. Done here rather than by
    ``fold_constants``: onnx's reference evaluator has no DequantizeLinear below opset 19."""
    import numpy as np
    from onnx import numpy_helper
    inits = {i.name: i for i in model.graph.initializer}
    kept = []
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx") and \
                all(x in inits for x in n.input if x):
            q = numpy_helper.to_array(inits[n.input[0]])
            s = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
            zp = (numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2]
                  else np.zeros_like(s, dtype=q.dtype))
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            if s.ndim == 1 and s.size > 1 and q.ndim:
                shape = [1] * q.ndim
                shape[axis % q.ndim] = -1
                s, zp = s.reshape(shape), zp.reshape(shape)
            val = ((q.astype(np.float32) - zp.astype(np.float32)) * s).astype(np.float32)
            model.graph.initializer.append(numpy_helper.from_array(val, n.output[0]))
            continue
        kept.append(n)
    del model.graph.node[:]
    model.graph.node.extend(kept)


def strip_qdq(model) -> int:
    """Remove QuantizeLinear -> DequantizeLinear pairs on activations; return how many.

    A QDQ model (``dopt_so``'s output, or another tool's) then reads as its float graph:
    the quantization itself comes from the parameter file, and DequantizeLinear nodes on
    constant weights fold back into float initializers (``fold_constants``).
    """
    from onnx import helper
    _fold_constant_dequantize(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    graph_outputs = {o.name for o in model.graph.output}
    rename, drop = {}, set()
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.domain not in ("", "ai.onnx"):
            continue
        q = producer.get(n.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        rename[n.output[0]] = q.input[0]
        drop.add(id(n))
    if not rename:
        return 0
    kept = []
    for n in model.graph.node:
        if id(n) in drop:
            continue
        for i, x in enumerate(n.input):
            n.input[i] = rename.get(x, x)
        kept.append(n)
    for out, src in rename.items():
        if out in graph_outputs:
            kept.append(helper.make_node("Identity", [src], [out], name=f"{out}_qdq_stripped"))
    used = {x for n in kept for x in n.input}
    kept = [n for n in kept if not (n.op_type == "QuantizeLinear" and
                                    not used.intersection(n.output) and
                                    not graph_outputs.intersection(n.output))]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return len(rename)


def _numel(t) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def infer_shapes(model, file=None):
    onnx = require_onnx("Compiling ONNX models")
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as e:  # noqa: BLE001
        raise DoptError(f"shape inference failed: {str(e).splitlines()[0][:300]}", file=file,
                        hint="check --input_shape and that the model is valid (onnx.checker)") \
            from None


def name_nodes(model) -> None:
    """Unnamed nodes get stable names, unique across the graph."""
    seen = set()
    for i, n in enumerate(model.graph.node):
        name = n.name or f"{n.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        n.name = name
        seen.add(name)


def prepare(model, *, input_shapes=None, out_nodes=None, file=None):
    for n in model.graph.node:
        if any(a.type in (5, 10) for a in n.attribute):  # GRAPH / GRAPHS attributes
            raise DoptError(f"node '{n.name}' ({n.op_type}) holds a subgraph: control flow is not "
                            f"supported by the emulated NPU", file=file, field=n.name,
                            hint="export the model without If/Loop/Scan (e.g. trace it)")
    m = convert_opset(model, file)
    name_nodes(m)
    if input_shapes:
        set_input_shapes(m, input_shapes, file)
    else:
        set_input_shapes(m, {}, file)
    if out_nodes:
        cut_outputs(m, out_nodes, file)
    strip_qdq(m)
    fold_constants(m)
    return infer_shapes(m, file)
