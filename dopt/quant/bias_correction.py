"""Bias correction for weight quantization (Nagel et al. 2019, "Data-Free Quantization
Through Weight Equalization and Bias Correction"), with the input means measured on
calibration data rather than derived from BatchNorm (the empirical variant; Finkelstein
et al. 2019, "Fighting Quantization Bias With Bias").

Why: rounding weights is a systematic error ``dW = w_fq - w`` that does not average out
over the data: a layer's output moves on average by ``E[dW x] = dW E[x]``, which
shifts every downstream activation (and its calibrated range). Subtracting that expected
shift from the bias removes the bias of the error for the price of one mean per input
channel, collected with a mergeable ``ChannelMeanObserver`` during calibration.
"""
from __future__ import annotations

import numpy as np


def weight_bias_shift(w, w_fq, input_channel_mean, *, groups: int = 1) -> np.ndarray:
    """Expected output shift per output channel, ``E[(w_fq - w) x]`` (float64, shape (C,)).

    ``w``/``w_fq``: linear ``(C, K)`` or convolution ``(C, Cin/groups, kh, kw)``
    (depthwise: ``groups = Cin``); ``input_channel_mean``: ``(Cin,)``. For a
    convolution every kernel tap sees the channel mean, i.e. padding is ignored
    (border outputs see some zeros instead).
    """
    w = np.asarray(w, dtype=np.float64)
    w_fq = np.asarray(w_fq, dtype=np.float64)
    m = np.asarray(input_channel_mean, dtype=np.float64)
    if w.shape != w_fq.shape:
        raise ValueError(f"w {w.shape} and w_fq {w_fq.shape} differ in shape")
    if w.ndim < 2:
        raise ValueError(f"weight must have >= 2 dims (out, in, ...), got {w.shape}")
    if not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups!r}")
    c, cpg = w.shape[0], w.shape[1]
    if c % groups:
        raise ValueError(f"groups={groups} does not divide the {c} output channels")
    if m.shape != (cpg * groups,):
        raise ValueError(f"input_channel_mean must have shape ({cpg * groups},) "
                         f"(= {cpg} x {groups} groups), got {m.shape}")
    dw = (w_fq - w).reshape(c, cpg, -1).sum(axis=2)          # sum over kernel taps
    dw = dw.reshape(groups, c // groups, cpg)
    return np.einsum("goi,gi->go", dw, m.reshape(groups, cpg)).reshape(c)


def corrected_bias(b, w, w_fq, input_channel_mean, *, groups: int = 1) -> np.ndarray:
    """``b - weight_bias_shift(...)`` in ``b``'s dtype (``b=None``: a zero bias)."""
    shift = weight_bias_shift(w, w_fq, input_channel_mean, groups=groups)
    if b is None:
        return (-shift).astype(np.float32)
    b = np.asarray(b)
    if b.shape != shift.shape:
        raise ValueError(f"bias must have shape {shift.shape}, got {b.shape}")
    return (b - shift).astype(b.dtype)


class ChannelMeanObserver:
    """Per-channel mean of a layer input, streaming and exactly mergeable (sum, count).

    ``axis=1`` is the channel axis of NCHW tensors and of ``(N, K)`` linear inputs
    (``axis=-1`` for NHWC). Sums are float64, so batches, one pass and merged ranks agree
    to rounding.
    """

    name = "channel_mean"

    def __init__(self, axis: int = 1):
        if not isinstance(axis, (int, np.integer)):
            raise ValueError(f"axis must be an integer, got {axis!r}")
        self.axis = int(axis)
        self.sum: np.ndarray | None = None
        self.count = 0

    @property
    def empty(self) -> bool:
        return self.count == 0

    def _add(self, s: np.ndarray, n: int) -> None:
        if self.sum is None:
            self.sum = np.zeros(s.shape[0], np.float64)
        elif s.shape[0] != self.sum.shape[0]:
            raise ValueError(f"observer has {self.sum.shape[0]} channels, got {s.shape[0]}")
        self.sum += s
        self.count += n

    def update(self, x) -> None:
        x = np.asarray(x)
        if not -x.ndim <= self.axis < x.ndim:
            raise ValueError(f"tensor of shape {x.shape} has no channel axis {self.axis}")
        ax = self.axis % x.ndim
        if not x.size:
            return
        if ax == 1 and x.ndim > 2 and x.dtype == np.float32:
            # NCHW fast path: float32 pairwise sums over each (sample, channel) plane, then
            # float64 across samples - no float64 copy of the whole tensor
            planes = np.ascontiguousarray(x).reshape(x.shape[0], x.shape[1], -1).sum(axis=2)
            self._add(planes.sum(axis=0, dtype=np.float64), x.size // x.shape[ax])
            return
        red = tuple(i for i in range(x.ndim) if i != ax)
        self._add(x.sum(axis=red, dtype=np.float64), x.size // x.shape[ax])

    def state(self) -> dict:
        return {"axis": self.axis, "count": self.count,
                "sum": None if self.sum is None else self.sum.tolist()}

    def merge(self, state: dict) -> None:
        if int(state["axis"]) != self.axis:
            raise ValueError(f"cannot merge a channel mean over axis {state['axis']} "
                             f"into one over axis {self.axis}")
        if state["count"]:
            self._add(np.asarray(state["sum"], np.float64), int(state["count"]))

    def mean(self) -> np.ndarray:
        if self.empty:
            raise ValueError("channel mean of no data")
        return self.sum / self.count
