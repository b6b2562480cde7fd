"""``dopt_so --framework 3``: no-training quantization of a frozen ``.pb`` (or SavedModel /
``.keras``, our addition).

The graph is converted to ONNX (``convert.to_onnx``) and quantized by whichever adapter
does ONNX no-training quantization, reached through the hook dispatch (never imported).
The outputs are TensorFlow-shaped: ``--output`` is the frozen float graph (pruned to
``--out_nodes``), the parameter file is keyed by TensorFlow op names and tensor names,
and the QDQ ONNX model lands beside the ``.pb`` as ``<name>_qdq.onnx``.
``dopt omg --framework 3 --model x.pb --compress_conf param`` converts the ``.pb`` again
(tf2onnx is deterministic) and places each record back by name.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from dopt.formats import param_file as P
from dopt.errors import DoptError
from dopt.formats.fileio import atomic_paths

from . import convert


def _tf_keyed(doc: dict, frozen: convert.FrozenGraph, onnx_model) -> dict:
    """Records re-keyed from ONNX node names to the TF op each came from."""
    back = {v: k for k, v in convert.onnx_node_map(frozen.graph_def, onnx_model).items()}
    ops = convert.quant_ops(frozen.graph_def)
    out = {k: v for k, v in doc.items() if k not in ("layers", "float_layers")}
    out["layers"] = {}
    for node, rec in doc["layers"].items():
        op = back.get(node)
        if op is None or op not in ops:  # no TF counterpart: keep the ONNX name (still placeable)
            out["layers"][node] = rec
            continue
        new = dict(rec, op_type=ops[op]["op_type"], onnx_node=node, source_layer=op)
        new["input"] = dict(rec["input"], tensor=ops[op]["input"])
        new["weight"] = dict(rec["weight"], tensor=ops[op]["weight"])
        if rec.get("bias") is not None:
            new["bias"] = None  # the bias is a separate TF op (BiasAdd); the compiler fuses it
        out["layers"][op] = new
    out["float_layers"] = sorted(back.get(n, n) for n in doc.get("float_layers", []))
    return out


def _onnx_bias(model, node_name: str):
    """The float bias a node of ``model`` uses (through a bias DequantizeLinear), or None."""
    from onnx import numpy_helper as nh
    node = next((n for n in model.graph.node if n.name == node_name), None)
    if node is None or len(node.input) < 3 or not node.input[2]:
        return None
    inits = {i.name: i for i in model.graph.initializer}
    name = node.input[2]
    if name in inits:
        return nh.to_array(inits[name]).astype(np.float32)
    dq = next((n for n in model.graph.node if n.op_type == "DequantizeLinear"
               and name in n.output), None)
    if dq is None or dq.input[0] not in inits or dq.input[1] not in inits:
        return None
    q = nh.to_array(inits[dq.input[0]]).astype(np.float32)
    return (q * nh.to_array(inits[dq.input[1]]).astype(np.float32)).astype(np.float32)


def _additive_const(gd, op: str):
    """The Const node adding a per-channel term after op's last multiplicative step, or None
    (also None when that constant feeds anything else: changing it would change more)."""
    nodes = {n.name: n for n in gd.node}
    consumers = convert.consumers(gd)

    def const_of(tensor):
        n = nodes.get(convert.op_name(tensor))
        for _ in range(8):
            if n is None or len(consumers.get(n.name, [])) != 1:
                return None
            if n.op == "Const":
                return n
            if n.op != "Identity":
                return None
            n = nodes.get(convert.op_name(n.input[0]))
        return None

    found = None
    for name in convert.fusable_chain(nodes[op], consumers)[1:]:
        n = nodes[name]
        if n.op in ("BiasAdd", "Add", "AddV2"):
            found = next((c for c in map(const_of, n.input) if c is not None), None)
        elif n.op.startswith("FusedBatchNorm"):
            found = const_of(n.input[2])
        elif n.op != "Identity":
            found = None
    return found


def _carry_bias_correction(gd, onnx_before, onnx_after, tf_map, log):
    """Write the ONNX adapter's bias correction into the frozen graph's bias constants."""
    import tensorflow as tf
    done, lost = 0, []
    for op, node in tf_map.items():
        new = _onnx_bias(onnx_after, node)
        if new is None:
            continue
        old = _onnx_bias(onnx_before, node)
        delta = new - (old if old is not None else np.zeros_like(new))
        if not np.any(delta):
            continue
        c = _additive_const(gd, op)
        cur = tf.make_ndarray(c.attr["value"].tensor) if c is not None else None
        if cur is None or cur.shape != delta.shape:
            lost.append(op)
            continue
        c.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(
            (cur.astype(np.float32) + delta).astype(cur.dtype)))
        done += 1
    if done:
        log(f"bias correction carried into the .pb for {done} layer(s)")
    if lost:
        shown = ", ".join(lost[:4]) + (f" and {len(lost) - 4} more" if len(lost) > 4 else "")
        log(f"bias correction not carried for {len(lost)} layer(s) ({shown}): the graph has no "
            f"per-channel bias constant after them (e.g. a zero bias folded away); they keep "
            f"their original bias")


def _pruned_graph_def(frozen: convert.FrozenGraph):
    import tensorflow as tf
    keep = [convert.op_name(t) for t in frozen.outputs]
    return tf.compat.v1.graph_util.extract_sub_graph(frozen.graph_def, keep)


def quantize_job(job) -> dict:
    from dopt import plugin_manager
    if job.equalization:
        raise DoptError("cross-layer equalization rewrites weights, which the frozen .pb output "
                        "does not carry", file=job.config_file, field="equalization",
                        hint="set equalization: false for --framework 3, or convert the model to "
                             "ONNX and use --framework 5")
    frozen = convert.load_frozen(job.model, field_name="--model")
    fr = convert.select_io(frozen, job.input_shapes, job.out_nodes)
    # the .pb we write is the constant-folded inference graph: BatchNorm arithmetic becomes
    # per-channel constants, where the bias correction can be written
    fr = dataclasses.replace(fr, graph_def=convert.fold_constants(fr))
    onnx_model = convert.to_onnx(fr)
    import onnx

    names = {k: convert.tensor_name(k) for k in job.input_shapes}
    onnx_inputs = {i.name for i in onnx_model.graph.input}
    lost = [t for t in names.values() if t not in onnx_inputs]
    if lost:
        raise DoptError(f"input(s) {', '.join(lost)} do not feed the outputs after conversion",
                        file=job.model, field="--input_shape",
                        hint="name only inputs the --out_nodes depend on")
    tf_map = convert.onnx_node_map(fr.graph_def, onnx_model)
    ops = convert.quant_ops(fr.graph_def)
    exclude = []
    for e in job.exclude:
        # exclude_op names TF ops (or their weight tensors); ONNX-side names pass through
        op = e if e in ops else next((k for k, v in ops.items()
                                      if convert.op_name(v["weight"]) == convert.op_name(e)),
                                     None)
        exclude.append(tf_map.get(op, e) if op else e)

    def feeds():
        for batch in job.feeds():
            yield {names[k]: v for k, v in batch.items()}

    with tempfile.TemporaryDirectory(prefix="dopt_so_tf_") as tmp:
        tmp = Path(tmp)
        src = tmp / "converted.onnx"
        onnx.save(onnx_model, src)
        sub = dataclasses.replace(job, framework=5, model=str(src), output=str(tmp / "q.onnx"),
                                  compress_conf=str(tmp / "param"),
                                  input_shapes={names[k]: v for k, v in job.input_shapes.items()},
                                  feeds=feeds, out_nodes=None, exclude=exclude)
        job.log(f"converted {job.model} with tf2onnx: {len(onnx_model.graph.node)} ONNX nodes, "
                f"{len(tf_map)} quantizable op(s) placed")
        written = plugin_manager.get_plugin_manager().hook.dopt_quantize_file(adapter="onnx",
                                                                             job=sub)
        if written is None:
            raise DoptError("no installed dopt adapter quantizes ONNX models, which the "
                            "TensorFlow path uses", hint="pip install 'dopt[onnx]'")
        if job.bias_correction:
            _carry_bias_correction(fr.graph_def, onnx_model, onnx.load(sub.output), tf_map,
                                   job.log)
        doc = json.loads(Path(sub.compress_conf).read_text("utf-8"))
        doc = _tf_keyed(doc, fr, onnx_model)
        doc["model"] = Path(job.output).name
        doc.setdefault("producer", {})["framework"] = "tensorflow"
        P.validate_params(doc, file=job.compress_conf)
        out = Path(job.output)
        qdq_dest = out.with_name(out.stem + "_qdq.onnx")
        gd = _pruned_graph_def(fr)
        with atomic_paths(job.output, job.compress_conf, qdq_dest) as (t_pb, t_param, t_qdq):
            t_pb.write_bytes(gd.SerializeToString())
            t_param.write_text(json.dumps(doc, indent=1), encoding="utf-8")
            shutil.copyfile(sub.output, t_qdq)
    job.log(f"wrote {job.output} (frozen float graph), {job.compress_conf} "
            f"({len(doc['layers'])} INT8 layer(s), keyed by TF op names), {qdq_dest}")
    return {"model": str(job.output), "param_file": str(job.compress_conf),
            "qdq_onnx": str(qdq_dest)}
