"""INT8 quantization arithmetic, written once.

Array-library neutral in spirit: these NumPy functions are the specification;
the torch fake-quant (and later every other adapter and the emulated NPU) is
tested bit-for-bit against them. ``docs/numerics.md`` states the same rules with
golden vectors.

Conventions (default NPU profile):
* activations: per tensor, asymmetric, ``q = clamp(rint(x / s) + o, -128, 127)``
  with integer offset ``o`` (so this equals ``rint(x / s + o)``); ``x ~ (q - o) * s``.
* weights: per output channel, symmetric, ``w_q = clamp(rint(w / s_w), -127, 127)``.
* bias: int32, ``b_q = clamp(rint(b / (s_d * s_w)), int32)``.
* all arithmetic in float32; ``rint`` rounds half to even.
"""
from __future__ import annotations

import numpy as np

ACT_QMIN, ACT_QMAX = -128, 127
W_QMAX = 127
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
ACT_LEVELS = ACT_QMAX - ACT_QMIN  # 255 steps between qmin and qmax
MIN_SCALE = 1e-8  # floor for a degenerate (all-zero) activation range
FP16_MAX = 65504.0              # largest finite IEEE half: beyond it an FP16 op gives inf
FP16_MIN_NORMAL = 2.0 ** -14    # smallest normal half (6.1e-5): below it precision drains away
# a network output that FP16 moves by more than this share of its range (max |FP16 - FP32| /
# max |FP32|) no longer stands for the float model: the compatibility bar and the
# ``fp16_drift`` rule both read it
FP16_DRIFT_TOLERANCE = 2e-2
# a weight channel with max|w| below this is a zero channel (scale 1.0, all w_q = 0): its
# scale would fall under the parameter file's 1e-12 floor and it contributes nothing
W_ZERO_AMAX = 127 * 1e-12

_f32 = np.float32


def bn_scale(gamma, var, eps) -> np.ndarray:
    """The per-channel factor of an inference BatchNormalization, in float32:
    ``k = gamma / sqrt(var + eps)`` (folded into a convolution's weights, or the scale of a
    BN kernel of its own)."""
    return (_f32(gamma) / np.sqrt(_f32(var) + np.float32(eps))).astype(_f32)


def bn_scale_shift(gamma, beta, mean, var, eps) -> tuple[np.ndarray, np.ndarray]:
    """``(k, beta - mean * k)``, float32: a BatchNormalization as ``x * k + shift``."""
    k = bn_scale(gamma, var, eps)
    return k, (_f32(beta) - _f32(mean) * k).astype(_f32)


def round_half_even(x):
    return np.rint(x)


def activation_qparams(lo, hi) -> tuple[np.float32, int]:
    """Scale and integer offset for a per-tensor asymmetric INT8 range.

    The range is first widened to contain 0 so that 0.0 is exactly representable
    (padding and ReLU zeros must survive quantization).
    """
    lo = min(_f32(lo), _f32(0.0))
    hi = max(_f32(hi), _f32(0.0))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"activation range must be finite, got [{lo}, {hi}]")
    scale = _f32(hi - lo) / _f32(ACT_LEVELS)
    scale = max(_f32(scale), _f32(MIN_SCALE))
    offset = np.rint(_f32(ACT_QMIN) - _f32(lo) / scale)
    offset = int(np.clip(offset, ACT_QMIN, ACT_QMAX))
    return _f32(scale), offset


def quantize_activation(x, scale, offset) -> np.ndarray:
    """``clamp(rint(x / s) + o)`` as int8; +-inf saturate, NaN gives ``ACT_QMIN`` (as ONNX
    Runtime's ``QuantizeLinear``, so the fast engine and the reference agree on it)."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        q = np.rint(x / _f32(scale)) + _f32(offset)
    q = np.where(np.isnan(q), ACT_QMIN, np.clip(q, ACT_QMIN, ACT_QMAX))
    return q.astype(np.int8)


def dequantize_activation(q, scale, offset) -> np.ndarray:
    return ((np.asarray(q, dtype=np.float32) - _f32(offset)) * _f32(scale)).astype(np.float32)


def fake_quant_activation(x, scale, offset) -> np.ndarray:
    return dequantize_activation(quantize_activation(x, scale, offset), scale, offset)


def weight_scales(w, axis: int = 0) -> np.ndarray:
    """Per-channel symmetric scales ``max|w_c| / 127``; a zero channel gets 1.0."""
    w = np.asarray(w, dtype=np.float32)
    red = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.max(np.abs(w), axis=red) if red else np.abs(w)
    scales = (amax / _f32(W_QMAX)).astype(np.float32)
    return np.where(amax >= _f32(W_ZERO_AMAX), scales, _f32(1.0)).astype(np.float32)


def _bcast(s, ndim: int, axis: int):
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(s, dtype=np.float32).reshape(shape)


def quantize_weight(w, scales, axis: int = 0) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    q = w / _bcast(scales, w.ndim, axis)   # one float32 temporary, rounded and clipped in place
    np.rint(q, out=q)
    np.clip(q, -W_QMAX, W_QMAX, out=q)
    return q.astype(np.int8)


def fake_quant_weight(w, scales, axis: int = 0) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    return (quantize_weight(w, scales, axis).astype(np.float32)
            * _bcast(scales, w.ndim, axis)).astype(np.float32)


def bias_scales(act_scale, w_scales) -> np.ndarray:
    return (_f32(act_scale) * np.asarray(w_scales, dtype=np.float32)).astype(np.float32)


def quantize_bias(b, act_scale, w_scales) -> np.ndarray:
    b = np.asarray(b, dtype=np.float32)
    q = np.rint(b / bias_scales(act_scale, w_scales))
    # clamp in float64: 2**31 - 1 as a float32 is 2**31, which wraps to -2**31 as int32
    return np.clip(q.astype(np.float64), INT32_MIN, INT32_MAX).astype(np.int32)


def int8_linear(x, w, b, act_scale, act_offset, w_scales) -> np.ndarray:
    """The NPU's QuantizedFullyConnection, integer-exact: the reference for golden vectors.

    ``x``: (N, K) float; ``w``: (C, K) float; returns FP16 (N, C).
    acc = sum((q - o) * w_q) + b_q in int32; out = fp16(float32(acc) * (s_d * s_w[c])).
    """
    q = quantize_activation(x, act_scale, act_offset).astype(np.int64) - int(act_offset)
    wq = quantize_weight(w, w_scales, axis=0).astype(np.int64)
    acc = q @ wq.T
    if b is not None:
        acc = acc + quantize_bias(b, act_scale, w_scales).astype(np.int64)
    acc = np.clip(acc, INT32_MIN, INT32_MAX).astype(np.int32)
    return (acc.astype(np.float32) * bias_scales(act_scale, w_scales)).astype(np.float16)
