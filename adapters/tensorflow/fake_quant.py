"""TensorFlow fake-quant with exactly the arithmetic of ``dopt.quant.numerics`` (float32, half-to-even).

Written with plain ``tf`` ops so one implementation serves Keras 3 layers (eager and
``tf.function``) and ``tf.compat.v1`` graphs. ``tf.round`` rounds half to even, like the
core's ``np.rint``. The activation node carries LSQ-style gradients to the learnable range
``(lo, hi)`` (the same formulas as the PyTorch adapter); weights use a straight-through
estimator. Weight scales are per output channel, which is the *last* axis of TensorFlow
kernels (``HWIO`` for ``Conv2D``, ``(in, out)`` for ``Dense``/``MatMul``) and the product
of the last two axes for depthwise kernels (``HWC1`` -> channel ``c * M + m``).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from dopt.quant import numerics as nm

QMIN, QMAX = float(nm.ACT_QMIN), float(nm.ACT_QMAX)
LEVELS = float(nm.ACT_LEVELS)


def _divisor(v: float):
    """A constant grappler cannot see: it would turn ``x / c`` into ``x * (1/c)``, which is
    one float32 ulp off the core's division for most scales (in graphs and tf.function)."""
    return tf.raw_ops.PlaceholderWithDefault(input=tf.constant(v, tf.float32), shape=[])


def activation_qparams(lo, hi):
    """``(scale, offset)`` as float32 tensors: the core's ``activation_qparams`` in tf ops."""
    lo = tf.minimum(tf.cast(lo, tf.float32), 0.0)
    hi = tf.maximum(tf.cast(hi, tf.float32), 0.0)
    scale = tf.maximum((hi - lo) / _divisor(LEVELS), np.float32(nm.MIN_SCALE))
    offset = tf.clip_by_value(tf.round(QMIN - lo / scale), QMIN, QMAX)
    return scale, offset


@tf.custom_gradient
def fake_quant_activation(x, lo, hi):
    """``(clamp(rint(x/s) + o, -128, 127) - o) * s`` with ``(s, o)`` from the range ``[lo, hi]``."""
    x = tf.convert_to_tensor(x, tf.float32)
    s, o = activation_qparams(lo, hi)
    r = tf.round(x / s)
    q = tf.clip_by_value(r, QMIN - o, QMAX - o)
    out = q * s
    inside = tf.equal(q, r)

    def grad(g):
        # LSQ (see the PyTorch adapter's fake_quant for the derivation):
        #   s * dL/ds = <g, x~> - <g_x, x>,  dL/do = -s * (sum g - sum g_x)
        gx = tf.where(inside, g, tf.zeros_like(g))
        gs = (tf.reduce_sum(g * out) - tf.reduce_sum(gx * x)) / s
        go = -s * (tf.reduce_sum(g) - tf.reduce_sum(gx))
        lo_f = tf.cast(lo, tf.float32)
        hi_f = tf.cast(hi, tf.float32)
        lo_c = tf.minimum(lo_f, 0.0)
        live = s > np.float32(nm.MIN_SCALE)
        o_raw = tf.round(QMIN - lo_c / s)
        o_free = tf.logical_and(live, tf.logical_and(o_raw > QMIN, o_raw < QMAX))
        zero = tf.zeros((), tf.float32)
        ds_dhi = tf.where(tf.logical_and(hi_f > 0, live), 1.0 / LEVELS, zero)
        ds_dlo = tf.where(tf.logical_and(lo_f < 0, live), -1.0 / LEVELS, zero)
        do_ds = tf.where(o_free, lo_c / (s * s), zero)
        do_dlo = tf.where(tf.logical_and(o_free, lo_f < 0), -1.0 / s, zero)
        # LSQ step-size gradient scale 1/sqrt(N * Qp)
        n = tf.cast(tf.size(x), tf.float32)
        k = tf.math.rsqrt(n * QMAX)
        g_hi = k * (gs * ds_dhi + go * do_ds * ds_dhi)
        g_lo = k * (gs * ds_dlo + go * (do_dlo + do_ds * ds_dlo))
        return gx, tf.reshape(g_lo, tf.shape(lo)), tf.reshape(g_hi, tf.shape(hi))

    return out, grad


def _channels_last(w, depthwise: bool):
    """The kernel as ``(..., C)`` with C the output channels (depthwise: ``C_in * M``)."""
    if depthwise:
        shape = tf.shape(w)
        return tf.reshape(w, tf.concat([shape[:-2], [shape[-2] * shape[-1]]], 0))
    return w


def weight_scales(w, depthwise: bool = False):
    """Per output channel ``max|w| / 127`` (1.0 for a zero channel), no gradient."""
    w = tf.stop_gradient(tf.convert_to_tensor(w, tf.float32))
    wc = _channels_last(w, depthwise)
    axes = list(range(len(wc.shape) - 1))
    amax = tf.reduce_max(tf.abs(wc), axis=axes)
    return tf.where(amax >= np.float32(nm.W_ZERO_AMAX), amax / _divisor(float(nm.W_QMAX)),
                    tf.ones_like(amax))


def _per_channel(scales, w, depthwise: bool):
    """``scales`` broadcastable against the kernel ``w``."""
    if depthwise:
        m = tf.shape(w)[-1]
        return tf.reshape(scales, tf.stack([-1, m]))
    return scales


def fake_quant_weight(w, scales, depthwise: bool = False):
    """``clamp(rint(w / s_c), -127, 127) * s_c`` with a straight-through gradient."""
    w = tf.convert_to_tensor(w, tf.float32)
    s = _per_channel(tf.stop_gradient(scales), w, depthwise)
    wq = tf.clip_by_value(tf.round(w / s), -float(nm.W_QMAX), float(nm.W_QMAX)) * s
    return w + tf.stop_gradient(wq - w)


def fake_quant_bias(b, act_scale, w_scales):
    """int32 bias on the grid ``s_d * s_w[c]`` (forward), identity gradient."""
    b = tf.convert_to_tensor(b, tf.float32)
    bs = tf.stop_gradient(act_scale * w_scales)
    bq = tf.clip_by_value(tf.round(b / bs), float(nm.INT32_MIN), float(nm.INT32_MAX)) * bs
    return b + tf.stop_gradient(bq - b)


def round_fp16(x):
    """Round to IEEE half (nearest even), carried as float32: the NPU's FP16 data."""
    return tf.cast(tf.cast(x, tf.float16), tf.float32)
