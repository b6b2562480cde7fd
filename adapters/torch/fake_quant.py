"""Torch fake-quant with exactly the arithmetic of ``dopt.quant.numerics`` (float32, half-to-even).

Scalar quantization parameters come from the core itself (``numerics.activation_qparams``),
so they are the core's values by construction. Activations use one fused autograd node
with LSQ-style gradients to the learnable range ``(lo, hi)``, derived in backward from the
saved input and output (the output is the next layer's input, kept alive anyway); weights
use one straight-through node. Few full-tensor passes per layer keep QAT cheap.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from dopt.quant import numerics as nm

from . import fused_kernels

QMIN, QMAX = float(nm.ACT_QMIN), float(nm.ACT_QMAX)
LEVELS = float(nm.ACT_LEVELS)
# the weight thresholds as the float32 values the comparisons and divisions use
W_ZERO_AMAX, W_QMAX = float(np.float32(nm.W_ZERO_AMAX)), float(nm.W_QMAX)


def activation_qparams_float(lo: float, hi: float) -> tuple[float, float]:
    """(scale, offset) as Python floats holding the core's exact float32 values."""
    s, o = nm.activation_qparams(np.float32(lo), np.float32(hi))
    return float(s), float(o)


def _quant_dequant(x, s: float, o: float):
    """``x~ = (clamp(rint(x/s) + o, qmin, qmax) - o) * s``: one new tensor, the rest in
    place. With integer ``o``, ``clamp(rint(x/s) + o) - o`` is exactly
    ``clamp(rint(x/s), qmin - o, qmax - o)``."""
    return torch.div(x, s).round_().clamp_(QMIN - o, QMAX - o).mul_(s)


def inside_bounds(s: float, o: float) -> tuple[float, float]:
    """Open interval of ``x`` the clamp leaves alone: ``rint(x/s)`` in ``[qmin - o, qmax - o]``
    (integers) is ``x/s`` strictly within half a step of them (ties, a set of measure zero,
    count as outside)."""
    return (QMIN - o - 0.5) * s, (QMAX - o + 0.5) * s


def _act_forward(x, s: float, o: float):
    """``_quant_dequant`` in one fused pass where the fused kernels apply (bit-identical)."""
    out = fused_kernels.quant_dequant(x, s, QMIN - o, QMAX - o)
    return _quant_dequant(x, s, o) if out is None else out


def _mask_and_sums(g, x, out, a: float, b: float):
    """``(gx, <g, out>, <gx, x>, sum g, sum gx)``: the straight-through input gradient and
    the four sums of the range gradients, fused in one pass where the kernels apply."""
    r = fused_kernels.mask_and_sums(g, x, out, a, b)
    if r is not None:
        return r
    gx = torch.ops.aten.hardtanh_backward(g, x, a, b)
    return gx, _dot(g, out), _dot(gx, x), float(g.sum()), float(gx.sum())


class _FakeQuantAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lo, hi):
        lo_f, hi_f = float(lo), float(hi)
        s, o = activation_qparams_float(lo_f, hi_f)
        out = _act_forward(x, s, o)
        # the output is the next layer's input, kept alive by it anyway: saving it is free
        ctx.save_for_backward(x, out)
        ctx.q = (lo_f, hi_f, s, o)
        return out

    @staticmethod
    def backward(ctx, g):
        x, out = ctx.saved_tensors
        lo, hi, s, o = ctx.q
        # LSQ, per element: dx~/dx = [inside]; dx~/ds = rint(x/s) - x/s = (x~ - x)/s inside and
        # (q_clamped - o) = x~/s outside; dx~/do = -s outside. Summed against g:
        #   s * dL/ds = <g, x~> - <g_x, x>,   dL/do = -s * (sum g - sum g_x)
        # the straight-through mask from x itself, as ATen's clamp backward draws it
        gx, g_out, gx_x, g_sum, gx_sum = _mask_and_sums(g, x, out, *inside_bounds(s, o))
        gs = (g_out - gx_x) / s
        go = -s * (g_sum - gx_sum)
        # chain to lo/hi: s = (hi' - lo') / 255, o = clamp(rint(-128 - lo'/s)) with a
        # straight-through rint; lo' = min(lo, 0), hi' = max(hi, 0)
        lo_c = min(lo, 0.0)
        live = s > nm.MIN_SCALE
        o_free = live and QMIN < round(-128.0 - lo_c / s) < QMAX
        ds_dhi = 1.0 / LEVELS if hi > 0 and live else 0.0
        ds_dlo = -1.0 / LEVELS if lo < 0 and live else 0.0
        do_ds = lo_c / (s * s) if o_free else 0.0
        do_dlo = -1.0 / s if (o_free and lo < 0) else 0.0
        # LSQ step-size gradient scale 1/sqrt(N * Qp): the sums above run over every element
        # of the batch, which would otherwise make the range move far faster than the weights
        k = 1.0 / math.sqrt(x.numel() * QMAX)
        g_hi = k * (gs * ds_dhi + go * do_ds * ds_dhi)
        g_lo = k * (gs * ds_dlo + go * (do_dlo + do_ds * ds_dlo))
        dev = x.device
        return (gx if ctx.needs_input_grad[0] else None,
                torch.tensor(g_lo, dtype=torch.float32, device=dev),
                torch.tensor(g_hi, dtype=torch.float32, device=dev))


def _dot(a, b) -> float:
    """``sum(a * b)`` without copying either tensor: a 1-D dot product over the storage when
    both are dense with the same strides (a channels-last gradient against a channels-last
    input, as oneDNN's depthwise backward gives), else one fused multiply-reduce."""
    if a.stride() == b.stride():
        a1, b1 = fused_kernels.dense_1d(a), fused_kernels.dense_1d(b)
        if a1 is not None and b1 is not None:
            return float(torch.dot(a1, b1))
    return float(torch.sum(a * b))


def fake_quant_activation(x, lo, hi):
    """Fake-quantize ``x`` with the range parameters ``lo``/``hi`` (0-d tensors)."""
    return _FakeQuantAct.apply(x, lo, hi)


def weight_scales(w):
    """Per output channel (dim 0) ``max|w| / 127``, 1.0 for a zero channel; no grad."""
    with torch.no_grad():
        amax = w.detach().abs().flatten(1).amax(dim=1)
        return torch.where(amax >= W_ZERO_AMAX, amax / W_QMAX,
                           torch.ones_like(amax))


class _FakeQuantWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, scales):
        s = scales.reshape([-1] + [1] * (w.dim() - 1))
        return torch.round(w / s).clamp_(-nm.W_QMAX, nm.W_QMAX).mul_(s)

    @staticmethod
    def backward(ctx, g):
        return g, None


def fake_quant_weight(w, scales):
    return _FakeQuantWeight.apply(w, scales)


class _FakeQuantWeightFused(torch.autograd.Function):
    """Per-channel scales and fake-quant of ``w`` in one kernel call, straight through."""

    @staticmethod
    def forward(ctx, w, wq, scales):
        return wq

    @staticmethod
    def backward(ctx, g):
        return g, None, None


def fake_quant_weight_per_channel(w):
    """``(fake_quant_weight(w, weight_scales(w)), weight_scales(w))``: one fused kernel call
    where the kernels apply (the same values bit for bit), else the eager ops."""
    r = fused_kernels.weight_quant_dequant(w, W_ZERO_AMAX, W_QMAX)
    if r is None:
        s = weight_scales(w)
        return fake_quant_weight(w, s), s
    wq, s = r
    return _FakeQuantWeightFused.apply(w, wq, s), s


def fake_quant_bias(b, act_scale: float, w_scales):
    bs = w_scales * act_scale  # float32 product, like numerics.bias_scales
    bq = torch.round(b.detach() / bs).clamp_(nm.INT32_MIN, nm.INT32_MAX).mul_(bs)
    return b + (bq - b).detach()
