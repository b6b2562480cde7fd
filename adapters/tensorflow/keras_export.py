"""``generate_final_model`` for Keras: fused float model, ONNX, parameter file, QDQ - checked.

Everything is staged in a temporary folder and moved into ``output_dir`` only after
(1) the fused float Keras model and its ONNX conversion reproduce the unfused float
network and (2) ONNX Runtime running the QDQ model reproduces the fake-quant model
(float32 form, NPU edges off) - the same checks and tolerances as the PyTorch adapter.
The parameter file's records are keyed by node names of ``model_fused.onnx``; the
quantizable nodes there are renamed to their Keras layer names (``sep/depthwise`` and
``sep/pointwise`` for the two halves of a SeparableConv2D) so that compiler reports
speak the user's names.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import dopt
from dopt.formats import qdq as onnx_qdq
from dopt.formats import param_file as P
from dopt.formats.strategy_config import INT8, check_against_model, load_config
from dopt.errors import DoptError
from dopt.formats.export_checks import check_float, check_quantized
from dopt.formats.fileio import staged_outputs

from . import convert, keras_api as KA, keras_layers as KL

FUSED_KERAS = "model_fused.keras"
FUSED_NAME = "model_fused.onnx"
QDQ_NAME = "model_qdq.onnx"
PARAM_NAME = "quant_param.json"
CHECK_SAMPLES = 16


# -- the quantized model to export ---------------------------------------------------------
def _load_keras_file(path: Path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except Exception as e:  # noqa: BLE001 - any failure is the file's
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise DoptError(f"the .keras file cannot be loaded ({e.__class__.__name__}: {first})",
                        file=str(path), field="weights_file",
                        hint="pass the file saved from the model returned by optimize_model "
                             "(model.save('quant.keras'))") from None


def _load_weights_into(qmodel, path: Path):
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            qmodel.load_weights(str(path))
    except Exception as e:  # noqa: BLE001
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise DoptError(f"the weights file does not fit the quantized model "
                        f"({e.__class__.__name__}: {first})", file=str(path),
                        field="weights_file",
                        hint="pass the weights saved from the model returned by optimize_model "
                             "with this configuration (qmodel.save_weights('quant.weights.h5'))"
                        ) from None
    skipped = [str(w.message) for w in caught if "load" in str(w.message).lower()
               or "mismatch" in str(w.message).lower()]
    if skipped:
        raise DoptError(f"the weights file does not fit the quantized model ({skipped[0][:200]})",
                        file=str(path), field="weights_file",
                        hint="pass the weights saved from the model returned by optimize_model "
                             "with this configuration")


def _quantized_model(model, cfg, weights_file):
    KA.check_backend()
    if weights_file is None:
        if not KA.is_quantized(model):
            raise DoptError("generate_final_model was given a float model and no weights file",
                            field="weights_file", hint="pass the model returned by "
                            "optimize_model, or the float model plus the quantized model's "
                            "saved weights (.weights.h5) or .keras file")
        return model
    path = Path(weights_file)
    if not path.is_file():
        raise DoptError("the weights file does not exist", file=str(path), field="weights_file")
    if path.name.endswith(".keras"):
        qmodel = _load_keras_file(path)
        if not KA.is_quantized(qmodel):
            raise DoptError("the .keras file holds a float model, not a quantized one",
                            file=str(path), field="weights_file",
                            hint="save the model returned by optimize_model after calibration "
                                 "or training")
        return qmodel
    if KA.is_quantized(model):
        try:
            qmodel = keras.models.clone_model(model, recursive=True)
        except Exception as e:  # noqa: BLE001
            raise DoptError(f"the quantized model could not be copied ({e.__class__.__name__})",
                            hint="pass the float model instead") from None
    else:
        KA.check_model(model, "generate_final_model")
        qmodel = KA.optimize_model(model, cfg.path)
    _load_weights_into(qmodel, path)
    return qmodel


def _check_matches_config(qmodel, cfg, weights_file) -> None:
    layers = {w.name: KL.op_type(w.layer) for w in KL.wrappers(qmodel)
              if KL.op_type(w.layer) is not None}
    check_against_model(cfg, layers, KA.STRATEGIES)
    have = sorted(w.name for w in KL.quant_wrappers(qmodel))
    want = sorted(cfg.quantized_layers())
    if have != want:
        raise DoptError("the quantized model and the configuration disagree on which layers "
                        "are INT8", file=cfg.path, field="layer_strategy",
                        expected=", ".join(want) or "none", found=", ".join(have) or "none",
                        hint="pass the configuration the model was optimized with")
    missing = [KA.range_key(w, p) for w in KL.quant_wrappers(qmodel) for p in w.int8_parts
               if not p.act.is_set]
    if missing:
        raise DoptError(f"layer(s) {', '.join(missing)} have no activation range",
                        file=str(weights_file) if weights_file else None,
                        hint="calibrate (set_calibrate_state(model, True), model.predict(data), "
                             "set_calibrate_state(model, False)) or train before saving")


@contextmanager
def _switched(qmodel, **values):
    """Set wrapper switches for the duration, then restore each wrapper's own values."""
    saved = [(w, {k: bool(getattr(w._sw, k).numpy()) for k in values})
             for w in KL.wrappers(qmodel)]
    try:
        for w, _ in saved:
            for k, v in values.items():
                getattr(w._sw, k).assign(v)
        yield
    finally:
        for w, old in saved:
            for k, v in old.items():
                getattr(w._sw, k).assign(v)


# -- the fused float model -------------------------------------------------------------
def _deployed_weights(w: KL._DoptWrapper) -> dict[str, np.ndarray]:
    """Attribute name -> value of the plain layer that replaces wrapper ``w``."""
    if isinstance(w, KL.NpuFloatWrapper) and w.bn_only:
        return {}
    out = {}
    bias = None
    for p in w._parts:
        k, b = w.folded(p)
        out[p.kernel_attr] = k.numpy()
        if b is not None:
            bias = b.numpy()
    if bias is not None:
        out["bias"] = bias
    return out


def _fused_model(qmodel):
    """Float Keras model: BN folded into the convolutions, wrappers removed."""
    def clone(layer):
        if isinstance(layer, KL._DoptWrapper):
            inner = layer.layer
            cfg = inner.get_config()
            if layer.bn is not None:
                cfg["use_bias"] = True
            if "lora_rank" in cfg:
                cfg["lora_rank"] = None
            return inner.__class__.from_config(cfg)
        return layer.__class__.from_config(layer.get_config())

    fused = KA.clone_with(qmodel, clone)
    src = {layer.name: layer for layer in KL.walk_layers(qmodel)}
    for layer in KL.walk_layers(fused):
        old = src[layer.name]
        if isinstance(old, KL._DoptWrapper):
            if isinstance(old, KL.NpuFloatWrapper) and old.bn_only:
                KA._assign_all(layer.weights, old.layer.weights, layer.name)
                continue
            for attr, value in _deployed_weights(old).items():
                getattr(layer, attr).assign(value)
        else:
            KA._assign_all(layer.weights, old.weights, layer.name)
    return fused


# -- ONNX touch-ups -------------------------------------------------------------------
def _matmul_add_to_gemm(m) -> None:
    """``MatMul(x, W) + b`` (2-D x, constant W and per-column b) -> ``Gemm(x, W, b)``.

    tf2onnx keeps a Dense layer as MatMul + Add when the batch is free; the compiler
    folds only a Gemm's bias into the FullyConnection (int32 for INT8 layers), which is
    what the fake-quant model computes. The rewrite is exact.
    """
    import onnx
    from onnx import numpy_helper
    try:
        inferred = onnx.shape_inference.infer_shapes(m)
    except Exception:  # noqa: BLE001 - no shapes, no rewrite
        return
    ranks = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
        if vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    inits = {i.name: i for i in m.graph.initializer}
    consumers: dict[str, list] = {}
    for n in m.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    outputs = {o.name for o in m.graph.output}
    drop = []
    for n in m.graph.node:
        if n.op_type != "MatMul" or n.input[1] not in inits or ranks.get(n.input[0]) != 2 \
                or len(inits[n.input[1]].dims) != 2 or n.output[0] in outputs:
            continue
        users = consumers.get(n.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add":
            continue
        add = users[0]
        bias = add.input[1] if add.input[0] == n.output[0] else add.input[0]
        cout = inits[n.input[1]].dims[1]
        if bias not in inits or int(np.prod(inits[bias].dims)) != cout \
                or [d for d in inits[bias].dims if d != 1] not in ([cout], []):
            continue
        b = numpy_helper.to_array(inits[bias]).reshape(-1).astype(np.float32)
        b_name = f"{n.name}.bias"
        m.graph.initializer.append(numpy_helper.from_array(b, b_name))
        n.op_type = "Gemm"
        n.input.append(b_name)
        n.output[0] = add.output[0]
        drop.append(add)
    for add in drop:
        m.graph.node.remove(add)
    used = {t for n in m.graph.node for t in n.input}
    keep = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)


# -- locating the layers in the ONNX graph ---------------------------------------------
def _onnx_weight_as_tf(node, w: np.ndarray, shape: tuple):
    """The ONNX node's weight in the TF kernel layout ``shape`` (None if it cannot be)."""
    if node.op_type == "Conv" and w.ndim == 4:
        a = np.transpose(w, (2, 3, 1, 0))
    elif node.op_type == "Gemm":
        trans_b = next((x.i for x in node.attribute if x.name == "transB"), 0)
        a = w.T if trans_b else w
    elif node.op_type == "MatMul":
        a = w
    else:
        return None
    return a.reshape(shape) if a.size == int(np.prod(shape)) else None


def _part_names(w: KL._DoptWrapper) -> list[str]:
    if len(w._parts) == 2:
        return [f"{w.name}/depthwise", f"{w.name}/pointwise"]
    return [w.name]


def _locate(qmodel, fused, frozen, onnx_model) -> dict[str, str]:
    """``{part name: ONNX node name}``: tf op -> ONNX node through the converter's maps,
    confirmed (or, where the maps miss a node, found) by the weight values themselves."""
    from onnx import numpy_helper
    graph = onnx_qdq.graph_layers(onnx_model)
    nodes = {n.name: n for n in onnx_model.graph.node}
    inits = {i.name: i for i in onnx_model.graph.initializer}
    try:
        layer_ops = convert.keras_layer_ops(fused, frozen.graph_def)
    except DoptError:
        layer_ops = {}
    node_map = convert.onnx_node_map(frozen.graph_def, onnx_model)
    fused_layers = {layer.name: layer for layer in KL.walk_layers(fused)}
    cache: dict[str, np.ndarray] = {}

    def matches(node_name: str, want: np.ndarray) -> bool:
        g = graph.get(node_name)
        if g is None:
            return False
        if g["weight"] not in cache:
            cache[g["weight"]] = numpy_helper.to_array(inits[g["weight"]])
        got = _onnx_weight_as_tf(nodes[node_name], cache[g["weight"]], want.shape)
        return got is not None and got.dtype == want.dtype and np.array_equal(got, want)

    placed: dict[str, str] = {}
    taken: set[str] = set()
    for w in KL.wrappers(qmodel):
        if not w._parts:
            continue
        layer = fused_layers[w.name]
        for i, (p, part_name) in enumerate(zip(w._parts, _part_names(w))):
            want = getattr(layer, p.kernel_attr).numpy()
            ops_ = layer_ops.get(w.name, [])
            hit = node_map.get(ops_[i]) if i < len(ops_) else None
            if hit is None or hit in taken or not matches(hit, want):
                cands = [n for n in graph if n not in taken and matches(n, want)]
                hit = cands[0] if len(cands) == 1 else None
            if hit is None:
                if isinstance(w, KL.QuantWrapper) and not p.npu_fp16:
                    raise DoptError(f"quantized layer '{w.name}' could not be located in the "
                                    f"converted ONNX graph", hint="give layers distinct "
                                    "weights (calibrate or train first); if it persists, report "
                                    "it as a bug in dopt with the model definition")
                continue
            placed[part_name] = hit
            taken.add(hit)
    return placed


def _rename(onnx_model, placed: dict[str, str]) -> dict[str, str]:
    """Rename located nodes to their Keras names where that name is free."""
    names = {n.name for n in onnx_model.graph.node}
    by_name = {n.name: n for n in onnx_model.graph.node}
    out = {}
    for part, node_name in placed.items():
        if part != node_name and part in names:
            out[part] = node_name
            continue
        by_name[node_name].name = part
        names.discard(node_name)
        names.add(part)
        out[part] = part
    return out


# -- checks ---------------------------------------------------------------------------
def _run_keras(model, sample: list) -> list[np.ndarray]:
    out = model(sample if len(sample) > 1 else sample[0], training=False)
    return [np.asarray(o) for o in tf.nest.flatten(out)]


def _sample(qmodel, cfg) -> list[np.ndarray]:
    shapes = cfg.input_shapes
    names = KA.input_names(qmodel)
    rng = np.random.default_rng(0)
    out = []
    for n, t in zip(names, qmodel.inputs):
        dims = list(t.shape)[1:]
        if n in shapes:
            dims = [d if d is not None else s for d, s in zip(dims, shapes[n][1:])]
        if any(d is None for d in dims):
            raise DoptError(f"input '{n}' has an unknown dimension, which export needs",
                            file=cfg.path, field="input_shape",
                            hint=f"add \"input_shape\": \"{n}:1,224,224,3\" (the deployed "
                                 "input shape) to the configuration")
        out.append(rng.standard_normal((CHECK_SAMPLES, *dims)).astype(np.float32))
    return out


def generate_final_model(model, config_file, weights_file=None, output_dir="./"):
    """Write ``model_fused.keras``, ``model_fused.onnx``, ``quant_param.json`` and
    ``model_qdq.onnx`` into ``output_dir`` (all or nothing). See the module docstring."""
    import onnx
    cfg = load_config(config_file)
    qmodel = _quantized_model(model, cfg, weights_file)
    KA.check_model(qmodel, "generate_final_model")
    if cfg.input_shape:
        KA.check_input_shape(qmodel, cfg.input_shapes, file=cfg.path)
    _check_matches_config(qmodel, cfg, weights_file)
    sample = _sample(qmodel, cfg)

    with _switched(qmodel, float_path=True, npu_edges=False):
        ref_float = _run_keras(qmodel, sample)
    with _switched(qmodel, float_path=False, npu_edges=False):
        ref_q = _run_keras(qmodel, sample)
        fused = _fused_model(qmodel)
        got_keras = _run_keras(fused, sample)
        fused_onnx, frozen = convert.keras_to_onnx(fused)  # the batch stays free
        _matmul_add_to_gemm(fused_onnx)
        placed = _rename(fused_onnx, _locate(qmodel, fused, frozen, fused_onnx))
        doc = _params(qmodel, cfg, fused_onnx, placed)
    graph = onnx_qdq.graph_layers(fused_onnx)
    P.validate_params(doc, file=PARAM_NAME, graph=graph, expected_layers=list(doc["layers"]))
    qdq = onnx_qdq.build_qdq(fused_onnx, doc)

    check_float(ref_float, got_keras, "the fused float Keras model")
    feeds = dict(zip([i.name for i in fused_onnx.graph.input
                      if i.name not in {x.name for x in fused_onnx.graph.initializer}], sample))
    got_float = onnx_qdq.ort_session(fused_onnx.SerializeToString()).run(None, feeds)
    check_float(ref_float, got_float, "the exported float ONNX model")
    got_q = onnx_qdq.ort_session(qdq.SerializeToString()).run(None, feeds)
    check_quantized(ref_q, got_q, "the QDQ ONNX model on ONNX Runtime")

    with staged_outputs(output_dir) as stage:
        fused.save(str(stage / FUSED_KERAS))
        onnx.save(fused_onnx, str(stage / FUSED_NAME))
        onnx.save(qdq, str(stage / QDQ_NAME))
        P.write_params(stage / PARAM_NAME, doc)
    out = Path(output_dir)
    return {"float_keras": str(out / FUSED_KERAS), "float_onnx": str(out / FUSED_NAME),
            "qdq_onnx": str(out / QDQ_NAME), "param_file": str(out / PARAM_NAME)}


def _params(qmodel, cfg, fused_onnx, placed: dict[str, str]) -> dict:
    """The parameter file: one record per quantized ONNX node, the rest ``float_layers``."""
    doc = P.new_params({"name": "dopt", "version": dopt.__version__, "framework": "keras",
                        "keras": keras.__version__, "tensorflow": tf.__version__,
                        "config": Path(cfg.path).name}, FUSED_NAME)
    nodes = {n.name: n for n in fused_onnx.graph.node}
    for w in KL.quant_wrappers(qmodel):
        for p, part_name in zip(w._parts, _part_names(w)):
            if p.npu_fp16:  # INT8 asked, but the NPU runs it in FP16: a float layer
                continue
            node = nodes[placed[part_name]]
            scale, offset = p.act.qparams()
            wk, _ = w.folded(p)
            s_w = KL.fq.weight_scales(wk, depthwise=p.depthwise).numpy()
            has_bias = len(node.input) > 2 and bool(node.input[2])
            if node.op_type == "MatMul" and getattr(w.layer, "use_bias", False) and p.last:
                warnings.warn(f"dopt: layer '{w.name}' became a MatMul with a separate Add in "
                              f"ONNX; the NPU adds its bias in FP16, not on the int32 grid the "
                              f"fake-quant model uses", stacklevel=3)
            doc["layers"][node.name] = {
                "op_type": node.op_type, "strategy": INT8, "source_layer": w.name,
                "input": {"tensor": node.input[0], "bits": 8, "scale": scale,
                          "offset": offset,
                          "range": [float(np.float32(p.act.lo.numpy())),
                                    float(np.float32(p.act.hi.numpy()))],
                          "algorithm": p.act.algorithm},
                "weight": {"tensor": node.input[1], "bits": 8, "per_channel": True,
                           "symmetric": True, "scales": [float(s) for s in s_w]},
                "bias": {"tensor": node.input[2], "bits": 32} if has_bias else None,
                "folded_bn": w.bn_name if p.last else None,
            }
    graph = onnx_qdq.graph_layers(fused_onnx)
    doc["float_layers"] = sorted(set(graph) - set(doc["layers"]))
    return doc
