"""Low-bit LLM arithmetic (``Quant_INT16-4``), written once.

These NumPy functions are the specification; the LLM adapter's torch fake-quant, the
GPTQ/RTN baselines in ``bench/`` and the parameter-file checker are tested against them.
``docs/numerics.md`` states the same rules with golden vectors.

Weights: groups of ``group_size`` consecutive input columns of each output row (the last
group is smaller when ``group_size`` does not divide ``in_features``; ``group_size <= 0``
means one group per row). Asymmetric, unsigned codes ``0 .. 2**bits - 1``::

    hi = alpha_hi * max(w_g)        lo = alpha_lo * min(w_g)        (alpha in (0, 1], clip)
    scale = max(hi - lo, 1e-5) / (2**bits - 1)
    zero  = clamp(rint(-lo / scale), 0, 2**bits - 1)                 (integer)
    q     = clamp(rint(w / scale) + zero, 0, 2**bits - 1)
    w~    = (q - zero) * scale

Activations (INT16): per tensor, symmetric, ``scale = max(amax, 1e-8) / 32767``,
``q = clamp(rint(x / scale), -32768, 32767)``, ``x~ = q * scale``.

All arithmetic in float32; ``rint`` rounds half to even.
"""
from __future__ import annotations

import numpy as np

WEIGHT_BITS = (2, 3, 4, 8)
ACT_BITS = (8, 16)
MIN_RANGE = 1e-5
MIN_ACT_AMAX = 1e-8

_f32 = np.float32


def qmax(bits: int) -> int:
    return (1 << int(bits)) - 1


def group_bounds(in_features: int, group_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of the column groups; the last one may be shorter."""
    if group_size is None or group_size <= 0 or group_size >= in_features:
        return [(0, in_features)]
    return [(s, min(s + group_size, in_features)) for s in range(0, in_features, group_size)]


def _grouped_reduce(w, bounds, fn):
    return np.stack([fn(w[:, a:b], axis=1) for a, b in bounds], axis=1)


def weight_qparams(w, bits: int, group_size: int, alpha_hi=None, alpha_lo=None):
    """``(scale [out, G] float32, zero [out, G] int32)`` for a 2-D weight."""
    w = np.asarray(w, dtype=np.float32)
    bounds = group_bounds(w.shape[1], group_size)
    hi = _grouped_reduce(w, bounds, np.max)
    lo = _grouped_reduce(w, bounds, np.min)
    if alpha_hi is not None:
        hi = (hi * np.asarray(alpha_hi, dtype=np.float32)).astype(np.float32)
    if alpha_lo is not None:
        lo = (lo * np.asarray(alpha_lo, dtype=np.float32)).astype(np.float32)
    levels = _f32(qmax(bits))
    scale = (np.maximum(hi - lo, _f32(MIN_RANGE)) / levels).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, levels).astype(np.int32)
    return scale, zero


def expand_groups(p, in_features: int, group_size: int):
    """Repeat per-group values ``[out, G]`` to per-column ``[out, in]``."""
    sizes = [b - a for a, b in group_bounds(in_features, group_size)]
    return np.repeat(np.asarray(p), sizes, axis=1)


def quantize_weight(w, scale, zero, bits: int, group_size: int):
    w = np.asarray(w, dtype=np.float32)
    s = expand_groups(scale, w.shape[1], group_size).astype(np.float32)
    z = expand_groups(zero, w.shape[1], group_size).astype(np.float32)
    q = np.rint(w / s) + z
    return np.clip(q, 0, qmax(bits)).astype(np.uint8)


def dequantize_weight(q, scale, zero, group_size: int):
    q = np.asarray(q)
    s = expand_groups(scale, q.shape[1], group_size).astype(np.float32)
    z = expand_groups(zero, q.shape[1], group_size).astype(np.float32)
    return ((q.astype(np.float32) - z) * s).astype(np.float32)


def fake_quant_weight(w, bits: int, group_size: int, alpha_hi=None, alpha_lo=None):
    scale, zero = weight_qparams(w, bits, group_size, alpha_hi, alpha_lo)
    return dequantize_weight(quantize_weight(w, scale, zero, bits, group_size), scale, zero,
                             group_size)


def act_qrange(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def act_scale(amax, bits: int = 16) -> np.float32:
    amax = _f32(amax)
    if not np.isfinite(amax):
        raise ValueError(f"activation range must be finite, got amax={amax}")
    return _f32(max(amax, _f32(MIN_ACT_AMAX)) / _f32(act_qrange(bits)[1]))


def quantize_act(x, scale, bits: int = 16):
    lo, hi = act_qrange(bits)
    q = np.rint(np.asarray(x, dtype=np.float32) / _f32(scale))
    return np.clip(q, lo, hi).astype(np.int16 if bits > 8 else np.int8)


def fake_quant_act(x, scale, bits: int = 16):
    return (quantize_act(x, scale, bits).astype(np.float32) * _f32(scale)).astype(np.float32)


def lut(scale, zero, bits: int):
    """Per-group lookup table ``[out, G, 2**bits]``: code ``k`` decodes to ``lut[..., k]``."""
    codes = np.arange(qmax(bits) + 1, dtype=np.float32)
    return ((codes[None, None, :] - np.asarray(zero, np.float32)[..., None])
            * np.asarray(scale, np.float32)[..., None]).astype(np.float32)
