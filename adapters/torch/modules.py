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
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

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
        s_w = fq.weight_scales(w)
        wq = fq.fake_quant_weight(w, s_w)
        if b is not None:
            scale, _ = self.act.qparams()
            b = fq.fake_quant_bias(b, scale, s_w)
        return wq, b, s_w


def round_fp16(t):
    """Round to IEEE half (nearest even), carried as float32: the NPU's FP16 data."""
    return t.half().float()


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


def conv2d_as(conv: nn.Conv2d, x, w, b):
    """``conv``'s geometry and padding mode with another weight and bias."""
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


class QuantConv2d(_QuantLayer):
    def __init__(self, layer: nn.Conv2d, act: ActQuantizer, bn: nn.BatchNorm2d | None = None,
                 bn_name: str | None = None):
        super().__init__(layer, act)
        self.bn = bn
        self.bn_name = bn_name
        self.freeze_bn_stats = False

    def _conv(self, x, w, b):
        return conv2d_as(self.layer, x, w, b)

    def folded(self):
        w, b = self.layer.weight, self.layer.bias
        if self.bn is None:
            return w, b
        return fold_bn(w, b, self.bn)

    def forward(self, x):
        if self.calibrating:  # float path; BN uses running statistics, nothing updates
            self.act(x)
            y = self._conv(x, self.layer.weight, self.layer.bias)
            if self.bn is not None:
                y = F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight,
                                 self.bn.bias, False, 0.0, self.bn.eps)
            return y
        deploy = not self.training and _QuantLayer.npu_edges
        x = self.act(round_fp16(x) if deploy else x)
        if self.bn is not None and self.training and not self.freeze_bn_stats:
            # conv(x, fq(w*f)) / f, with the per-channel 1/f applied to the (small) weight
            # instead of the (large) activation: BN then sees the unfolded conv output
            f = bn_factor(self.bn).reshape(-1, 1, 1, 1)
            w = self.layer.weight * f
            wq = fq.fake_quant_weight(w, fq.weight_scales(w)) / f
            return self.bn(self._conv(x, wq, self.layer.bias))
        wq, bq, _ = self.quantized_params()
        y = self._conv(x, wq, bq)
        return round_fp16(y) if deploy else y


def quant_layers(model: nn.Module):
    """``(qualified name, module)`` of every dopt quant layer in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, _QuantLayer):
            yield name, m
