"""The reference's PyTorch plugin-mode operations."""
from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

from dopt.calib.loop import range_observer, resolve_algorithm
from dopt.formats.strategy_config import (check_against_model, format_input_shape, load_config,
                         parse_input_shape, write_config)
from dopt.errors import DoptError

from . import fake_quant as fq, layers as L, npu_edges
from .modules import ActQuantizer, QuantConv2d, QuantLinear, quant_layers

INFO_ATTR = "dopt_quant_info"


def _reject_wrapped(model, what: str):
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise DoptError(f"{what} was given a model wrapped in {type(model).__name__}",
                        expected="the bare nn.Module", hint="call it before wrapping, then wrap "
                        "the returned model (build the optimizer on the returned model)")


def unwrap(model):
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel,
                                              nn.DataParallel)) else model


def check_input_names(model: nn.Module, shapes: dict, *, file=None, field="input_shape"):
    """Input names are ``forward()`` argument names, as in the reference."""
    try:
        all_params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_POSITIONAL for p in all_params):
        return
    params = [p for p in all_params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params]
    for n in shapes:
        if n not in names:
            raise DoptError(f"input_shape names input '{n}', which is not an argument of "
                            f"{type(model).__name__}.forward", file=file, field=field,
                            expected=f"one of {names}",
                            hint="use the forward() argument names, e.g. "
                                 f"'{names[0] if names else 'x'}:1,3,224,224'")
    if len(shapes) < len([p for p in params if p.default is p.empty]):
        missing = [p.name for p in params if p.default is p.empty and p.name not in shapes]
        raise DoptError(f"input_shape gives no shape for forward() argument(s) "
                        f"{', '.join(missing)}", file=file, field=field)


def generate_config_file(model, input_shape, dst_path):
    _reject_wrapped(model, "generate_config_file")
    if not isinstance(model, nn.Module):
        raise DoptError("generate_config_file expects a torch.nn.Module",
                        found=type(model).__name__)
    shapes = parse_input_shape(input_shape)
    check_input_names(model, shapes)
    layers = L.quantizable_layers(model)
    if not layers:
        raise DoptError(f"{type(model).__name__} has no quantizable layer",
                        expected="at least one nn.Conv2d or nn.Linear")
    return write_config(dst_path, layers, {k: list(v) for k, v in L.STRATEGIES.items()},
                        format_input_shape(shapes))


def npu_skips_int8(mods: dict, names) -> list[str]:
    """Convolutions the target NPU would run in FP16 even if asked for INT8 (profile rule)."""
    from dopt.npu.profile import load_profile
    from dopt.npu.rules import int8_skipped
    profile = load_profile()
    return [n for n in names if isinstance(mods[n], nn.Conv2d)
            and int8_skipped(mods[n].in_channels, mods[n].groups, profile)]


def optimize_model(model, config_path):
    _reject_wrapped(model, "optimize_model")
    if getattr(model, INFO_ATTR, None) is not None:
        raise DoptError("optimize_model was given a model that is already optimized",
                        hint="pass the float model built afresh")
    cfg = load_config(config_path)
    if cfg.input_shape:
        check_input_names(model, cfg.input_shapes, file=cfg.path)
    check_against_model(cfg, L.quantizable_layers(model), L.STRATEGIES, resolve_algorithm)
    quantized = cfg.quantized_layers()
    mods = dict(model.named_modules())
    narrow = npu_skips_int8(mods, quantized)
    if narrow:
        warnings.warn(f"layer(s) {', '.join(narrow)}: the NPU runs INT8 convolutions only for "
                      f"Cin > 16 and will run these in FP16, so the fake-quant model will not "
                      f"predict the compiled one there; set them to 'float' in the config",
                      stacklevel=2)
    all_pairs = L.conv_bn_pairs(model)
    pairs = {c: b for c, b in all_pairs.items() if c in quantized}
    for name in quantized:
        m = mods[name]
        alg = cfg.range_algorithm(name)
        act = ActQuantizer(range_observer(alg, default=None), alg)
        if isinstance(m, nn.Conv2d):
            bn_name = pairs.get(name)
            bn = mods[bn_name] if bn_name else None
            q = QuantConv2d(m, act, bn, bn_name)
            if bn_name:
                L.set_module(model, bn_name, nn.Identity())
        else:
            q = QuantLinear(m, act)
        q.to(next(m.parameters()).device)
        L.set_module(model, name, q)
    edges = npu_edges.install(model, set(quantized), all_pairs)
    setattr(model, INFO_ATTR, {"config": cfg.path, "quantized": quantized, "bn_pairs": pairs,
                               "npu_edges": edges,
                               "input_shape": cfg.input_shape})
    return model


def set_calibrate_state(model, calibrate: bool):
    inner = unwrap(model)
    if getattr(inner, INFO_ATTR, None) is None:
        raise DoptError("set_calibrate_state needs the model returned by optimize_model",
                        found=type(inner).__name__)
    # Calibration only observes: nothing else (BN running statistics, dropout) may move,
    # so the model runs in eval mode until calibration ends, then gets its mode back.
    info = getattr(inner, INFO_ATTR)
    info["npu_edges"].on = not calibrate
    if calibrate and "mode_before_calibration" not in info:
        info["mode_before_calibration"] = model.training
        model.eval()
    elif not calibrate and "mode_before_calibration" in info:
        model.train(info.pop("mode_before_calibration"))
    uncalibrated = []
    for name, q in quant_layers(inner):
        if calibrate:
            q.act.start_calibration()
        elif q.act.calibrating and not q.act.finish_calibration():
            uncalibrated.append(name)
    if uncalibrated:
        warnings.warn("dopt: no calibration data reached layer(s) "
                      f"{', '.join(uncalibrated)}; their ranges stay unset", stacklevel=3)
    return model


def freeze_bn_stats(model, freeze: bool = True):
    """Stop (or resume) BN statistics updates in folded conv layers during QAT.

    Frozen, a folded layer computes exactly the exported convolution (running
    statistics folded in), the usual second phase of QAT.
    """
    inner = unwrap(model)
    for _, q in quant_layers(inner):
        if isinstance(q, QuantConv2d):
            q.freeze_bn_stats = bool(freeze)
    return model


def get_quant_loss(model):
    """Mean squared weight rounding error in units of each layer's quantization step.

    Each quantized layer contributes ``mean(((w - fq(w)) / s_w)^2)`` (in [0, 0.25]);
    the gradient pulls weights towards their grid points, which shrinks the
    deployed model's weight error. Exactly 0 when no layer is quantized.
    """
    inner = unwrap(model)
    if getattr(inner, INFO_ATTR, None) is None:
        raise DoptError("get_quant_loss needs the model returned by optimize_model",
                        found=type(inner).__name__)
    terms = []
    for _, q in quant_layers(inner):
        w, _b = q.folded()
        s_w = fq.weight_scales(w)
        s = s_w.reshape([-1] + [1] * (w.dim() - 1))
        err = (w - fq.fake_quant_weight(w.detach(), s_w)) / s
        terms.append(err.pow(2).mean())
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()
