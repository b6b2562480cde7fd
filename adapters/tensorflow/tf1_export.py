"""``generate_final_model`` for the TF1 session API: frozen float ``.pb`` + parameter file, checked.

In the user's session holding the freshly built float graph: snapshot the float GraphDef,
rebuild the quantized graph (``optimize_model`` with our own flags), restore the quantized
checkpoint, then write

* ``quant_model.pb``: the float graph pruned to ``output_name_list``, variables frozen to
  ``Const``, inference-mode ``FusedBatchNorm`` folded into the preceding convolution
  (weight ``<op>/weight``, bias ``<op>/bias``; the BatchNorm node becomes an ``Identity``
  of the folded result, so names downstream and output names do not change), MatMul weights
  stored ``[in, out]`` (``transpose_b`` resolved); no fake-quant ops;
* ``quant_param.json``: a ``dopt.formats.param_file`` document keyed by the TF op names, with the
  exact float32 scales the fake-quant used.

Both appear in ``output_dir`` only after two checks on random inputs: (1) the frozen graph
reproduces the quantized graph's float path (``quant_flag = 0``); (2) the frozen graph with
the parameter file applied by the core NumPy numerics (``dopt.quant.numerics``) reproduces the
quantized path (``quant_flag = 1``).
"""
from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import tensor_util

import dopt
from dopt.quant import numerics as nm
from dopt.formats import param_file as P
from dopt.formats.strategy_config import INT8, load_config
from dopt.errors import DoptError
from dopt.formats.export_checks import check_float, check_quantized
from dopt.formats.fileio import staged_outputs

from . import tf1_api as api
from .convert import op_name, tensor_name

v1 = tf.compat.v1

PB_NAME = "quant_model.pb"
PARAM_NAME = "quant_param.json"
CHECK_SAMPLES = 8
_VAR_OPS = ("VarHandleOp", "VariableV2", "Variable")


def _prune(graph_def, outputs):
    """The nodes ``outputs`` depend on (data and control inputs), in the original order."""
    by = {n.name: n for n in graph_def.node}
    keep, todo = set(), list(outputs)
    while todo:
        n = todo.pop()
        if n in keep or n not in by:
            continue
        keep.add(n)
        todo += [op_name(i) for i in by[n].input]
    out = v1.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    out.node.extend(n for n in graph_def.node if n.name in keep)
    return out


def _output_names(graph_def, output_name_list) -> list[str]:
    if isinstance(output_name_list, str):
        output_name_list = [output_name_list]
    if not isinstance(output_name_list, (list, tuple)) or not output_name_list or \
            not all(isinstance(n, str) and n for n in output_name_list):
        raise DoptError("output_name_list must be a non-empty list of node names",
                        field="output_name_list", found=repr(output_name_list),
                        hint='e.g. output_name_list=["output"]')
    names = [op_name(n) for n in output_name_list]
    have = {n.name for n in graph_def.node}
    for n in names:
        if n not in have:
            close = difflib.get_close_matches(n, sorted(have), n=3)
            raise DoptError(f"output node '{n}' is not in the graph", field="output_name_list",
                            expected="node names of the float graph built in the session"
                                     + (f" (did you mean {', '.join(close)}?)" if close else ""),
                            hint="name the output op, e.g. tf.identity(logits, name='output')")
    return names


def _checkpoint(ckpt_file) -> tuple[str, set]:
    """The checkpoint prefix (a directory means its latest checkpoint) and its keys."""
    path = str(ckpt_file) if ckpt_file is not None else ""
    prefix = path
    if path and Path(path).is_dir():
        prefix = tf.train.latest_checkpoint(path) or ""
    try:
        if not prefix:
            raise ValueError
        keys = {k for k, _ in tf.train.list_variables(prefix)}
    except (tf.errors.OpError, ValueError):
        raise DoptError("the quantized checkpoint does not exist or cannot be read",
                        file=path or repr(ckpt_file), field="ckpt_file",
                        expected="the prefix given to saver.save(sess, prefix) (files "
                                 "<prefix>.index and <prefix>.data-*) or its directory",
                        hint="save the session after quantization-aware training or "
                             "calibration with tf.compat.v1.train.Saver().save(sess, path)"
                        ) from None
    return prefix, keys


def _inputs(graph_def, cfg) -> dict[str, tuple[int, ...]]:
    """Placeholders the outputs depend on, with a concrete shape for the checks."""
    given = {op_name(k): v for k, v in cfg.input_shapes.items()} if cfg.input_shape else {}
    out = {}
    for n in graph_def.node:
        if n.op not in ("Placeholder",):
            continue
        dtype = tf.as_dtype(n.attr["dtype"].type)
        if dtype != tf.float32:
            raise DoptError(f"the outputs depend on placeholder '{n.name}' of type {dtype.name}, "
                            "which the export checks cannot feed", field="output_name_list",
                            hint="make it a tf.compat.v1.placeholder_with_default(...) or "
                                 "build the graph without it")
        if n.name in given:
            out[n.name] = tuple(given[n.name])
            continue
        shp = n.attr["shape"].shape
        dims = [d.size for d in shp.dim]
        if shp.unknown_rank or any(d < 0 for d in dims[1:]):
            raise DoptError(f"placeholder '{n.name}' has no static shape (batch dimension "
                            "aside), which the export checks need", file=cfg.path,
                            field="input_shape", hint=f"add \"input_shape\": \"{n.name}:1,...\" "
                            "to the configuration file, or give the placeholder a shape")
        out[n.name] = tuple([CHECK_SAMPLES if (i == 0 and d < 0) else d
                             for i, d in enumerate(dims)])
    return out


def _all_variables(g) -> dict:
    out = {}
    for key in (v1.GraphKeys.GLOBAL_VARIABLES, v1.GraphKeys.LOCAL_VARIABLES):
        for v in g.get_collection(key):
            out.setdefault(v.op.name, v)
    return out


def _restore(sess, st, sub_def, prefix, keys) -> None:
    g = sess.graph
    variables = _all_variables(g)
    model_vars = sorted(n.name for n in sub_def.node if n.op in _VAR_OPS)
    unknown = [n for n in model_vars if n not in variables]
    if unknown:
        raise DoptError(f"variable(s) {', '.join(unknown[:5])} of the float graph are not in "
                        "the variable collections", hint="create them with "
                        "tf.compat.v1.get_variable / tf.compat.v1.Variable")
    missing = [n for n in model_vars if n not in keys]
    if missing:
        raise DoptError(f"the checkpoint lacks {len(missing)} variable(s) of the model, e.g. "
                        f"{', '.join(missing[:3])}", file=prefix, field="ckpt_file",
                        hint="pass the checkpoint saved from this model after optimize_model")
    no_range = [name for name, ls in st.layers.items()
                if any(v.op.name not in keys for v in (ls.lo, ls.hi, ls.initialized))]
    if no_range:
        raise DoptError(f"the checkpoint has no activation range for op(s) "
                        f"{', '.join(no_range)} (is it the float checkpoint?)", file=prefix,
                        field="ckpt_file", hint="pass the checkpoint saved after quantization-"
                        "aware training or calibration, with the same configuration file")
    names = model_vars + [v.op.name for ls in st.layers.values()
                          for v in (ls.lo, ls.hi, ls.initialized)]
    with g.as_default():
        saver = v1.train.Saver({n: variables[n] for n in names}, name="dopt_export_restore")
    saver.restore(sess, prefix)
    flags = sess.run({name: ls.initialized for name, ls in st.layers.items()})
    unset = [n for n, ok in flags.items() if not ok]
    if unset:
        raise DoptError(f"op(s) {', '.join(unset)} have no activation range in the checkpoint",
                        file=prefix, field="ckpt_file",
                        hint="calibrate (set_calibrate_state(sess, True), forward passes, "
                             "set_calibrate_state(sess, False)) or train with quant_flag=1 "
                             "before saving the checkpoint")


def _const(name, value):
    n = v1.NodeDef(name=name, op="Const")
    value = np.asarray(value)
    n.attr["dtype"].type = tf.as_dtype(value.dtype).as_datatype_enum
    n.attr["value"].tensor.CopyFrom(tensor_util.make_tensor_proto(value))
    return n


def _freeze(sub_def, values: dict):
    """Variables -> Const (same names), resource reads -> Identity; no device pins."""
    out = v1.GraphDef()
    out.CopyFrom(sub_def)
    for n in out.node:
        if n.op in _VAR_OPS:
            n.CopyFrom(_const(n.name, values[n.name]))
        elif n.op == "ReadVariableOp":
            dtype = n.attr["dtype"].type
            n.op = "Identity"
            n.attr.clear()
            n.attr["T"].type = dtype
        n.device = ""
        if "_class" in n.attr:
            del n.attr["_class"]
    return out


def _fold_into(frozen, layer, w, b, data_format) -> tuple[str, int] | None:
    """Give ``layer`` its own weight/bias Consts and bypass its BatchNorm; the bias site."""
    nodes = {n.name: n for n in frozen.node}
    node = nodes[layer.name]
    wname, bname = f"{layer.name}/weight", f"{layer.name}/bias"
    frozen.node.append(_const(wname, w))
    node.input[1] = wname
    if layer.transpose_b:
        node.attr["transpose_b"].b = False
    site = None
    if layer.bias:
        bop, idx = layer.bias
        frozen.node.append(_const(bname, b))
        nodes[bop].input[idx] = bname
        site, tail = (bop, idx), bop
    elif b is not None:
        frozen.node.append(_const(bname, b))
        add = frozen.node.add(name=f"{layer.name}/bias_add", op="BiasAdd",
                              input=[layer.name, bname])
        add.attr["T"].type = tf.float32.as_datatype_enum
        add.attr["data_format"].s = data_format
        site, tail = (add.name, 1), add.name
    else:
        tail = layer.name
    if layer.bn:
        bn = nodes[layer.bn]
        bn.op = "Identity"
        del bn.input[:]
        bn.input.append(tail)
        bn.attr.clear()
        bn.attr["T"].type = tf.float32.as_datatype_enum
    return site


def _out_channels(nodes, node, layer) -> int:
    """Output channels of a quantizable node from its (frozen) weight Const."""
    src = nodes[op_name(node.input[1])]
    while src.op == "Identity":
        src = nodes[op_name(src.input[0])]
    dims = [d.size for d in src.attr["value"].tensor.tensor_shape.dim]
    if layer.depthwise:
        return dims[-1] * dims[-2]
    if node.op == "MatMul" and node.attr["transpose_b"].b:
        return dims[0]
    return dims[-1]


def _run_def(graph_def, feeds: dict, outputs):
    g = tf.Graph()
    with g.as_default():
        tf.import_graph_def(graph_def, name="")
    with v1.Session(graph=g) as s:
        return s.run([f"{o}:0" for o in outputs], {f"{k}:0": v for k, v in feeds.items()})


def _reevaluate(frozen, doc, layers, sites, feeds, outputs):
    """The frozen graph with the parameter file applied by the core NumPy numerics."""
    consts = {n.name: tensor_util.MakeNdarray(n.attr["value"].tensor)
              for n in frozen.node if n.op == "Const"}
    g = tf.Graph()
    with g.as_default():
        tf.import_graph_def(frozen, name="")
        for name, rec in doc["layers"].items():
            layer = layers[name]
            op = g.get_operation_by_name(name)
            s, o = np.float32(rec["input"]["scale"]), int(rec["input"]["offset"])
            x = op.inputs[0]
            xq = tf.numpy_function(lambda a, s=s, o=o: nm.fake_quant_activation(a, s, o), [x],
                                   tf.float32, stateful=False)
            xq.set_shape(x.shape)
            op._update_input(0, xq)
            w = consts[op_name(rec["weight"]["tensor"])]
            w2 = w.reshape(w.shape[:-2] + (-1,)) if layer.depthwise else w
            scales = np.asarray(rec["weight"]["scales"], np.float32)
            axis = w2.ndim - 1
            op._update_input(1, tf.constant(nm.fake_quant_weight(w2, scales, axis=axis)
                                            .reshape(w.shape)))
            if rec["bias"] is not None:
                b = consts[op_name(rec["bias"]["tensor"])]
                bq = (nm.quantize_bias(b, s, scales).astype(np.float32)
                      * nm.bias_scales(s, scales)).astype(np.float32)
                bop, idx = sites[name]
                g.get_operation_by_name(bop)._update_input(idx, tf.constant(bq))
    with v1.Session(graph=g) as sess:
        return sess.run([f"{o}:0" for o in outputs], {f"{k}:0": v for k, v in feeds.items()})


def generate_final_model(sess, config_file, output_name_list, ckpt_file, output_dir=None):
    """Frozen float ``.pb`` (BN folded) + parameter file from the quantized checkpoint."""
    g = api._check_sess(sess, "generate_final_model")
    if api.is_quantized(g):
        raise DoptError("generate_final_model expects a session holding the freshly built "
                        "float graph", found="a graph already rewritten by optimize_model",
                        hint="open a new tf.Graph / Session, build the float model there and "
                             "call generate_final_model without optimize_model")
    out_dir = Path(output_dir) if output_dir is not None else Path.cwd()
    if not out_dir.is_dir():
        raise DoptError("the output directory does not exist", file=str(out_dir),
                        field="output_dir", hint="create it first (the reference requires an "
                        "existing directory)")
    cfg = load_config(config_file)
    float_def = g.as_graph_def()
    outputs = _output_names(float_def, output_name_list)
    prefix, keys = _checkpoint(ckpt_file)
    sub_def = _prune(float_def, outputs)
    feeds_shape = _inputs(sub_def, cfg)
    with g.as_default(), g.name_scope(None), tf.name_scope("dopt_export/"):
        qf = v1.placeholder(tf.int32, [], name="quant_flag")
        it = v1.placeholder(tf.bool, [], name="is_train")
    api.optimize_model(sess, config_file, it, qf)
    st = api.state_of(g, "generate_final_model")
    in_sub = {n.name for n in sub_def.node}
    lost = [n for n in st.layers if n not in in_sub]
    if lost:
        raise DoptError(f"quantized op(s) {', '.join(lost)} do not feed the outputs "
                        f"{', '.join(outputs)}", file=cfg.path, field="layer_strategy",
                        hint="set them to 'float' or add the outputs they feed to "
                             "output_name_list")
    _restore(sess, st, sub_def, prefix, keys)

    # the exact values of the quantized path, and the folded weights of float conv+BN
    with g.as_default(), g.name_scope(None), tf.name_scope("dopt_export/"):
        fetch = {}
        for name, ls in st.layers.items():
            q = api.quant_params(ls.layer, ls.tensors, ls.lo.read_value(), ls.hi.read_value())
            fetch[name] = {"w": q["w"], "s_w": q["s_w"], "scale": q["scale"],
                           "offset": q["offset"], "lo": ls.lo.read_value(),
                           "hi": ls.hi.read_value()}
            if q["b"] is not None:
                fetch[name]["b"] = q["b"]
        for name, layer in st.all_layers.items():
            if name in st.layers or not layer.bn or name not in in_sub \
                    or name not in st.fp16_tensors:
                continue
            w, b = api.folded(layer, st.fp16_tensors[name])   # the tensors before rerouting
            fetch[name] = {"w": w, "b": b}
    variables = _all_variables(g)
    var_values = {n.name: variables[n.name] for n in sub_def.node if n.op in _VAR_OPS}
    vals, var_vals = sess.run([fetch, var_values])

    frozen = _freeze(sub_def, var_vals)
    sites = {}
    for name, v in vals.items():
        layer = st.all_layers[name]
        fmt = b"NHWC" if layer.op_type == "MatMul" else \
            g.get_operation_by_name(name).get_attr("data_format")
        sites[name] = _fold_into(frozen, layer, v["w"], v.get("b"), fmt)
    frozen = _prune(frozen, outputs)

    nodes = {n.name: n for n in frozen.node}
    doc = P.new_params({"name": "dopt", "version": dopt.__version__, "framework": "tensorflow",
                        "tensorflow": tf.__version__, "config": Path(cfg.path).name}, PB_NAME)
    for name, ls in st.layers.items():
        v = vals[name]
        layer = ls.layer
        doc["layers"][name] = {
            "op_type": layer.op_type, "strategy": INT8, "source_layer": name,
            "input": {"tensor": tensor_name(nodes[name].input[0]), "bits": 8,
                      "scale": float(v["scale"]), "offset": int(v["offset"]),
                      "range": [float(v["lo"]), float(v["hi"])], "algorithm": ls.algorithm},
            "weight": {"tensor": f"{name}/weight:0", "bits": 8, "per_channel": True,
                       "symmetric": True, "scales": [float(s) for s in v["s_w"]]},
            "bias": {"tensor": f"{name}/bias:0", "bits": 32} if "b" in v else None,
            "folded_bn": layer.bn,
        }
    graph_info = {name: {"op_type": layer.op_type,
                         "weight_shape": [_out_channels(nodes, nodes[name], layer)]}
                  for name, layer in st.all_layers.items() if name in nodes}
    doc["float_layers"] = sorted(set(graph_info) - set(doc["layers"]))
    P.validate_params(doc, file=PARAM_NAME, graph=graph_info, expected_layers=list(st.layers))

    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal(shape).astype(np.float32) for k, shape in feeds_shape.items()}
    base = {g.get_tensor_by_name(f"{k}:0"): v for k, v in feeds.items()}
    out_t = [g.get_tensor_by_name(f"{o}:0") for o in outputs]
    ref_float = sess.run(out_t, {**base, qf: 0, it: False})
    # is_train_flag true: the quantized path without the NPU's FP16 edges (the file's
    # numerics alone; the compiler adds the FP16 data types itself)
    ref_quant = sess.run(out_t, {**base, qf: 1, it: True})
    check_float(ref_float, _run_def(frozen, feeds, outputs),
                "the frozen graph (float path of the quantized graph)")
    check_quantized(ref_quant, _reevaluate(frozen, doc, st.all_layers, sites, feeds, outputs),
                    "the frozen graph with the parameter file")

    with staged_outputs(out_dir) as stage:
        (stage / PB_NAME).write_bytes(frozen.SerializeToString())
        P.write_params(stage / PARAM_NAME, doc)
    return {"frozen_pb": str(out_dir / PB_NAME), "param_file": str(out_dir / PARAM_NAME)}
