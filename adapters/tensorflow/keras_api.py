"""The reference's plugin-mode operations for Keras 3 (TensorFlow backend).

``optimize_model`` returns a *new* model (``keras.models.clone_model`` with the configured
layers wrapped, weights copied), so the user's float model stays as it was; the
optimizer is built on the returned model. See ``keras_layers`` for what the wrappers
compute and ``docs/keras.md`` for the user's view.
"""
from __future__ import annotations

import inspect
import warnings

import keras
import numpy as np
import tensorflow as tf

from dopt.calib.loop import resolve_algorithm
from dopt.formats.strategy_config import (FLOAT, INT8, check_against_model, format_input_shape, load_config,
                         parse_input_shape, write_config)
from dopt.errors import DoptError

from . import keras_layers as KL

STRATEGIES = {op: (FLOAT, INT8) for op in KL.QUANT_CLASSES}


# -- model checks ------------------------------------------------------------------------
def check_backend() -> None:
    if keras.backend.backend() != "tensorflow":
        raise DoptError(f"the dopt Keras adapter needs the TensorFlow backend of Keras 3, "
                        f"but Keras runs on '{keras.backend.backend()}'",
                        hint="set KERAS_BACKEND=tensorflow before importing keras")


def _is_functional(model) -> bool:
    return hasattr(model, "_nodes_by_depth") and hasattr(model, "_operations")


def check_model(model, what: str) -> None:
    """A Functional or Sequential Keras model (subclassed models have no layer graph)."""
    check_backend()
    if not isinstance(model, keras.Model):
        raise DoptError(f"{what} expects a Keras model", found=type(model).__name__,
                        hint="pass a keras.Model built with the functional API or "
                             "keras.Sequential")
    if isinstance(model, keras.Sequential):
        if getattr(model, "_functional", None) is None:
            raise DoptError(f"{what} was given a Sequential model that is not built",
                            found=model.name, hint="give it an input: keras.Sequential("
                            "[keras.Input(shape), ...]) or call model.build(input_shape)")
        return
    if not _is_functional(model):
        raise DoptError(f"{what} was given a subclassed Keras model ({type(model).__name__}), "
                        "whose layer graph dopt cannot see", found=type(model).__name__,
                        hint="build the network as a functional model (keras.Model(inputs, "
                             "outputs)) or a keras.Sequential; both can reuse your layers")


def _graph(model):
    return model._functional if isinstance(model, keras.Sequential) else model


def _sub_models(model):
    yield model
    for layer in model.layers:
        if isinstance(layer, keras.Model) and not isinstance(layer, KL._DoptWrapper):
            yield from _sub_models(layer)


def quantizable_layers(model) -> dict[str, str]:
    """``{layer name: op_type}`` of every quantizable layer, nested models included."""
    out: dict[str, str] = {}
    seen: set[str] = set()
    for layer in KL.walk_layers(model):
        if layer.name in seen:
            raise DoptError(f"layer name '{layer.name}' is used twice in the model (in nested "
                            f"models)", hint="give every layer a unique name= so that the "
                            "configuration can address it")
        seen.add(layer.name)
        t = KL.op_type(layer)
        if t is not None:
            out[layer.name] = t
    return out


def _history_op(t):
    return t._keras_history.operation


def conv_bn_pairs(model) -> dict[str, str]:
    """``{conv name: bn name}`` where a convolution (linear activation) is called once and
    its output feeds exactly one BatchNormalization (called once, normalizing the channel
    axis) and nothing else - not even the model outputs."""
    pairs: dict[str, str] = {}
    for sub in _sub_models(model):
        g = _graph(sub)
        if g is None or not hasattr(g, "_nodes_by_depth"):
            continue
        calls: dict[int, int] = {}
        consumers: dict[int, list] = {}
        for nodes in g._nodes_by_depth.values():
            for node in nodes:
                op = node.operation
                calls[id(op)] = calls.get(id(op), 0) + 1
                for t in node.input_tensors:
                    consumers.setdefault(id(_history_op(t)), []).append(op)
        outputs = {id(_history_op(t)) for t in g.outputs}
        for layer in g.operations:
            t = KL.op_type(layer)
            if t not in KL.CONV_CLASSES or calls.get(id(layer)) != 1 or id(layer) in outputs:
                continue
            if getattr(layer, "activation", None) not in (None, keras.activations.linear):
                continue
            users = consumers.get(id(layer), [])
            if len(users) != 1 or not isinstance(users[0], keras.layers.BatchNormalization):
                continue
            bn = users[0]
            axis = bn.axis if isinstance(bn.axis, int) else (bn.axis[0] if len(bn.axis) == 1
                                                             else None)
            ch_axis = 1 if KL._channels_first(layer) else 3
            if axis not in (ch_axis, ch_axis - 4) or calls.get(id(bn)) != 1:
                continue
            pairs[layer.name] = bn.name
    return pairs


def input_names(model) -> list[str]:
    """Keras input tensor names: the frozen graph's placeholders and the ONNX inputs."""
    return [getattr(t, "name", None) or f"input_{i}" for i, t in enumerate(model.inputs)]


def check_input_shape(model, shapes: dict, *, file=None, field="input_shape") -> None:
    names = input_names(model)
    for n, dims in shapes.items():
        if n not in names:
            raise DoptError(f"input_shape names input '{n}', which the model does not have",
                            file=file, field=field, expected=f"one of {names}",
                            hint=f"use the Keras input names, e.g. '{names[0]}:1,224,224,3'")
        t = model.inputs[names.index(n)]
        want = list(t.shape)
        if len(want) != len(dims) or any(w is not None and w != d
                                         for w, d in zip(want[1:], dims[1:])):
            raise DoptError(f"input_shape gives input '{n}' the shape "
                            f"{','.join(map(str, dims))}, but the model's input is "
                            f"{','.join('?' if w is None else str(w) for w in want)}",
                            file=file, field=field, hint="Keras inputs are NHWC: "
                            "batch,height,width,channels")
    missing = [n for n in names if n not in shapes]
    if missing:
        raise DoptError(f"input_shape gives no shape for input(s) {', '.join(missing)}",
                        file=file, field=field)


def default_input_shape(model) -> str | None:
    """``name:1,d1,d2,...`` for every input, or None when a dimension is unknown."""
    shapes = {}
    for n, t in zip(input_names(model), model.inputs):
        dims = list(t.shape)[1:]
        if any(d is None for d in dims):
            return None
        shapes[n] = (1, *dims)
    return format_input_shape(shapes)


# -- the five operations ----------------------------------------------------------------
def generate_config_file(model, dst_path="./config_gen.json", input_shape=None):
    """Write the reference JSON: hints, ``input_shape`` and one ``float`` entry per layer."""
    check_model(model, "generate_config_file")
    if is_quantized(model):
        raise DoptError("generate_config_file was given a model already processed by "
                        "optimize_model", hint="pass the float model")
    if input_shape is not None:
        shapes = parse_input_shape(input_shape)
        check_input_shape(model, shapes)
        shape_text = format_input_shape(shapes)
    else:
        shape_text = default_input_shape(model)
    layers = quantizable_layers(model)
    if not layers:
        raise DoptError(f"model '{model.name}' has no quantizable layer",
                        expected="at least one " + ", ".join(KL.QUANT_CLASSES))
    return write_config(dst_path, layers, {k: list(v) for k, v in STRATEGIES.items()},
                        shape_text)


def is_quantized(model) -> bool:
    """True for a model returned by ``optimize_model`` (or loaded from one's .keras)."""
    return any(True for _ in KL.wrappers(model)) if isinstance(model, keras.Model) else False


def _cin(layer) -> int:
    """Input channels of the layer's (first) convolution kernel."""
    k = layer.depthwise_kernel if KL.op_type(layer) == "SeparableConv2D" else layer.kernel
    shape = tuple(k.shape)
    if KL.op_type(layer) in ("DepthwiseConv2D", "SeparableConv2D"):
        return int(shape[-2])
    return int(shape[-2]) * int(getattr(layer, "groups", 1) or 1)


def npu_skips_int8(layers: dict) -> list[str]:
    """Quantized layers the NPU will run in FP16 anyway (profile rule ``int8_min_cin``)."""
    from dopt.npu.profile import load_profile
    from dopt.npu.rules import int8_skip_reason, int8_skipped
    profile = load_profile()
    out = []
    for name, layer in layers.items():
        t = KL.op_type(layer)
        if t == "Conv2D":
            cin, groups = _cin(layer), int(getattr(layer, "groups", 1) or 1)
        elif t == "SeparableConv2D":  # the depthwise half is exempt; the pointwise is not
            cin, groups = int(layer.pointwise_kernel.shape[-2]), 1
            name = f"{name}/pointwise"
        else:
            continue
        if int8_skipped(cin, groups, profile):
            out.append(f"{name} ({int8_skip_reason(cin, profile)})")
    return out


def _copy_layer(layer):
    new = layer.__class__.from_config(layer.get_config())
    return new


def _unsupported(layer) -> str | None:
    if getattr(layer, "quantization_mode", None):
        return f"it is already quantized by Keras (quantization_mode={layer.quantization_mode!r})"
    if getattr(layer, "dtype_policy", None) is not None and \
            getattr(layer.dtype_policy, "compute_dtype", "float32") != "float32":
        return f"it computes in {layer.dtype_policy.compute_dtype} (mixed precision)"
    return None


def optimize_model(model, config_path):
    """A new model with fake-quant on the configured layers (see keras_layers)."""
    check_model(model, "optimize_model")
    if is_quantized(model):
        raise DoptError("optimize_model was given a model that is already optimized",
                        hint="pass the float model built afresh")
    cfg = load_config(config_path)
    if cfg.input_shape:
        check_input_shape(model, cfg.input_shapes, file=cfg.path)
    check_against_model(cfg, quantizable_layers(model), STRATEGIES, resolve_algorithm)
    quantized = cfg.quantized_layers()
    by_name = {layer.name: layer for layer in KL.walk_layers(model)}
    for name in quantized:
        why = _unsupported(by_name[name])
        if why:
            raise DoptError(f"layer '{name}' cannot be quantized: {why}", file=cfg.path,
                            field=f"layer_strategy.{name}",
                            hint="set it to 'float' or use the plain float32 layer")
    narrow = npu_skips_int8({n: by_name[n] for n in quantized})
    if narrow:
        warnings.warn(f"dopt: INT8 requested for layer(s) {', '.join(narrow)}; dopt simulates "
                      f"them as the NPU's FP16 kernel in training and inference and exports "
                      f"them as float layers (no INT8 parameters); set them to 'float' in the "
                      f"config to silence this", stacklevel=2)
    pairs = conv_bn_pairs(model)
    bn_of = {by_name[c].name: by_name[b] for c, b in pairs.items()}
    paired_bns = {b for b in pairs.values()}
    qset = set(quantized)

    def clone(layer):
        name = layer.name
        if name in paired_bns:
            return keras.layers.Identity(name=name)
        bn = bn_of.get(name)
        bn_copy = _copy_layer(bn) if bn is not None else None
        if name in qset:
            return KL.QuantWrapper(_copy_layer(layer), bn=bn_copy,
                                   algorithm=cfg.range_algorithm(name), name=name)
        if KL.op_type(layer) is not None or isinstance(layer, keras.layers.BatchNormalization):
            return KL.NpuFloatWrapper(_copy_layer(layer), bn=bn_copy, name=name)
        return _copy_layer(layer)

    try:
        qmodel = clone_with(model, clone)
    except DoptError:
        raise
    except Exception as e:  # noqa: BLE001 - a layer Keras cannot re-create from its config
        raise DoptError(f"the model could not be rebuilt with quantization wrappers "
                        f"({e.__class__.__name__}: {str(e).splitlines()[0][:200]})",
                        hint="every layer must round-trip through get_config()/from_config() "
                             "(custom layers: implement get_config and register them)") from None
    _copy_weights(model, qmodel, bn_of)
    return qmodel


def clone_with(model, clone_function):
    """``keras.models.clone_model`` with ``_call`` (Sequential models take no call_function:
    they call each layer with the arguments it accepts anyway)."""
    extra = {} if isinstance(model, keras.Sequential) else {"call_function": _call}
    return keras.models.clone_model(model, clone_function=clone_function, recursive=True,
                                    **extra)


def _call(layer, *args, **kwargs):
    """Call a cloned layer with the recorded call arguments it accepts (a BN's node records
    ``mask=``, which the Identity taking its place does not take)."""
    if isinstance(layer, (KL._DoptWrapper, keras.layers.Identity)):
        accepted = inspect.signature(layer.call).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    return layer(*args, **kwargs)


def _assign_all(dst_vars, src_vars, what: str) -> None:
    if len(dst_vars) != len(src_vars):
        raise DoptError(f"layer '{what}' has {len(src_vars)} weights but its copy has "
                        f"{len(dst_vars)}",
                        hint="the layer creates a different number of weights when rebuilt "
                             "from its get_config(); make get_config() return every "
                             "constructor argument that shapes its weights")
    for d, s in zip(dst_vars, src_vars):
        d.assign(s)


def _copy_weights(src_model, dst_model, bn_of: dict) -> None:
    """Values from the float model into the clone (wrappers: inner layer and BN)."""
    src = {layer.name: layer for layer in KL.walk_layers(src_model)}
    for layer in KL.walk_layers(dst_model):
        if isinstance(layer, KL._DoptWrapper):
            _assign_all(layer.layer.weights, src[layer.name].weights, layer.name)
            if layer.bn is not None:
                _assign_all(layer.bn.weights, bn_of[layer.name].weights, layer.bn.name)
        elif isinstance(layer, keras.layers.Identity) and not isinstance(
                src.get(layer.name), keras.layers.Identity):
            continue  # a folded BN: its weights went into the wrapper
        elif layer.name in src:
            _assign_all(layer.weights, src[layer.name].weights, layer.name)


def _require_quantized(model, what: str) -> None:
    if not isinstance(model, keras.Model) or not is_quantized(model):
        raise DoptError(f"{what} needs the model returned by optimize_model",
                        found=type(model).__name__)


def set_calibrate_state(model, calibrate: bool):
    """True: forward passes (``model.predict``, ``model(x)``) run the float network and
    collect input statistics. False: each range is set from its observer.

    Calibrate in inference (``predict`` or ``model(x)``): nothing else moves then.
    """
    _require_quantized(model, "set_calibrate_state")
    calibrate = bool(calibrate)
    uncalibrated = []
    for w in KL.wrappers(model):
        w._sw.npu_edges.assign(not calibrate)
        if isinstance(w, KL.QuantWrapper):
            for part in w.int8_parts:
                if calibrate:
                    part.act.start()
                elif part.act.collect and not part.act.finish():
                    uncalibrated.append(range_key(w, part))
            w._sw.float_path.assign(calibrate)
    if uncalibrated:
        warnings.warn("dopt: no calibration data reached layer(s) "
                      f"{', '.join(uncalibrated)}; their ranges stay unset", stacklevel=2)
    return model


def freeze_bn_stats(model, freeze: bool = True):
    """Stop (or resume) BN statistics updates in folded quantized layers during QAT.

    Frozen, a folded layer computes exactly the exported convolution (moving statistics
    folded in): the usual second phase of QAT.
    """
    _require_quantized(model, "freeze_bn_stats")
    for w in KL.quant_wrappers(model):
        w._sw.freeze_bn.assign(bool(freeze))
    return model


def get_quant_loss(model):
    """Mean squared weight rounding error in units of each layer's quantization step.

    Each quantized layer (each half of a SeparableConv2D) contributes
    ``mean(((w - fq(w)) / s_w)^2)`` (in [0, 0.25]) on the deployed (BN-folded) weight; its
    gradient pulls weights towards their grid points. A scalar tensor, differentiable,
    usable inside ``tf.function``; exactly 0 when no layer is quantized.
    """
    _require_quantized(model, "get_quant_loss")
    terms = [t for w in KL.quant_wrappers(model) for t in w.quant_loss_terms()]
    if not terms:
        return tf.zeros((), tf.float32)
    return tf.add_n(terms) / float(len(terms))


def ranges(model) -> dict[str, tuple[float, float] | None]:
    """``{layer (or layer/pointwise): (lo, hi)}`` of every INT8 part; None where no range
    is set yet. A part the NPU runs in FP16 has no range."""
    out = {}
    for w in KL.quant_wrappers(model):
        for part in w.int8_parts:
            act = part.act
            out[range_key(w, part)] = ((float(np.float32(act.lo.numpy())),
                                        float(np.float32(act.hi.numpy()))) if act.is_set else None)
    return out


def range_key(w, part) -> str:
    """How ``ranges`` and messages name a part: the layer, or ``layer/pointwise``."""
    return w.name + ("/pointwise" if part.kind == "pointwise" else "")
