"""Modules that replace the user's configured layers inside ``optimize_model``.

``QuantConv2d``/``QuantLinear`` hold the user's original layer (and, for a
convolution, the BatchNorm that follows it) so parameter and buffer values carry
over, an input ``ActQuantizer`` and per-channel weight fake-quant.

BatchNorm folding follows the usual simulated-folding scheme: in training the
convolution runs with the folded, quantized weight rescaled by ``1/f`` (``f = gamma /
sigma``) so BN normalises the unfolded output with batch statistics (running
statistics keep updating); in eval, or
once ``freeze_bn_stats`` is set, it computes exactly the folded layer that is
exported - weight ``w * gamma / sigma``, bias ``beta + (b - mu) * gamma / sigma``,
int32-quantized bias.

``NpuFp16Conv2d`` takes the place of a convolution configured INT8 that the NPU runs in
FP16 anyway (``dopt.npu.rules.int8_skipped``: Cin too small for INT8 to pay): it holds the
layer and its BatchNorm like ``QuantConv2d`` but simulates that FP16 kernel - weights,
bias, input and output rounded to FP16 - in training (straight-through gradients) and in
inference, so that neither QAT nor the fake-quant model counts on an INT8 step the
compiled model will not have. It carries no quantization parameters and is exported as a
float layer.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import fake_quant as fq


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ActQuantizer(nn.Module):
    """Per-tensor asymmetric INT8 fake-quant of a layer input with a learnable range."""

    def __init__(self, observer_factory, algorithm: str = "minmax"):
        super().__init__()
        self.lo = nn.Parameter(torch.zeros(()))
        self.hi = nn.Parameter(torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))
        self.algorithm = algorithm
        self._factory = observer_factory
        self.observer = observer_factory()
        self.calibrating = False

    def extra_repr(self):
        return f"algorithm={self.algorithm}, range=[{self.lo.item():.4g}, {self.hi.item():.4g}]"

    def start_calibration(self):
        self.observer = self._factory()
        self.calibrating = True

    def finish_calibration(self) -> bool:
        """Merge the observers of all ranks (same order everywhere) and fix the range."""
        self.calibrating = False
        state = self.observer.state()
        if _distributed():
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
            merged = self._factory()
            for s in states:
                merged.merge(s)
            self.observer = merged
        if self.observer.empty:
            return False
        lo, hi = self.observer.range()
        with torch.no_grad():
            self.lo.fill_(lo)
            self.hi.fill_(hi)
            self.initialized.fill_(1)
        return True

    def qparams(self) -> tuple[float, float]:
        """(scale, offset) now in force, the core's exact float32 values."""
        return fq.activation_qparams_float(self.lo.item(), self.hi.item())

    def forward(self, x):
        if self.calibrating:
            self.observer.update(x.detach().float().cpu().numpy())
            return x
        if not self.initialized:
            # QAT without a calibration pass: start from this batch (all ranks agree)
            self.start_calibration()
            self.observer.update(x.detach().float().cpu().numpy())
            self.finish_calibration()
        return fq.fake_quant_activation(x, self.lo, self.hi)


class _QuantLayer(nn.Module):
    """Shared logic: input quantizer, weight fake-quant, calibration passthrough.

    In eval mode the layer also reproduces the NPU's data types at its edges: the
    Quantize op reads FP16 data and Dequantize writes FP16, so the input is rounded to
    FP16 before quantization and the output after. This is what lets the fake-quant
    model predict the compiled INT8 model's top-1 on >= 99.9 % of inputs.
    ``npu_edges = False`` turns it off (the QDQ ONNX check compares float32 forms).
    """

    npu_edges = True

    def __init__(self, layer, act: ActQuantizer):
        super().__init__()
        self.layer = layer
        self.act = act

    @property
    def calibrating(self) -> bool:
        return self.act.calibrating

    def folded(self):
        """(weight, bias) as deployed: BN folded where present. Differentiable."""
        return self.layer.weight, self.layer.bias

    def quantized_params(self):
        """(fake-quant weight, fake-quant bias, weight scales) of the deployed layer."""
        w, b = self.folded()
        wq, s_w = fq.fake_quant_weight_per_channel(w)
        if b is not None:
            scale, _ = self.act.qparams()
            b = fq.fake_quant_bias(b, scale, s_w)
        return wq, b, s_w


def round_fp16(t):
    """Round to IEEE half (nearest even), carried as float32: the NPU's FP16 data."""
    return t.half().float()


class _RoundFp16STE(torch.autograd.Function):
    """One autograd node: two casts forward, the gradient passed through untouched (the
    ``t + (r - t).detach()`` form costs two more full passes and two more nodes)."""

    @staticmethod
    def forward(ctx, t):
        return t.half().float()

    @staticmethod
    def backward(ctx, g):
        return g


def round_fp16_ste(t):
    """``round_fp16`` with a straight-through gradient, for training: the cast's own
    gradient would round the gradient to FP16 as well and flush small ones to zero."""
    return _RoundFp16STE.apply(t)


class _RoundFp16InPlaceSTE(_RoundFp16STE):
    """``_RoundFp16STE`` (same backward) written back into ``t``: for a tensor the caller
    has just made and nobody else holds (a layer's own output), it saves allocating (and
    first touching) a new full-size float32 tensor. Autograd's version check refuses it, at
    backward, if any node saved ``t``."""

    @staticmethod
    def forward(ctx, t):
        ctx.mark_dirty(t)
        return t.copy_(t.half())


def round_fp16_ste_(t):
    """``round_fp16_ste`` in place (see ``_RoundFp16InPlaceSTE``)."""
    return _RoundFp16InPlaceSTE.apply(t)


def bn_factor(bn: nn.BatchNorm2d):
    """Per-channel ``gamma / sqrt(var + eps)`` of an eval-mode BatchNorm."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    return gamma / std


def fold_bn(w, b, bn: nn.BatchNorm2d):
    """(weight, bias) of a convolution with the BatchNorm after it folded in."""
    f = bn_factor(bn)
    beta = bn.bias if bn.affine else torch.zeros_like(f)
    b0 = b if b is not None else torch.zeros_like(f)
    return w * f.reshape(-1, 1, 1, 1), beta + (b0 - bn.running_mean) * f


def _own_forward(conv: nn.Conv2d, x, w, b):
    """``conv``'s own forward with ``w``/``b`` in place of its parameters, hooks not run."""
    params = conv._parameters
    saved = params["weight"], params.get("bias")
    params["weight"], params["bias"] = w, b
    try:
        return type(conv).forward(conv, x)
    finally:
        params["weight"], params["bias"] = saved


def conv2d_as(conv: nn.Conv2d, x, w, b):
    """``conv``'s geometry and padding mode with another weight and bias.

    A Conv2d subclass with its own forward (TF-"SAME" padding added in forward, as in
    EfficientNet and timm ports) runs that forward with the given weight and bias: the
    geometry attributes alone would drop its padding and change the network."""
    if type(conv).forward is not nn.Conv2d.forward and "weight" in conv._parameters:
        return _own_forward(conv, x, w, b)
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        return F.conv2d(x, w, b, conv.stride, 0, conv.dilation, conv.groups)
    return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


class QuantLinear(_QuantLayer):
    def forward(self, x):
        if self.calibrating:
            self.act(x)
            return self.layer(x)
        deploy = not self.training and _QuantLayer.npu_edges
        x = self.act(round_fp16(x) if deploy else x)
        wq, bq, _ = self.quantized_params()
        y = F.linear(x, wq, bq)
        return round_fp16(y) if deploy else y


class _ConvBn:
    """A Conv2d (``self.layer``) with an optional BatchNorm (``self.bn``) folded into it: what
    the INT8 and the FP16 convolution wrappers share."""

    def folded(self):
        w, b = self.layer.weight, self.layer.bias
        if self.bn is None:
            return w, b
        return fold_bn(w, b, self.bn)

    def _float_conv_bn(self, x):
        """The float layer, BN on its running statistics (nothing updates): calibration."""
        y = conv2d_as(self.layer, x, self.layer.weight, self.layer.bias)
        if self.bn is not None:
            y = F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight,
                             self.bn.bias, False, 0.0, self.bn.eps)
        return y


class QuantConv2d(_ConvBn, _QuantLayer):
    def __init__(self, layer: nn.Conv2d, act: ActQuantizer, bn: nn.BatchNorm2d | None = None,
                 bn_name: str | None = None):
        super().__init__(layer, act)
        self.bn = bn
        self.bn_name = bn_name
        self.freeze_bn_stats = False

    def _conv(self, x, w, b):
        return conv2d_as(self.layer, x, w, b)

    def forward(self, x):
        if self.calibrating:  # float path; BN uses running statistics, nothing updates
            self.act(x)
            return self._float_conv_bn(x)
        deploy = not self.training and _QuantLayer.npu_edges
        x = self.act(round_fp16(x) if deploy else x)
        if self.bn is not None and self.training and not self.freeze_bn_stats:
            # conv(x, fq(w*f)) / f, with the per-channel 1/f applied to the (small) weight
            # instead of the (large) activation: BN then sees the unfolded conv output
            f = bn_factor(self.bn).reshape(-1, 1, 1, 1)
            w = self.layer.weight * f
            wq = fq.fake_quant_weight_per_channel(w)[0] / f
            return self.bn(self._conv(x, wq, self.layer.bias))
        wq, bq, _ = self.quantized_params()
        y = self._conv(x, wq, bq)
        return round_fp16(y) if deploy else y


class NpuFp16Conv2d(_ConvBn, nn.Module):
    """A convolution asked for INT8 that the NPU runs in FP16: simulated as that kernel.

    Training: FP16 input, FP16 weight and output, straight-through gradients; with a
    BatchNorm (not frozen) the weight rounded is the folded one, ``fp16(w * f) / f``, as in
    ``QuantConv2d``. Inference (and frozen BN): exactly the compiled FP16 kernel, BN folded
    in float32, then weight, bias, input and output in FP16. With the NPU edges off (the
    export's float32 checks) inference is the float32 folded layer the ONNX file holds.
    While calibrating it is the float layer.
    """

    def __init__(self, layer: nn.Conv2d, bn: nn.BatchNorm2d | None = None,
                 bn_name: str | None = None, reason: str = ""):
        super().__init__()
        self.layer = layer
        self.bn = bn
        self.bn_name = bn_name
        self.reason = reason
        self.freeze_bn_stats = False
        self.calibrating = False

    def extra_repr(self):
        return self.reason

    def forward(self, x):
        if self.calibrating:
            return self._float_conv_bn(x)
        if not self.training and not _QuantLayer.npu_edges:
            w, b = self.folded()
            return conv2d_as(self.layer, x, w, b)
        x = round_fp16_ste(x)
        if self.bn is not None and self.training and not self.freeze_bn_stats:
            f = bn_factor(self.bn).reshape(-1, 1, 1, 1)
            w = round_fp16_ste(self.layer.weight * f) / f
            # the BN output is new and its backward keeps the input: round it in place
            return round_fp16_ste_(self.bn(conv2d_as(self.layer, x, w, self.layer.bias)))
        w, b = self.folded()
        if b is None:
            b = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        # the convolution's output is new and its backward keeps the input: round in place
        return round_fp16_ste_(conv2d_as(self.layer, x, round_fp16_ste(w), round_fp16_ste(b)))


def npu_fp16_layers(model: nn.Module):
    """``(qualified name, module)`` of every ``NpuFp16Conv2d`` in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, NpuFp16Conv2d):
            yield name, m


class Fp16Ops(TorchFunctionMode):
    """While active: every float tensor a torch function returns is rounded to FP16, as the
    NPU rounds the output of every op it runs (a residual add, a pooling, an activation),
    not only at the edges of the weighted layers.

    ``paused`` > 0 inside modules that reproduce the NPU's arithmetic themselves (dopt's
    wrappers and the float layers' hooks): their intermediate values are float32 there,
    as in the compiler's folding, and their outputs are rounded already.
    """

    def __init__(self):
        super().__init__()
        self.paused = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _AS_EXPORTED and not self.paused:
            return _AS_EXPORTED[func](*args, **kwargs)
        out = func(*args, **kwargs)
        if self.paused:
            return out
        if isinstance(out, torch.Tensor):
            return _round_op_output(out, args)
        if isinstance(out, (tuple, list)) and any(isinstance(o, torch.Tensor) for o in out):
            return type(out)(_round_op_output(o, args) if isinstance(o, torch.Tensor) else o
                              for o in out)
        return out


def _result(x, out, inplace: bool):
    """``out``, or written into ``x`` for an activation called with ``inplace=True``."""
    if not inplace:
        return out
    with torch.no_grad():
        x.copy_(out)
    return x


def _silu_as_exported(x, inplace: bool = False):
    """SiLU as the ONNX export writes it (``Sigmoid`` then ``Mul``) and the NPU runs it: two
    FP16 kernels, each output rounded; rounding ``x * sigmoid(x)`` once differs in the last
    place often enough to move quantized values downstream (EfficientNet's blocks)."""
    return _result(x, round_fp16(x * round_fp16(torch.sigmoid(x))), inplace)


def _gelu_as_exported(x, approximate: str = "none"):
    """GELU as the ONNX export (opset 17) writes it, one FP16 rounding per kernel: exact
    ``Div, Erf, Add, Mul, Mul``; tanh ``Mul, Mul, Mul, Add, Mul, Tanh, Add, Mul, Mul``."""
    r = round_fp16
    if approximate == "tanh":
        x3 = r(x * r(x * x))
        inner = r(0.7978845608028654 * r(x + r(0.044715 * x3)))
        return r(0.5 * r(x * r(1.0 + r(torch.tanh(inner)))))
    return r(r(x * r(r(torch.erf(r(x / 1.4142135623730951))) + 1.0)) * 0.5)


def _mish_as_exported(x, inplace: bool = False):
    """Mish as exported: ``Softplus, Tanh, Mul``, three FP16 kernels."""
    return _result(x, round_fp16(x * round_fp16(torch.tanh(round_fp16(F.softplus(x))))),
                   inplace)


_AS_EXPORTED = {F.silu: _silu_as_exported, F.gelu: _gelu_as_exported,
                F.mish: _mish_as_exported}


def _round_op_output(t, args):
    if t.dtype != torch.float32 or isinstance(t, nn.Parameter):
        return t
    r = t.half().float()
    if any(a is t for a in args):  # an in-place op: whoever holds the tensor sees FP16
        with torch.no_grad():
            t.copy_(r)
        return t
    return r


def quant_layers(model: nn.Module):
    """``(qualified name, module)`` of every dopt quant layer in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, _QuantLayer):
            yield name, m
