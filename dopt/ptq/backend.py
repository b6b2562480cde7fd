"""What a framework supplies to the core PTQ algorithm (NNCF-style backend protocol).

Weights are seen as deployed: BatchNorm folded in, output channels first (linear
``(C, K)``, convolution ``(C, Cin/groups, kh, kw)``). A backend changes them only through
``scale_channels`` and ``add_to_bias``, so it may keep BatchNorm unfolded in its own model
(scaling a folded channel is scaling gamma and beta) and files it writes keep the user's
parameter names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import numpy as np


@dataclass
class PtqLayer:
    """One quantizable layer (convolution or fully connected) with a constant weight."""

    name: str            # the source framework's layer name (what exclude_op and logs use)
    kind: str            # "conv" or "linear"
    groups: int          # convolution groups (1 for linear)
    cin: int             # input channels
    input: str           # key of the layer's activation input in ``run_batch`` results
    in_axis: int         # channel axis of that input (1 for NCHW / (N, K), -1 for NHWC)
    weight_name: str     # the weight's name (exclude_op may name weights, as the reference)

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and self.groups == self.cin


@runtime_checkable
class PtqBackend(Protocol):
    """The framework side of ``run_ptq``; every method is called from the core only."""

    def layers(self) -> dict[str, PtqLayer]:
        """Quantizable layers in graph order, keyed by ``PtqLayer.name``."""

    def weight(self, name: str) -> np.ndarray:
        """The deployed (BN-folded) float32 weight of a layer, output channels first."""

    def equalization_pairs(self) -> list[tuple[str, str]]:
        """``(producer, consumer)`` layer pairs through which CLE is exact.

        The producer's output reaches only the consumer, directly or through one
        positively homogeneous activation (identity, ReLU, LeakyReLU, PReLU); the consumer
        reads all of the producer's channels (dense) or one each (depthwise).
        """

    def scale_channels(self, name: str, *, out_scale: np.ndarray | None = None,
                       in_scale: np.ndarray | None = None) -> None:
        """Multiply a layer's deployed output channels (weight and bias) by ``out_scale``
        and/or the weights reading input channel ``i`` by ``in_scale[i]``."""

    def add_to_bias(self, name: str, delta: np.ndarray) -> bool:
        """Add ``delta`` to the deployed bias (per output channel); False if the layer has
        no place to carry it (the caller logs it and leaves the layer as it is)."""

    def run_batch(self, inputs: list[str]) -> Callable[[dict], dict]:
        """A function running one feed through the (float) model, returning the named
        layer inputs as NumPy arrays."""

    def write(self, plan: "QuantPlan") -> dict:
        """Write the quantized model and its parameter file; return ``{kind: path}``."""

    def outputs(self, feed: dict, *, quantized: bool) -> list[np.ndarray]:
        """The model's outputs for ``feed``: the user's float model before any change
        (``quantized=False``), or the quantized model as written (``True``)."""


@dataclass
class QuantPlan:
    """What ``run_ptq`` decided, for ``PtqBackend.write``."""

    quantized: list[str]                     # layer names, graph order
    float_layers: dict[str, str]             # layer name -> why it stays float
    ranges: dict[str, tuple[float, float]]   # layer name -> calibrated input range
    algorithm: str
    notes: list[str]
