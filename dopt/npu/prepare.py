"""Bring a user's ONNX model into the one form the compiler lowers.

Old opsets are converted to ``TARGET_OPSET`` (so every later stage knows one set of
operator semantics), ``--input_shape`` fixes the input dims, ``--out_nodes`` cuts
the graph, ``Constant`` nodes and nodes whose inputs are all constants are folded
into initializers, activations spelled out op by op become one operator
(``activations.py``) and an exporter's cancelling Transpose pairs leave
(``transposes.py``). Shape computations on activations are kept: they make the compiled
graph independent of the batch size, which the emulator uses to evaluate many samples in
one call.
"""
from __future__ import annotations

from ..errors import DoptError
from ..formats.qdq import require_onnx
from .activations import fuse_hard_activations
from .transposes import cancel_transposes

TARGET_OPSET = 17
MIN_OPSET = 7
MAX_OPSET = 21
IR_VERSION = 8
MAX_FOLD_ELEMENTS = 1 << 24  # never materialise a huge folded constant


def model_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def convert_opset(model, file=None, *, copy: bool = True):
    """``model`` at ``TARGET_OPSET``; a copy unless ``copy=False`` (the caller hands the
    model over: a copy costs the model's size)."""
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
    if copy and v == TARGET_OPSET:   # the converter returned a new model already
        m = onnx.ModelProto()
        m.CopyFrom(model)
    else:
        m = model
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
    # in place: dropping and re-adding every initializer would copy all the weights
    present = set()
    for i in reversed(range(len(model.graph.initializer))):
        name = model.graph.initializer[i].name
        if name in used and name not in present:
            present.add(name)
        else:
            del model.graph.initializer[i]
    model.graph.initializer.extend(v for k, v in inits.items() if k in used and k not in present)
    graph_in = [i for i in model.graph.input if i.name not in inits or i.name in used]
    del model.graph.input[:]
    model.graph.input.extend(graph_in)


def _fold_constant_dequantize(model) -> None:
    """DequantizeLinear on constant tensors -> float initializers: ``(q - zp) * scale`` in
    float32 along ``axis``, exactly as the operator defines it. Done here rather than by
    ``fold_constants``: onnx's reference evaluator has no DequantizeLinear below opset 19."""
    import numpy as np
    from onnx import TensorProto, numpy_helper
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
            val = q.astype(np.float32)   # (q - zp) * s in float32, in place: one full copy
            del q
            val -= zp.astype(np.float32)
            val *= s
            t = model.graph.initializer.add()   # filled in place: append would copy it
            t.name, t.data_type = n.output[0], TensorProto.FLOAT
            t.dims.extend(val.shape)
            t.raw_data = val.tobytes()
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


SKELETON_KEEP = 1024   # initializers up to this many elements keep their data in a skeleton


def skeleton(model):
    """``model`` without the data of its large initializers (weights): the same nodes,
    inputs, outputs, value_info and initializer names, types and dims. Shape inference and
    lowering read only that (small initializers such as Reshape targets, Resize scales and
    Pad values keep their data), and a copy of the structure costs kilobytes where a copy of
    the model costs its size; ``onnx.shape_inference`` on the whole model serializes it and
    parses the result back, about three times the weights at once."""
    onnx = require_onnx("Compiling ONNX models")
    s = onnx.ModelProto()
    s.ir_version = model.ir_version
    s.opset_import.extend(model.opset_import)
    s.functions.extend(model.functions)
    src, g = model.graph, s.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.sparse_initializer.extend(src.sparse_initializer)
    for t in src.initializer:
        n = 1
        for d in t.dims:
            n *= d
        if n <= SKELETON_KEEP:
            g.initializer.append(t)
        else:
            p = g.initializer.add()
            p.name, p.data_type = t.name, t.data_type
            p.dims.extend(t.dims)
    return s


def take_weights(model) -> tuple:
    """``(skeleton, weights)``: ``skeleton(model)`` and the data of its large initializers
    as arrays by name. The compiler then drops ``model``: every later stage reads the
    weights from these arrays, so they are held once. (Protobuf bytes cannot be read in
    place from Python, and a message's memory is freed only with the whole message:
    clearing the fields would free nothing.)"""
    import numpy as np
    weights = {t.name: initializer_array(t) for t in model.graph.initializer
               if int(np.prod(t.dims, dtype=np.int64)) > SKELETON_KEEP}
    return skeleton(model), weights


def initializer_array(t, weights: dict | None = None):
    """The data of initializer ``t``: from ``weights`` when ``take_weights`` moved it there."""
    if weights and t.name in weights:
        return weights[t.name]
    from onnx import numpy_helper
    return numpy_helper.to_array(t)


def weights_as_inputs(skel, model, weights: dict | None = None) -> dict:
    """Turn the weight placeholders of ``skel`` (``prepare.skeleton`` of ``model``) into
    graph inputs and return their arrays, to be fed with the data: ONNX Runtime reads fed
    arrays where they are, while a serialized model (or external initializers) it copies,
    which held the weights three more times."""
    import numpy as np
    from onnx import helper
    full = {i.name: i for i in model.graph.initializer}
    arrays, keep = {}, []
    for p in skel.graph.initializer:
        src = full.get(p.name)
        if src is None or int(np.prod(p.dims, dtype=np.int64)) <= SKELETON_KEEP:
            keep.append(p)   # kept with its data by the skeleton
            continue
        arrays[p.name] = initializer_array(src, weights)
        skel.graph.input.append(helper.make_tensor_value_info(p.name, p.data_type,
                                                              list(p.dims)))
    if arrays:
        kept = [type(p)() for p in keep]
        for k, p in zip(kept, keep):
            k.CopyFrom(p)
        del skel.graph.initializer[:]
        skel.graph.initializer.extend(kept)
    return arrays


def inferred_skeleton(model, **options):
    """``onnx.shape_inference.infer_shapes`` run on ``skeleton(model)``."""
    onnx = require_onnx("Compiling ONNX models")
    return onnx.shape_inference.infer_shapes(skeleton(model), **options)


def infer_shapes(model, file=None):
    """Shapes and types of every tensor, written into ``model`` (in place; returned)."""
    try:
        inferred = inferred_skeleton(model, strict_mode=True, data_prop=True)
    except Exception as e:  # noqa: BLE001
        raise DoptError(f"shape inference failed: {str(e).splitlines()[0][:300]}", file=file,
                        hint="check --input_shape and that the model is valid (onnx.checker)") \
            from None
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    for o, io in zip(model.graph.output, inferred.graph.output):
        o.type.CopyFrom(io.type)
    return model


def name_nodes(model) -> None:
    """Unnamed nodes get stable names, unique across the graph."""
    seen = set()
    for i, n in enumerate(model.graph.node):
        name = n.name or f"{n.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        n.name = name
        seen.add(name)


def prepare(model, *, input_shapes=None, out_nodes=None, file=None, consume: bool = False,
            changes: dict | None = None):
    """The prepared model; ``consume=True`` works on ``model`` itself instead of a copy.
    ``changes``, when given, receives how many nodes each graph rewrite changed (for the
    pre-check report: a user sees what the compiler did to the graph)."""
    for n in model.graph.node:
        if any(a.type in (5, 10) for a in n.attribute):  # GRAPH / GRAPHS attributes
            raise DoptError(f"node '{n.name}' ({n.op_type}) holds a subgraph: control flow is not "
                            f"supported by the emulated NPU", file=file, field=n.name,
                            hint="export the model without If/Loop/Scan (e.g. trace it)")
    m = convert_opset(model, file, copy=not consume)
    name_nodes(m)
    if input_shapes:
        set_input_shapes(m, input_shapes, file)
    else:
        set_input_shapes(m, {}, file)
    if out_nodes:
        cut_outputs(m, out_nodes, file)
    done = {"qdq_pairs_removed": strip_qdq(m), "sums_to_adds": sums_to_adds(m),
            "inference_noops_removed": remove_inference_noops(m, file)}
    fold_constants(m)
    done["shape_nodes_folded"] = fold_shapes(m)
    done["hard_activations_formed"] = fuse_hard_activations(m)
    done["transposes_cancelled"] = cancel_transposes(m)
    free_batch_reshapes(m)
    if changes is not None:
        changes.update(done)
    return infer_shapes(m, file)


def remove_inference_noops(model, file=None) -> int:
    """Drop what only training uses: Dropout (every opset form) and Identity pass their input
    through, training-only outputs (Dropout masks, BatchNormalization's running statistics)
    leave the graph. Returns the number of nodes removed."""
    from onnx import helper
    outputs = {o.name for o in model.graph.output}
    consumers: dict[str, int] = {}
    for n in model.graph.node:
        for x in n.input:
            consumers[x] = consumers.get(x, 0) + 1
    rename: dict[str, str] = {}
    kept, removed = [], 0
    for n in model.graph.node:
        if n.op_type == "BatchNormalization" and len(n.output) > 1:
            extra = [t for t in n.output[1:] if t and (consumers.get(t) or t in outputs)]
            if any(consumers.get(t) for t in extra):
                raise DoptError(f"node '{n.name}' (BatchNormalization) feeds its running "
                                f"statistics to other nodes: a training graph", file=file,
                                field=n.name, hint="export the model in eval mode")
            del n.output[1:]
        if n.op_type not in ("Dropout", "Identity") or n.domain not in ("", "ai.onnx"):
            kept.append(n)
            continue
        if n.op_type == "Dropout" and len(n.output) > 1 and consumers.get(n.output[1]):
            raise DoptError(f"node '{n.name}' (Dropout) feeds its mask to other nodes: a "
                            f"training graph", file=file, field=n.name,
                            hint="export the model in eval mode (model.eval() before export)")
        src, out = n.input[0], n.output[0]
        while src in rename:                      # chains of no-ops, bounded by the node count
            src = rename[src]
        if out in outputs:
            kept.append(helper.make_node("Identity", [src], [out], name=n.name))
        else:
            rename[out] = src
        removed += 1
    if rename:
        for n in kept:
            for i, x in enumerate(n.input):
                if x in rename:
                    n.input[i] = rename[x]
    training_outputs = {t for n in model.graph.node if n.op_type == "Dropout"
                        for t in list(n.output)[1:]}
    keep_out = [o for o in model.graph.output if o.name not in training_outputs]
    del model.graph.output[:]
    model.graph.output.extend(keep_out)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return removed


def fold_shapes(model, max_rounds: int | None = None) -> int:
    """Shape/Size of tensors whose shape is fully known become constants, and what they feed
    is folded with them: a compiled model has static shapes, so shape arithmetic (torch's
    ``x.view(x.size(0), ...)``, channel shuffles, attention reshapes) leaves the graph instead
    of running on the CPU. Bounded: one round per folded node at most."""
    from onnx import numpy_helper
    import numpy as np
    rounds = max_rounds or len(model.graph.node) + 1
    total = 0
    for _ in range(rounds):
        try:
            inferred = inferred_skeleton(model, data_prop=True)
        except Exception:  # noqa: BLE001 - no shapes, nothing to fold
            return total
        dims = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + \
                list(inferred.graph.output):
            t = vi.type.tensor_type
            if t.HasField("shape") and all(d.HasField("dim_value") and d.dim_value >= 0
                                           for d in t.shape.dim):
                dims[vi.name] = [d.dim_value for d in t.shape.dim]
        for i in model.graph.initializer:
            dims.setdefault(i.name, list(i.dims))
        folded = 0
        kept = []
        for n in model.graph.node:
            if n.op_type in ("Shape", "Size") and n.domain in ("", "ai.onnx") and \
                    n.input[0] in dims:
                d = dims[n.input[0]]
                if n.op_type == "Size":
                    val = np.array(int(np.prod(d, dtype=np.int64)), np.int64)
                else:
                    start = next((a.i for a in n.attribute if a.name == "start"), 0)
                    end = next((a.i for a in n.attribute if a.name == "end"), None)
                    val = np.array(d[slice(start, end)], np.int64)
                model.graph.initializer.append(numpy_helper.from_array(val, n.output[0]))
                folded += 1
                continue
            kept.append(n)
        if not folded:
            return total
        del model.graph.node[:]
        model.graph.node.extend(kept)
        fold_constants(model)
        total += folded
    return total


def free_batch_reshapes(model) -> int:
    """A Reshape whose constant target starts with 1 (or -1) where both its input and its
    output have batch 1 copies the batch instead (target[0] = 0): shapes were folded at
    batch 1, and the compiled single-sample model still runs N samples at once."""
    from onnx import numpy_helper
    try:
        inferred = inferred_skeleton(model)
    except Exception:  # noqa: BLE001
        return 0
    dim0 = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + \
            list(inferred.graph.output):
        d = vi.type.tensor_type.shape.dim
        if d and d[0].HasField("dim_value"):
            dim0[vi.name] = d[0].dim_value
    inits = {i.name: i for i in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for x in n.input:
            uses[x] = uses.get(x, 0) + 1
    changed = 0
    for n in model.graph.node:
        if n.op_type != "Reshape" or len(n.input) < 2 or n.input[1] not in inits:
            continue
        if any(a.name == "allowzero" and a.i for a in n.attribute):
            continue
        target = numpy_helper.to_array(inits[n.input[1]]).copy()
        if target.ndim != 1 or not len(target) or target[0] not in (1, -1):
            continue
        if dim0.get(n.input[0]) != 1 or dim0.get(n.output[0]) != 1:
            continue
        target[0] = 0
        name = n.input[1] if uses[n.input[1]] == 1 else f"{n.input[1]}/{n.name}/batch"
        t = numpy_helper.from_array(target, name)
        if name in inits:
            inits[name].CopyFrom(t)
        else:
            model.graph.initializer.append(t)
            inits[name] = model.graph.initializer[-1]
            n.input[1] = name
        changed += 1
    return changed


def sums_to_adds(model) -> int:
    """``Sum`` (old exporters' residual add) becomes a chain of ``Add``: the NPU's Eltwise.

    A one-input Sum is an Identity (removed with the other no-ops)."""
    from onnx import helper
    kept, changed = [], 0
    for n in model.graph.node:
        if n.op_type != "Sum" or n.domain not in ("", "ai.onnx"):
            kept.append(n)
            continue
        ins = [x for x in n.input if x]
        if len(ins) == 1:
            kept.append(helper.make_node("Identity", ins, [n.output[0]], name=n.name))
        else:
            acc = ins[0]
            for i, x in enumerate(ins[1:], 1):
                out = n.output[0] if i == len(ins) - 1 else f"{n.output[0]}/sum{i}"
                kept.append(helper.make_node("Add", [acc, x], [out],
                                             name=n.name if i == len(ins) - 1
                                             else f"{n.name}/sum{i}"))
                acc = out
        changed += 1
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return changed
