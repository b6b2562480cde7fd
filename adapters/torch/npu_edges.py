"""Float layers in eval mode as the NPU runs them: BN folded, FP16 weights, FP16 output.

A layer left float in the config is compiled to an FP16 NPU kernel: Conv (+ BN folded
in float32) with weights and bias cast to FP16, output rounded to FP16. Forward hooks
reproduce that in eval mode, so that the fake-quant model predicts the compiled INT8
model (quantized layers do the same at their edges, see ``modules._QuantLayer``).
Training is untouched; ``_QuantLayer.npu_edges = False`` switches the emulation off.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .modules import _QuantLayer, conv2d_as, fold_bn, round_fp16 as _fp16


class _State:
    """Per model: off while calibrating (calibration observes the float network)."""

    def __init__(self):
        self.on = True

    def active(self, module) -> bool:
        return self.on and not module.training and _QuantLayer.npu_edges


def _conv_hook(bn, st: _State):
    def hook(conv, inputs, output):
        if not st.active(conv):
            return output
        w, b = conv.weight, conv.bias
        if bn is not None:
            w, b = fold_bn(w, b, bn)
        if b is None:
            b = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        return _fp16(conv2d_as(conv, _fp16(inputs[0]), _fp16(w), _fp16(b)))
    return hook


def _bn_passthrough(st: _State):
    def hook(bn, inputs, output):
        """The paired convolution already applied this BN (folded)."""
        return inputs[0] if st.active(bn) else output
    return hook


def _linear_hook(st: _State):
    def hook(lin, inputs, output):
        if not st.active(lin):
            return output
        b = None if lin.bias is None else _fp16(lin.bias)
        return _fp16(F.linear(_fp16(inputs[0]), _fp16(lin.weight), b))
    return hook


def _bn_alone(st: _State):
    def hook(bn, inputs, output):
        return _fp16(output) if st.active(bn) else output
    return hook


def install(model: nn.Module, quantized, pairs: dict[str, str]) -> _State:
    """Hooks on every float Conv2d / Linear / BatchNorm2d of ``model``."""
    st = _State()
    mods = dict(model.named_modules())
    paired_bns = set()
    for name, m in mods.items():
        if name in quantized:
            continue
        if isinstance(m, nn.Conv2d):
            bn = mods.get(pairs.get(name, ""))
            if isinstance(bn, nn.BatchNorm2d):
                paired_bns.add(pairs[name])
            else:
                bn = None
            m.register_forward_hook(_conv_hook(bn, st))
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(_linear_hook(st))
    for name, m in mods.items():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(_bn_passthrough(st) if name in paired_bns else _bn_alone(st))
    return st


@contextmanager
def npu_numerics(on: bool):
    """Switch the eval-mode NPU emulation (both quantized and float layers) on or off."""
    old = _QuantLayer.npu_edges
    _QuantLayer.npu_edges = on
    try:
        yield
    finally:
        _QuantLayer.npu_edges = old
