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
from .modules import (ActQuantizer, Fp16Ops, NpuFp16Conv2d, QuantConv2d, QuantLinear, _QuantLayer,
                      npu_fp16_layers, quant_layers, round_fp16)

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
    return list(_npu_fp16_reasons(mods, names))


def _npu_fp16_reasons(mods: dict, names) -> dict[str, str]:
    """``{name: why}`` for the convolutions among ``names`` that ``dopt.npu.rules.int8_skipped``
    keeps in FP16 on the target NPU, in the rule's own words."""
    from dopt.npu.profile import load_profile
    from dopt.npu.rules import int8_skip_reason, int8_skipped
    profile = load_profile()
    return {n: int8_skip_reason(mods[n].in_channels, profile) for n in names
            if isinstance(mods[n], nn.Conv2d)
            and int8_skipped(mods[n].in_channels, mods[n].groups, profile)}


def _install_fp16_ops(model: nn.Module, edges) -> None:
    """Eval mode as the NPU computes between the weighted layers: the model's inputs are
    read as FP16 (converted on the way in) and every op's output is rounded to FP16
    (``Fp16Ops``, active for the duration of the model's forward), except inside the
    modules that reproduce the NPU's arithmetic themselves."""
    mode = Fp16Ops()
    entered = []

    def rnd(v):
        return round_fp16(v) if torch.is_tensor(v) and v.is_floating_point() else v

    def enter(module, args, kwargs):
        if not edges.active(module) or entered:
            return None
        mode.__enter__()
        entered.append(True)
        return tuple(rnd(a) for a in args), {k: rnd(v) for k, v in kwargs.items()}

    def leave(module, args, output):
        if entered:
            entered.pop()
            mode.__exit__(None, None, None)
        return None

    def pause(module, args):
        mode.paused += 1

    def resume(module, args, output):
        mode.paused = max(0, mode.paused - 1)
        return None

    model.register_forward_pre_hook(enter, with_kwargs=True)
    model.register_forward_hook(leave, always_call=True)
    # the pauses matter only while the mode is on (eval): registered with the float
    # layers' eval-mode hooks, only when one of them may act (``npu_edges.EvalHooks``)
    for m in model.modules():
        if isinstance(m, (_QuantLayer, NpuFp16Conv2d, nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            edges.hooks.add(m, pause, pre=True)
            edges.hooks.add(m, resume, always_call=True)


def _clamps_out_of_place(model: nn.Module) -> None:
    """ReLU6 / Hardtanh modules set ``inplace=True`` run out of place in the quant model.

    Under autograd the in-place clamp first copies its input (its backward needs the
    values it overwrites), so in place costs one full pass more than out of place; the
    values are the same. Measured in QAT (``docs/benchmarks.md``)."""
    for m in model.modules():
        if isinstance(m, nn.Hardtanh) and m.inplace:
            m.inplace = False


def optimize_model(model, config_path):
    """Wrap the configured layers (see ``modules``) and install the NPU's float numerics.

    A convolution configured INT8 that the NPU runs in FP16 (Cin too small, the hardware
    profile's ``int8_min_cin``) becomes an ``NpuFp16Conv2d``: simulated as that FP16 kernel
    in training and inference, exported as a float layer (no INT8 record), so the
    fake-quant model predicts the compiled one whatever the configuration asks.
    """
    _reject_wrapped(model, "optimize_model")
    if getattr(model, INFO_ATTR, None) is not None:
        raise DoptError("optimize_model was given a model that is already optimized",
                        hint="pass the float model built afresh")
    cfg = load_config(config_path)
    if cfg.input_shape:
        check_input_names(model, cfg.input_shapes, file=cfg.path)
    check_against_model(cfg, L.quantizable_layers(model), L.STRATEGIES, resolve_algorithm)
    requested = cfg.quantized_layers()
    mods = dict(model.named_modules())
    narrow = _npu_fp16_reasons(mods, requested)
    if narrow:
        warnings.warn(f"dopt: INT8 requested for layer(s) "
                      f"{', '.join(f'{n} ({why})' for n, why in narrow.items())}; dopt "
                      f"simulates them as the NPU's FP16 kernel in training and inference and "
                      f"exports them as float layers (no INT8 parameters); set them to 'float' "
                      f"in the config to silence this", stacklevel=2)
    quantized = [n for n in requested if n not in narrow]
    all_pairs = L.conv_bn_pairs(model)
    pairs = {c: b for c, b in all_pairs.items() if c in requested}
    for name in requested:
        m = mods[name]
        bn_name = pairs.get(name)
        bn = mods[bn_name] if bn_name else None
        if name in narrow:
            q = NpuFp16Conv2d(m, bn, bn_name, narrow[name])
        elif isinstance(m, nn.Conv2d):
            alg = cfg.range_algorithm(name)
            q = QuantConv2d(m, ActQuantizer(range_observer(alg, default=None), alg), bn, bn_name)
        else:
            alg = cfg.range_algorithm(name)
            q = QuantLinear(m, ActQuantizer(range_observer(alg, default=None), alg))
        if bn_name:
            L.set_module(model, bn_name, nn.Identity())
        q.to(next(m.parameters()).device)
        L.set_module(model, name, q)
    edges = npu_edges.install(model, set(requested), all_pairs)
    _install_fp16_ops(model, edges)
    _clamps_out_of_place(model)
    setattr(model, INFO_ATTR, {"config": cfg.path, "quantized": quantized, "bn_pairs": pairs,
                               "npu_fp16": narrow, "npu_edges": edges,
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
    for _, m in npu_fp16_layers(inner):
        m.calibrating = bool(calibrate)
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
    for _, q in list(quant_layers(inner)) + list(npu_fp16_layers(inner)):
        if isinstance(q, (QuantConv2d, NpuFp16Conv2d)):
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
