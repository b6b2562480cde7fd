"""Torch fake-quant with exactly the arithmetic of ``dopt.numerics`` (float32, half-to-even).

Activations use a fused autograd function (one saved float and one saved mask
per element) with LSQ-style gradients to the range; weights and biases use a
straight-through estimator with scales treated as constants.
"""
from __future__ import annotations

import torch

from dopt import numerics as nm

QMIN, QMAX = float(nm.ACT_QMIN), float(nm.ACT_QMAX)


class _FakeQuantAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, offset):
        v = x / scale
        r = torch.round(v)            # half to even, like numpy.rint
        q = r + offset
        qc = q.clamp(QMIN, QMAX)
        inside = q.eq(qc)
        # d out / d scale: (r - v) inside the range, (q_clamped - o) outside (LSQ)
        ctx.save_for_backward(inside, torch.where(inside, r - v, qc - offset), scale)
        return (qc - offset) * scale

    @staticmethod
    def backward(ctx, g):
        inside, ds, scale = ctx.saved_tensors
        gx = g * inside
        gs = (g * ds).sum().reshape(scale.shape)
        go = ((g * (~inside)).sum() * -scale).reshape(scale.shape)
        return gx, gs, go


def fake_quant_activation(x, scale, offset):
    return _FakeQuantAct.apply(x, scale, offset)


def ste_round(x):
    return x + (torch.round(x) - x).detach()


def activation_qparams(lo, hi):
    """Torch twin of ``numerics.activation_qparams`` (differentiable, offset STE-rounded)."""
    lo = lo.clamp(max=0.0)
    hi = hi.clamp(min=0.0)
    scale = ((hi - lo) / float(nm.ACT_LEVELS)).clamp(min=nm.MIN_SCALE)
    offset = ste_round(QMIN - lo / scale).clamp(QMIN, QMAX)
    return scale, offset


def weight_scales(w):
    """Per output channel (dim 0) ``max|w| / 127``, 1.0 for an all-zero channel; no grad."""
    with torch.no_grad():
        amax = w.detach().abs().flatten(1).amax(dim=1)
        return torch.where(amax > 0, amax / float(nm.W_QMAX), torch.ones_like(amax))


def fake_quant_weight(w, scales):
    s = scales.reshape([-1] + [1] * (w.dim() - 1))
    wq = (torch.round(w.detach() / s).clamp(-nm.W_QMAX, nm.W_QMAX)) * s
    return w + (wq - w).detach()


def fake_quant_bias(b, act_scale, w_scales):
    bs = (act_scale.detach() * w_scales)
    bq = torch.round(b.detach() / bs).clamp(nm.INT32_MIN, nm.INT32_MAX) * bs
    return b + (bq - b).detach()
