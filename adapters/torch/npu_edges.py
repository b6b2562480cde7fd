"""Float layers in eval mode as the NPU runs them: BN folded, FP16 weights, FP16 output.

A layer left float in the config is compiled to an FP16 NPU kernel: Conv (+ BN folded
in float32) with weights and bias cast to FP16, output rounded to FP16. Forward hooks
reproduce that in eval mode, so that the fake-quant model predicts the compiled INT8
model (quantized layers do the same at their edges, see ``modules._QuantLayer``).
Training is untouched; ``_QuantLayer.npu_edges = False`` switches the emulation off.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .modules import _QuantLayer, conv2d_as, fold_bn, round_fp16 as _fp16


class EvalHooks:
    """Forward hooks that act only in eval mode, registered only while one may act.

    A module with any forward hook takes PyTorch's slow call path. The quant model of a
    MobileNetV2 carries about 180 of these hooks (the float layers' emulation here, the
    ``Fp16Ops`` pauses of ``api._install_fp16_ops``), and in a training step, where each
    returns at once, they cost about 5 ms. The model's own forward pre-hook (``_sync``)
    registers them before a forward in which some hooked module is in eval mode with the
    emulation on, and removes them before one in which none is. They are registered
    ahead of hooks added since (``prepend``), in the order they were added.
    """

    def __init__(self):
        self._specs: list[tuple] = []      # (module, hook, pre, register kwargs)
        self._handles: list = []
        self._modules: list | None = None

    def add(self, module: nn.Module, hook, *, pre: bool = False, **kwargs) -> None:
        self._specs.append((module, hook, pre, kwargs))
        self._modules = None

    def modules(self) -> list:
        if self._modules is None:
            seen = {}
            for m, *_ in self._specs:
                seen.setdefault(id(m), m)
            self._modules = list(seen.values())
        return self._modules

    def sync(self, need: bool) -> None:
        if need and not self._handles:
            for module, hook, pre, kwargs in reversed(self._specs):
                register = module.register_forward_pre_hook if pre \
                    else module.register_forward_hook
                self._handles.append(register(hook, prepend=True, **kwargs))
        elif not need and self._handles:
            for h in self._handles:
                h.remove()
            self._handles = []


class _State:
    """Per model: off while calibrating (calibration observes the float network)."""

    def __init__(self):
        self.on = True
        self.hooks = EvalHooks()

    def active(self, module) -> bool:
        return self.on and not module.training and _QuantLayer.npu_edges


def _sync(st: _State, model: nn.Module, args) -> None:
    """The model's forward pre-hook: the eval-mode hooks registered iff one may act."""
    need = st.on and _QuantLayer.npu_edges and (
        not model.training or any(not m.training for m in st.hooks.modules()))
    st.hooks.sync(need)


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
    """Eval-mode hooks (``EvalHooks``) on every float Conv2d / Linear / BatchNorm2d of
    ``model``, registered by the model's pre-hook when they may act."""
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
            st.hooks.add(m, _conv_hook(bn, st))
        elif isinstance(m, nn.Linear):
            st.hooks.add(m, _linear_hook(st))
    for name, m in mods.items():
        if isinstance(m, nn.BatchNorm2d):
            st.hooks.add(m, _bn_passthrough(st) if name in paired_bns else _bn_alone(st))
    # a partial, not a closure: a deep copy of the model gets its own state (and hooks)
    model.register_forward_pre_hook(partial(_sync, st))
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
