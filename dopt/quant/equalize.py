"""Cross-layer equalization (CLE), framework-neutral.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction" (ICCV). Layer 1 is followed by a positively homogeneous activation,
``f(x / s) = f(x) / s`` for ``s > 0`` (identity, ReLU, LeakyReLU, PReLU; not ReLU6,
hard-swish or sigmoid), then by layer 2. Dividing output channel ``i`` of layer 1
(weights and bias) by ``s_i`` and multiplying the layer-2 weights that read channel
``i`` by ``s_i`` leaves the float function unchanged. ``s_i = sqrt(r1_i * r2_i) / r2_i``
(``r`` = max |w| of the channel) makes both ranges ``sqrt(r1_i * r2_i)``: why it helps
INT8 is that the per-tensor activation between the layers then has channels of similar
range instead of small channels lost in a few steps (and per-tensor weights would gain
the same way). Fold BatchNorm first.

Weights are output-channel first: linear ``(C, K)``, convolution ``(C, Cin/g, kh, kw)``
(depthwise: ``(C, 1, kh, kw)`` with ``g = C``).
"""
from __future__ import annotations

import numpy as np

SCALE_RANGE = (1e-4, 1e4)  # clamp: a dead or huge channel must not blow the other layer up


def channel_ranges(w, axis: int = 0) -> np.ndarray:
    """``max |w|`` per index of ``axis`` (float64)."""
    w = np.abs(np.asarray(w, dtype=np.float64))
    red = tuple(i for i in range(w.ndim) if i != axis)
    return w.max(axis=red) if red else w


def _grouped(w2, channels: int, groups2: int) -> np.ndarray:
    """``w2`` viewed as ``(groups, out per group, in per group, rest)``; checks the shapes."""
    if not isinstance(groups2, (int, np.integer)) or groups2 < 1:
        raise ValueError(f"groups2 must be a positive integer, got {groups2!r}")
    if w2.ndim < 2:
        raise ValueError(f"layer-2 weight must have >= 2 dims (out, in, ...), got {w2.shape}")
    if channels % groups2 or w2.shape[0] % groups2:
        raise ValueError(f"groups2={groups2} must divide layer 1's {channels} channels and "
                         f"layer 2's {w2.shape[0]} output channels")
    if w2.shape[1] * groups2 != channels:
        raise ValueError(f"layer 2 reads {w2.shape[1]} x {groups2} groups = "
                         f"{w2.shape[1] * groups2} input channels, layer 1 has {channels}")
    return w2.reshape(groups2, w2.shape[0] // groups2, w2.shape[1], -1)


def input_channel_ranges(w2, channels: int, groups2: int = 1) -> np.ndarray:
    """``r2_i``: max |w2| over every weight that multiplies input channel ``i``."""
    g = _grouped(np.abs(np.asarray(w2, dtype=np.float64)), channels, groups2)
    return g.max(axis=(1, 3)).reshape(channels)


def _check_scale_range(scale_range):
    lo, hi = scale_range
    if not 0 < lo <= 1 <= hi < np.inf:
        raise ValueError(f"scale_range must satisfy 0 < lo <= 1 <= hi, got {scale_range}")


def equalize_pair(w1, b1, w2, *, groups2: int = 1, scale_range=SCALE_RANGE):
    """Equalize layer 1 -> layer 2; returns ``(w1', b1', w2', s)``.

    ``w1' = w1 / s`` and ``b1' = b1 / s`` per output channel of layer 1, ``w2' = w2 * s``
    per input channel of layer 2 (``b1`` may be None). Channels with a zero range on
    either side get ``s = 1``; ``s`` is clamped to ``scale_range``. Arrays keep their
    dtype; ``s`` is float64.
    """
    _check_scale_range(scale_range)
    w1 = np.asarray(w1)
    w2 = np.asarray(w2)
    if w1.ndim < 2:
        raise ValueError(f"layer-1 weight must have >= 2 dims (out, ...), got {w1.shape}")
    c = w1.shape[0]
    if b1 is not None and np.shape(b1) != (c,):
        raise ValueError(f"layer-1 bias must have shape ({c},), got {np.shape(b1)}")
    r1 = channel_ranges(w1, 0)
    r2 = input_channel_ranges(w2, c, groups2)
    ok = (r1 > 0) & (r2 > 0) & np.isfinite(r1) & np.isfinite(r2)
    s = np.ones(c)
    s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
    s = np.clip(s, *scale_range)
    return (*_apply(w1, b1, w2, s, groups2), s)


def _apply(w1, b1, w2, s, groups2):
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    w1n = (w1 / s.reshape(shape1)).astype(w1.dtype)
    b1n = None if b1 is None else (np.asarray(b1) / s).astype(np.asarray(b1).dtype)
    g = _grouped(w2, w1.shape[0], groups2)
    w2n = (g * s.reshape(groups2, 1, -1, 1)).reshape(w2.shape).astype(w2.dtype)
    return w1n, b1n, w2n


def equalize_chain(weights, biases, *, groups=None, pairs=None, max_iter: int = 100,
                   tol: float = 1e-6, scale_range=SCALE_RANGE):
    """Equalize every ``(producer, consumer)`` pair, sweeping until the scales settle.

    A layer in the middle of a chain belongs to two pairs (its output channels to one,
    its input channels to the other), so one pass does not make all ranges equal;
    sweeps repeat until ``max |log s| < tol`` or ``max_iter`` sweeps (Nagel et al.).
    ``weights``/``biases``: per layer (a bias may be None); ``groups``: each layer's
    groups (as a consumer; default 1); ``pairs``: index pairs, default consecutive
    layers. Returns new ``(weights, biases, scales)`` with ``scales[k]`` the accumulated
    ``s`` of ``pairs[k]``.
    """
    _check_scale_range(scale_range)
    if max_iter < 1 or tol < 0:
        raise ValueError(f"need max_iter >= 1 and tol >= 0, got {max_iter}, {tol}")
    ws = [np.asarray(w) for w in weights]
    bs = list(biases)
    n = len(ws)
    if len(bs) != n:
        raise ValueError(f"{n} weights but {len(bs)} biases")
    groups = [1] * n if groups is None else list(groups)
    if len(groups) != n:
        raise ValueError(f"{n} weights but {len(groups)} groups")
    pairs = [(k, k + 1) for k in range(n - 1)] if pairs is None else [tuple(p) for p in pairs]
    producers = [p for p, _ in pairs]
    for p, q in pairs:
        if not (0 <= p < n and 0 <= q < n and p != q):
            raise ValueError(f"pair {(p, q)} is not two distinct layer indices below {n}")
    if len(set(producers)) != len(producers):
        raise ValueError("a layer's output feeds several consumers: equalize each output once")
    total = [np.ones(ws[p].shape[0]) for p in producers]
    for _ in range(max_iter):
        worst = 0.0
        for k, (p, q) in enumerate(pairs):
            ws[p], bs[p], ws[q], s = equalize_pair(ws[p], bs[p], ws[q], groups2=groups[q],
                                                   scale_range=scale_range)
            total[k] *= s
            worst = max(worst, float(np.max(np.abs(np.log(s)))))
        if worst < tol:
            break
    return ws, bs, total
