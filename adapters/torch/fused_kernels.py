"""Fused CPU kernels for the fake-quant of QAT, compiled with Numba.

Eager PyTorch runs the activation fake-quant as four passes over the tensor forward (divide,
round, clamp, multiply) and five backward (the straight-through mask, two dot products, two
sums). At training batch sizes those passes over memory are a large share of what QAT costs
over float training. These kernels do each direction in one pass. The per-channel weight
fake-quant (scales and quant-dequant, a dozen small eager ops per layer a step) is one call.

Exactness: the forward is the eager path's float32 division, round-half-to-even (``rint``),
clamp and multiply, element by element, so its output is bit-identical (NaN passes through
as ``torch.clamp`` lets it). The mask is the test ATen's ``hardtanh_backward`` makes
(``a < x < b`` passes the gradient; anything else, NaN included, gives 0), so the input
gradient is bit-identical too. Only the four sums behind the range gradients are added in
another order: in float32 within blocks of ``BLOCK`` elements, the blocks in float64. The
weight kernel's scales and values are the eager ops' bit for bit, NaN channels included.

Used for dense float32 CPU tensors (activations of at least ``MIN_NUMEL`` elements,
contiguous weights) when Numba imports and compiles; anything else (CUDA, other dtypes, odd
strides, small tensors, no Numba, or ``DOPT_TORCH_FUSED=0``) returns None and the caller
runs its eager code, as does a process forked from one that ran them. Numba's threads follow
``torch.get_num_threads()``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import warnings

import numpy as np
import torch

BLOCK = 4096
MIN_NUMEL = 16384
ENV = "DOPT_TORCH_FUSED"

_kernels = None  # (numba, activation forward, backward, weight kernel); False: not usable
# Numba's own "workqueue" thread pool (used where neither OpenMP nor TBB is there) aborts the
# process when two threads launch parallel kernels at once: calls are then serialized
_launch = contextlib.nullcontext()


def _compile(cache: bool = True):
    import numba
    from numba import njit, prange

    @njit(parallel=True, cache=cache, boundscheck=False)  # IEEE arithmetic: no fastmath
    def fq_forward(x, out, s, qlo, qhi):
        for i in prange(x.shape[0]):
            v = np.rint(x[i] / s)
            if v < qlo:
                v = qlo
            elif v > qhi:
                v = qhi
            out[i] = v * s

    # reassociation only reorders the sums; the select and the stores stay exact
    @njit(cache=cache, boundscheck=False, fastmath={"reassoc", "contract"})
    def block_backward(g, x, out, gx, a, b):
        # over whole (sliced) arrays: a loop from a start offset does not vectorize
        zero = np.float32(0.0)
        s_gout = zero
        s_gxx = zero
        s_g = zero
        s_gx = zero
        for i in range(x.shape[0]):
            gi = g[i]
            xi = x[i]
            gxi = gi if (xi > a and xi < b) else zero
            gx[i] = gxi
            s_gout += gi * out[i]
            s_gxx += gxi * xi
            s_g += gi
            s_gx += gxi
        return s_gout, s_gxx, s_g, s_gx

    @njit(parallel=True, cache=cache, boundscheck=False)
    def fq_backward(g, x, out, gx, a, b, partial):
        n = x.shape[0]
        for k in prange(partial.shape[0]):
            i, j = k * BLOCK, min(k * BLOCK + BLOCK, n)
            r = block_backward(g[i:j], x[i:j], out[i:j], gx[i:j], a, b)
            partial[k, 0] = r[0]
            partial[k, 1] = r[1]
            partial[k, 2] = r[2]
            partial[k, 3] = r[3]

    @njit(cache=cache, boundscheck=False)  # weights are small: one thread, no fastmath
    def fq_weight(w, out, scales, zero_amax, qmax):
        for c in range(w.shape[0]):
            amax = np.float32(0.0)
            nan = False
            for k in range(w.shape[1]):
                v = abs(w[c, k])
                if v != v:
                    nan = True
                elif v > amax:
                    amax = v
            # a NaN in the channel makes torch's amax NaN, and NaN >= zero_amax is false
            s = amax / qmax if (amax >= zero_amax and not nan) else np.float32(1.0)
            scales[c] = s
            for k in range(w.shape[1]):
                v = np.rint(w[c, k] / s)
                if v < -qmax:
                    v = -qmax
                elif v > qmax:
                    v = qmax
                out[c, k] = v * s

    return numba, fq_forward, fq_backward, fq_weight


def _after_fork_in_child() -> None:
    """A forked child of a process that ran the kernels runs the eager ops: Numba's OpenMP
    layer terminates a child that launches a parallel kernel after such a fork (checked:
    "fork() called from a process already using GNU OpenMP")."""
    global _kernels
    if _kernels:
        _kernels = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _warmed(cache: bool):
    """The kernels, compiled (or loaded from Numba's cache) and run once on tiny inputs, so
    that a failure shows here rather than in the middle of a training step."""
    numba, fwd, bwd, wgt = _compile(cache)
    x = np.zeros(8, np.float32)
    fwd(x, np.empty_like(x), np.float32(1), np.float32(-1), np.float32(1))
    bwd(x, x, x, np.empty_like(x), np.float32(-1), np.float32(1), np.empty((1, 4), np.float32))
    w = np.zeros((2, 4), np.float32)
    wgt(w, np.empty_like(w), np.empty(2, np.float32), np.float32(1e-10), np.float32(127))
    return numba, fwd, bwd, wgt


def _get():
    """The compiled kernels, or None where they cannot be used (checked once)."""
    global _kernels, _launch
    if _kernels is None:
        _kernels = False
        if os.environ.get(ENV, "1") != "0" and importlib.util.find_spec("numba") is not None:
            try:
                try:
                    kernels = _warmed(True)
                except Exception:  # noqa: BLE001 - e.g. no writable place for Numba's cache
                    kernels = _warmed(False)
                _kernels = kernels
                if kernels[0].threading_layer() == "workqueue":
                    _launch = threading.Lock()
            except Exception as e:  # noqa: BLE001 - any compile failure: run the eager path
                warnings.warn(f"dopt: the fused QAT kernels did not compile ({e}); QAT runs "
                              f"its eager PyTorch path (set {ENV}=0 to skip the attempt)",
                              stacklevel=3)
    return _kernels or None


def dense_1d(t):
    """``t`` as a 1-D view of its storage when it is dense in any memory format (the order
    of the elements then follows the strides), else None."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t.as_strided((t.numel(),), (1,))
    return None


def _flat(t):
    """``t`` (detached) as a 1-D numpy view of its storage when it is dense, else None."""
    v = dense_1d(t.detach())
    return None if v is None else v.numpy()


def _usable(t, *others) -> bool:
    """Float32 CPU tensors of at least MIN_NUMEL elements, all of one shape and strides."""
    if t.dtype is not torch.float32 or not t.is_cpu or t.numel() < MIN_NUMEL:
        return False
    for u in others:
        if u.dtype is not torch.float32 or not u.is_cpu or u.stride() != t.stride() \
                or u.shape != t.shape:
            return False
    return True


def _threads(numba) -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def quant_dequant(x, s: float, qlo: float, qhi: float):
    """``clamp(rint(x / s), qlo, qhi) * s`` in one pass, or None (use the eager path)."""
    if not _usable(x):
        return None
    k = _get()
    xf = _flat(x) if k else None
    if xf is None:
        return None
    out = torch.empty_like(x)
    with _launch:
        _threads(k[0])
        k[1](xf, _flat(out), np.float32(s), np.float32(qlo), np.float32(qhi))
    return out


def mask_and_sums(g, x, out, a: float, b: float):
    """``(gx, <g, out>, <gx, x>, sum g, sum gx)`` with ``gx = g`` where ``a < x < b`` and 0
    elsewhere, in one pass; or None (use the eager path)."""
    if not _usable(x, g, out):
        return None
    k = _get()
    flats = [_flat(t) for t in (g, x, out)] if k else [None]
    if any(f is None for f in flats):
        return None
    gx = torch.empty_like(x)
    partial = np.empty(((x.numel() + BLOCK - 1) // BLOCK, 4), np.float32)
    with _launch:
        _threads(k[0])
        k[2](*flats, _flat(gx), np.float32(a), np.float32(b), partial)
    sums = partial.sum(axis=0, dtype=np.float64)
    return (gx, *(float(v) for v in sums))


def weight_quant_dequant(w, zero_amax: float, qmax: float):
    """``(clamp(rint(w / s), -qmax, qmax) * s, s)`` with per-output-channel (dim 0) scales
    ``s = max|w_c| / qmax`` (1 where ``max|w_c| < zero_amax``), in one call; or None. For
    a contiguous float32 CPU weight of any size: weights are small, so this saves the
    per-op cost of eager PyTorch's dozen small ops rather than passes over memory."""
    if w.dtype is not torch.float32 or not w.is_cpu or not w.is_contiguous() or w.dim() < 2:
        return None
    k = _get()
    if not k:
        return None
    wd = w.detach()
    out = torch.empty_like(wd)
    scales = torch.empty(w.shape[0], dtype=torch.float32)
    k[3](wd.view(w.shape[0], -1).numpy(), out.view(w.shape[0], -1).numpy(), scales.numpy(),
         np.float32(zero_amax), np.float32(qmax))
    return out, scales
