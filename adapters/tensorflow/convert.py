"""TensorFlow models to ONNX through tf2onnx, and TF names onto the converted graph.

Every TensorFlow input (a frozen ``.pb``, a SavedModel folder, a ``.keras`` file or a
live Keras model) is first reduced to one frozen inference ``GraphDef``; tf2onnx (the
maintained converter, version pinned in ``pyproject.toml``) turns that into ONNX, and
the rest of dopt works on ONNX. tf2onnx keeps TF op names for most nodes, but a
convolution fused with its BiasAdd / BatchNorm takes the name of the *last* fused op,
so :func:`onnx_node_map` follows each TF op's fusable consumer chain to find it.
"""
from __future__ import annotations

import difflib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dopt.errors import DoptError
from dopt.formats.param_file import ONNX_OP_TYPES, TF_OP_TYPES

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

OPSET = 17
MAX_PB_BYTES = (2 << 30) - 1  # protobuf's own limit for one message
# ops tf2onnx may fold into the preceding convolution / matmul (the fused node takes a name
# from this chain)
FUSABLE = ("BiasAdd", "Add", "AddV2", "Mul", "Sub", "FusedBatchNorm", "FusedBatchNormV3",
           "Identity")
SKIP_SINKS = ("Const", "NoOp", "Assert", "SaveV2", "RestoreV2", "VarHandleOp", "VariableV2",
              "Placeholder")


@dataclass
class FrozenGraph:
    """A frozen inference graph: weights are ``Const`` nodes, inputs are ``Placeholder``s."""

    graph_def: object
    inputs: list[str]                      # tensor names, e.g. "input:0"
    outputs: list[str]
    source: str | None = None
    shapes: dict[str, list] = field(default_factory=dict)  # placeholder dims (None = free)


def _tf():
    try:
        import tensorflow as tf
    except ImportError:
        from dopt.errors import MissingExtraError
        raise MissingExtraError("tensorflow", "tf", "TensorFlow models") from None
    # tf2onnx calls TF1 graph utilities that log deprecation notices on every run
    tf.get_logger().setLevel("ERROR")
    return tf


def tensor_name(name: str) -> str:
    """``'x'`` -> ``'x:0'``; ``'x:1'`` unchanged."""
    name = name.strip()
    return name if ":" in name and name.rsplit(":", 1)[1].isdigit() else name + ":0"


def op_name(name: str) -> str:
    name = name.strip().lstrip("^")
    if ":" in name and name.rsplit(":", 1)[1].isdigit():
        return name.rsplit(":", 1)[0]
    return name


def _placeholder_shapes(gd) -> dict[str, list]:
    out = {}
    for n in gd.node:
        if n.op == "Placeholder":
            shape = n.attr["shape"].shape if "shape" in n.attr else None
            if shape is None or shape.unknown_rank:
                out[n.name + ":0"] = None
            else:
                out[n.name + ":0"] = [d.size if d.size >= 0 else None for d in shape.dim]
    return out


def _sinks(gd) -> list[str]:
    used = {op_name(i) for n in gd.node for i in n.input}
    return [n.name + ":0" for n in gd.node if n.name not in used and n.op not in SKIP_SINKS]


def _freeze_function(fn, source) -> FrozenGraph:
    tf = _tf()
    from tensorflow.python.framework.convert_to_constants import \
        convert_variables_to_constants_v2
    frozen = convert_variables_to_constants_v2(fn)
    gd = frozen.graph.as_graph_def()
    inputs = [t.name for t in frozen.inputs if t.dtype != tf.resource]
    outputs = [t.name for t in frozen.outputs]
    return FrozenGraph(gd, inputs, outputs, source, _placeholder_shapes(gd))


def frozen_from_keras(model, batch=None, source=None) -> FrozenGraph:
    """The model's inference function (``training=False``) frozen; input names = Keras input
    names, batch dimension free unless ``batch`` is given."""
    tf = _tf()
    specs = []
    for i, t in enumerate(model.inputs):
        shape = list(t.shape)
        shape[0] = batch
        # the InputLayer's name (stable across save/load; a fresh tensor is 'keras_tensor_N')
        hist = getattr(t, "_keras_history", None)
        name = (getattr(hist[0], "name", None) if hist else None) or getattr(t, "name", None) \
            or f"input_{i}"
        specs.append(tf.TensorSpec(shape, tf.float32, name=op_name(name)))
    if len(specs) == 1:
        fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(specs[0])
    else:
        fn = tf.function(lambda *xs: model(list(xs), training=False)).get_concrete_function(
            *specs)
    return _freeze_function(fn, source)


def _read_pb(path: Path, field_name: str):
    tf = _tf()
    size = path.stat().st_size
    if size > MAX_PB_BYTES:
        raise DoptError("the frozen graph is larger than a protobuf message can be", file=str(path),
                        field=field_name, expected=f"at most {MAX_PB_BYTES} bytes",
                        found=f"{size} bytes")
    gd = tf.compat.v1.GraphDef()
    try:
        gd.ParseFromString(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise DoptError(f"the file is not a frozen TensorFlow GraphDef ({e.__class__.__name__})",
                        file=str(path), field=field_name,
                        hint="pass a frozen .pb (tf.compat.v1.graph_util."
                             "convert_variables_to_constants), a SavedModel folder or a "
                             ".keras file") from None
    if not gd.node:
        raise DoptError("the frozen graph has no nodes", file=str(path), field=field_name,
                        hint="pass a frozen .pb, a SavedModel folder or a .keras file")
    if any(n.op in ("VariableV2", "VarHandleOp") for n in gd.node):
        raise DoptError("the graph still holds variables (it is not frozen)", file=str(path),
                        field=field_name, hint="freeze it first (convert_variables_to_constants) "
                        "or pass the SavedModel folder")
    return FrozenGraph(gd, [], [], str(path), _placeholder_shapes(gd))


def _load_saved_model(path: Path, field_name: str) -> FrozenGraph:
    tf = _tf()
    try:
        loaded = tf.saved_model.load(str(path))
        fn = loaded.signatures["serving_default"]
    except KeyError:
        raise DoptError("the SavedModel has no 'serving_default' signature", file=str(path),
                        field=field_name, hint="export it with a serving signature "
                        "(model.export(path) for Keras)") from None
    except Exception as e:  # noqa: BLE001
        raise DoptError(f"the folder is not a loadable SavedModel ({e.__class__.__name__})",
                        file=str(path), field=field_name) from None
    return _freeze_function(fn, str(path))


def _load_keras(path: Path, field_name: str) -> FrozenGraph:
    _tf()
    import keras
    try:
        model = keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except Exception as e:  # noqa: BLE001
        raise DoptError(f"the .keras file cannot be loaded ({e.__class__.__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})", file=str(path),
                        field=field_name, hint="custom layers must be registered "
                        "(keras.saving.register_keras_serializable) and importable") from None
    return frozen_from_keras(model, source=str(path))


def load_frozen(path, *, field_name: str = "--model") -> FrozenGraph:
    """A ``.pb``, a SavedModel folder or a ``.keras`` file as a :class:`FrozenGraph`."""
    p = Path(path)
    if p.is_dir():
        if not (p / "saved_model.pb").is_file():
            raise DoptError("the folder is not a SavedModel (no saved_model.pb inside)",
                            file=str(p), field=field_name)
        return _load_saved_model(p, field_name)
    if not p.is_file():
        raise DoptError("the model file does not exist", file=str(p), field=field_name)
    if p.suffix.lower() == ".keras":
        return _load_keras(p, field_name)
    return _read_pb(p, field_name)


def select_io(frozen: FrozenGraph, input_shapes: dict | None, out_nodes) -> FrozenGraph:
    """Fix the inputs and outputs the user named, checking every name and dimension."""
    gd = frozen.graph_def
    nodes = {n.name: n for n in gd.node}
    src = frozen.source
    inputs = list(frozen.inputs) or list(frozen.shapes)
    shapes = dict(frozen.shapes)
    if input_shapes:
        chosen = []
        for name, dims in input_shapes.items():
            t = tensor_name(name)
            node = nodes.get(op_name(t))
            if node is None:
                close = difflib.get_close_matches(op_name(t), list(nodes), n=3)
                raise DoptError(f"--input_shape names '{name}', which is not a node of the graph",
                                file=src, field="--input_shape",
                                expected="one of the graph's inputs: "
                                + ", ".join(op_name(i) for i in inputs)
                                + (f" (close: {', '.join(close)})" if close else ""))
            want = shapes.get(t)
            if want is not None:
                if len(want) != len(dims) or any(w is not None and w != d
                                                 for w, d in zip(want, dims)):
                    raise DoptError(f"--input_shape gives {name} the shape "
                                    f"{','.join(map(str, dims))}, but the graph's input has "
                                    f"{','.join('?' if w is None else str(w) for w in want)}",
                                    file=src, field="--input_shape",
                                    hint="give the graph's own dimensions (only '?' ones are "
                                         "free); TensorFlow inputs are usually NHWC")
            chosen.append(t)
            # a batch dimension the graph leaves free stays free (the compiled model and the
            # calibration run take any batch); --input_shape fixes the others
            shapes[t] = [None if (want is not None and i == 0 and want[0] is None) else d
                         for i, d in enumerate(dims)]
        inputs = chosen
    outputs = list(frozen.outputs)
    if out_nodes:
        names = [s for s in (x.strip() for x in str(out_nodes).replace(",", ";").split(";")) if s]
        outputs = []
        for name in names:
            if op_name(name) not in nodes:
                close = difflib.get_close_matches(op_name(name), list(nodes), n=3)
                raise DoptError(f"--out_nodes names '{name}', which is not a node of the graph",
                                file=src, field="--out_nodes",
                                expected="node names of the graph"
                                + (f" (did you mean {', '.join(close)}?)" if close else ""),
                                hint="list the output nodes as 'name:0;name2:0'")
            outputs.append(tensor_name(name))
    if not outputs:
        outputs = _sinks(gd)
    if not outputs:
        raise DoptError("the graph has no output node", file=src, field="--out_nodes",
                        hint="name the outputs with --out_nodes 'name:0'")
    return FrozenGraph(gd, inputs, outputs, src, shapes)


def to_onnx(frozen: FrozenGraph, input_shapes: dict | None = None, out_nodes=None,
            opset: int = OPSET):
    """Convert with tf2onnx; ONNX input/output names are the TF tensor names."""
    _tf()
    try:
        import tf2onnx
    except ImportError:
        from dopt.errors import MissingExtraError
        raise MissingExtraError("tf2onnx", "tf", "Converting TensorFlow models") from None
    fr = select_io(frozen, input_shapes, out_nodes) if (input_shapes or out_nodes
                                                       or not frozen.inputs) else frozen
    override = {t: list(s) for t, s in fr.shapes.items()
                if t in fr.inputs and s is not None}
    import logging
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model, _ = tf2onnx.convert.from_graph_def(
                fr.graph_def, input_names=fr.inputs, output_names=fr.outputs, opset=opset,
                shape_override=override or None)
        except Exception as e:  # noqa: BLE001 - converter failures are about the graph
            msg = str(e).splitlines()[0][:300] if str(e) else e.__class__.__name__
            raise DoptError(f"tf2onnx could not convert the graph: {msg}", file=fr.source,
                            field="--model", hint="check --out_nodes / --input_shape, or export "
                            "the model to ONNX yourself and pass --framework 5") from None
    _name_inputs(model, fr)
    return model


def _name_inputs(model, fr: FrozenGraph) -> None:
    """Fixed dims from --input_shape written into the ONNX inputs (tf2onnx leaves -1s)."""
    for i in model.graph.input:
        dims = fr.shapes.get(i.name)
        if not dims:
            continue
        for d, v in zip(i.type.tensor_type.shape.dim, dims):
            if v is not None:
                d.dim_value = int(v)


def fold_constants(frozen: FrozenGraph):
    """The graph pruned to its outputs and constant-folded by grappler (as tf2onnx does
    before converting); op names of the ops that stay are kept."""
    tf = _tf()
    from tf2onnx import tf_loader
    with warnings.catch_warnings(), tf.Graph().as_default():
        warnings.simplefilter("ignore")
        return tf_loader.tf_optimize(list(frozen.inputs), list(frozen.outputs),
                                     frozen.graph_def)


def keras_to_onnx(model, batch=None):
    frozen = frozen_from_keras(model, batch=batch)
    return to_onnx(frozen), frozen


def consumers(gd) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in gd.node:
        for i in n.input:
            out.setdefault(op_name(i), []).append(n)
    return out


def fusable_chain(node, consumers_of) -> list[str]:
    chain = [node.name]
    cur = node
    for _ in range(8):
        nxt = [c for c in consumers_of.get(cur.name, []) if c.op != "NoOp"]
        if len(nxt) != 1 or nxt[0].op not in FUSABLE:
            break
        cur = nxt[0]
        chain.append(cur.name)
    return chain


def onnx_node_map(graph_def, onnx_model) -> dict[str, str]:
    """``{TF op name: ONNX node name}`` for every Conv2D / DepthwiseConv2dNative / MatMul
    op that became a quantizable ONNX node.

    By name first (the op's, or a fused consumer's: tf2onnx names a fused node after one
    of them); a node tf2onnx renamed outright (``Conv__25``) by its neighbours: it reads the
    op's input tensor (tensor names survive conversion) and feeds the ONNX node named
    after the fused chain's consumer.
    """
    onodes = [n for n in onnx_model.graph.node if n.op_type in ONNX_OP_TYPES]
    by_name = {n.name: n for n in onodes}
    by_output = {o: n for n in onodes for o in n.output}
    all_onnx = {n.name: n for n in onnx_model.graph.node}
    cons = consumers(graph_def)
    out: dict[str, str] = {}
    taken: set[str] = set()
    pending = []
    for node in graph_def.node:
        if node.op not in TF_OP_TYPES:
            continue
        chain = fusable_chain(node, cons)
        for name in chain:
            hit = by_name.get(name) or by_output.get(name + ":0")
            if hit is not None and hit.name not in taken:
                out[node.name] = hit.name
                taken.add(hit.name)
                break
        else:
            pending.append((node, chain))
    for node, chain in pending:
        src = tensor_name(node.input[0])
        cands = [n for n in onodes if n.name not in taken and n.input and n.input[0] == src]
        if len(cands) > 1:
            down = set()
            for c in cons.get(chain[-1], []):
                on = all_onnx.get(c.name)
                if on is not None:
                    down |= {by_output[i].name for i in on.input if i in by_output}
            cands = [n for n in cands if n.name in down]
        if len(cands) == 1:
            out[node.name] = cands[0].name
            taken.add(cands[0].name)
    return out


def const_value(graph_def, tensor: str):
    """The ndarray behind ``tensor`` if it is a Const (through Identity), else ``None``."""
    from tensorflow.python.framework import tensor_util
    nodes = {n.name: n for n in graph_def.node}
    name = op_name(tensor)
    for _ in range(16):
        n = nodes.get(name)
        if n is None:
            return None
        if n.op == "Const":
            return tensor_util.MakeNdarray(n.attr["value"].tensor)
        if n.op not in ("Identity", "ReadVariableOp", "Cast"):
            return None
        name = op_name(n.input[0])
    return None


def quant_ops(graph_def) -> dict[str, dict]:
    """``{op name: {"op_type", "input", "weight", "value"}}`` for quantizable ops with a
    constant weight (the second input)."""
    out = {}
    for n in graph_def.node:
        if n.op in TF_OP_TYPES and len(n.input) > 1:
            v = const_value(graph_def, n.input[1])
            if v is not None:
                out[n.name] = {"op_type": n.op, "input": tensor_name(n.input[0]),
                               "weight": tensor_name(n.input[1]), "value": v}
    return out


def keras_layer_ops(model, graph_def) -> dict[str, list[str]]:
    """``{Keras layer name: [TF op name, ...]}`` matched by weight values (then by name).

    A SeparableConv2D gives ``[depthwise op, pointwise op]``.
    """
    ops = quant_ops(graph_def)
    free = dict(ops)
    result: dict[str, list[str]] = {}

    def find(layer_name, kernel, kind):
        cands = [k for k, v in free.items() if v["op_type"] == kind
                 and v["value"].shape == kernel.shape and np.array_equal(v["value"], kernel)]
        if len(cands) > 1:
            scoped = [k for k in cands if f"/{layer_name}/" in f"/{k}"
                      or f"/{layer_name}_" in f"/{k}"]
            cands = scoped if len(scoped) == 1 else cands
        if len(cands) != 1:
            raise DoptError(f"Keras layer '{layer_name}' cannot be located in the traced graph "
                            f"({len(cands)} candidate ops)", hint="give layers distinct "
                            "weights (e.g. calibrate or train before exporting)")
        free.pop(cands[0])
        return cands[0]

    from .keras_layers import walk_layers
    for layer in walk_layers(model):
        cls = type(layer).__name__
        if cls == "Conv2D":
            result[layer.name] = [find(layer.name, layer.kernel.numpy(), "Conv2D")]
        elif cls == "DepthwiseConv2D":
            result[layer.name] = [find(layer.name, layer.kernel.numpy(), "DepthwiseConv2dNative")]
        elif cls == "Dense":
            result[layer.name] = [find(layer.name, layer.kernel.numpy(), "MatMul")]
        elif cls == "SeparableConv2D":
            result[layer.name] = [
                find(layer.name, layer.depthwise_kernel.numpy(), "DepthwiseConv2dNative"),
                find(layer.name, layer.pointwise_kernel.numpy(), "Conv2D")]
    return result


def remap_params(doc: dict, frozen: FrozenGraph, onnx_model, *, file: str | None) -> dict:
    """Re-key a parameter file's records onto the converted ONNX graph.

    A record keyed by an ONNX node name of this conversion stays; one keyed by a TF op
    name moves to the ONNX node that op became (its tensors renamed to the ONNX ones).
    Any record that places nowhere is an error naming it.
    """
    from dopt.formats import qdq as onnx_qdq
    graph = onnx_qdq.graph_layers(onnx_model)
    nodes = {n.name: n for n in onnx_model.graph.node}
    tf_map = onnx_node_map(frozen.graph_def, onnx_model)
    out = {k: v for k, v in doc.items() if k not in ("layers", "float_layers")}
    out["layers"] = {}
    unplaced = []
    for key, rec in doc["layers"].items():
        target = key if key in graph else tf_map.get(key)
        if target is None:
            unplaced.append(key)
            continue
        if target in out["layers"]:
            raise DoptError(f"records '{key}' and another one land on the same converted node "
                            f"'{target}'", file=file, field=f"layers.{key}")
        new = dict(rec)
        new["op_type"] = graph[target]["op_type"]
        new["input"] = dict(rec["input"], tensor=nodes[target].input[0])
        new["weight"] = dict(rec["weight"], tensor=graph[target]["weight"])
        b = nodes[target].input[2] if len(nodes[target].input) > 2 else ""
        new["bias"] = {"tensor": b, "bits": 32} if b else None  # the converted node's own
        new.setdefault("source_layer", key)
        if target != key:
            new["tf_op"] = key
        out["layers"][target] = new
    if unplaced:
        known = sorted(set(tf_map) | set(graph))
        close = difflib.get_close_matches(unplaced[0], known, n=3)
        raise DoptError(f"the parameter file has record(s) that cannot be placed on the "
                        f"converted graph: {', '.join(unplaced)}", file=file, field="layers",
                        expected="TF op names (Conv2D / DepthwiseConv2dNative / MatMul) of this "
                                 "graph or node names of its ONNX conversion"
                        + (f" (close: {', '.join(close)})" if close else ""),
                        hint="use the parameter file produced together with this model")
    out["float_layers"] = sorted(set(graph) - set(out["layers"]))
    return out
