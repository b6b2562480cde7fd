"""The checks every ``generate_final_model`` runs before it writes anything.

(1) The deployable float model must reproduce the trained float network (BN folding is
exact up to float re-association): ``max|diff| <= FUSE_RTOL * max|ref| + FUSE_ATOL``.
(2) The quantized deployable form (QDQ ONNX, or the frozen graph with the parameter file)
must reproduce the fake-quant model (the PyTorch adapter compares each quantized layer fed
the fake-quant model's own input for it, ``qdq.layer_models``, so ties do not accumulate):
``max|diff| <= QDQ_RTOL * max|ref| + QDQ_ATOL`` and
``mean|diff| <= QDQ_MEAN_RTOL * mean|ref| + QDQ_ATOL``. A rounding tie resolved differently
after float re-association moves one activation by one step and spreads downstream (seen:
mean 0.08 %, max 0.6 % on the MobileNetV2-style demo); a wrong scale or offset shows
everywhere. One definition for every adapter.
"""
from __future__ import annotations

import numpy as np

from ..errors import DoptError

FUSE_RTOL, FUSE_ATOL = 1e-4, 1e-5
QDQ_RTOL, QDQ_MEAN_RTOL, QDQ_ATOL = 2e-2, 2.5e-3, 1e-4
FLOAT_HINT = ("nothing was written. Causes seen: a model not in eval mode or with randomness "
              "at inference (dropout, noise), an op the exporter translates differently "
              "(a custom autograd function, an in-place trick, data-dependent control flow): "
              "rewrite it with standard ops, or export the model without that part")
QUANT_HINT = ("nothing was written. The float export matched, so a quantized layer computes "
              "differently once exported: set the layers around the largest difference to "
              "'float' in the config (dopt sensitivity ranks them), or re-run calibration if "
              "its ranges were changed after it")


def error_ratio(ref, got, rtol, atol, mean_rtol=None) -> float:
    """Worst ratio of error to tolerance over the outputs (> 1 fails)."""
    worst = 0.0
    for r, g in zip(ref, got):
        r, g = np.asarray(r, np.float64), np.asarray(g, np.float64)
        if r.shape != g.shape:
            return float("inf")
        d = np.abs(r - g)
        worst = max(worst, float(d.max(initial=0.0))
                    / (rtol * float(np.abs(r).max(initial=0.0)) + atol))
        if mean_rtol is not None and d.size:
            worst = max(worst, float(d.mean()) / (mean_rtol * float(np.abs(r).mean()) + atol))
    return worst


def check_float(ref, got, what="the exported float model") -> None:
    err = error_ratio(ref, got, FUSE_RTOL, FUSE_ATOL)
    if err > 1:
        raise DoptError(f"{what} does not reproduce the trained network (error {err:.2f}x the "
                        f"tolerance)", hint=FLOAT_HINT)


def check_quantized(ref, got, what="the QDQ ONNX model") -> None:
    err = error_ratio(ref, got, QDQ_RTOL, QDQ_ATOL, QDQ_MEAN_RTOL)
    if err > 1:
        raise DoptError(f"{what} does not reproduce the fake-quant model (error {err:.2f}x the "
                        f"tolerance: max {QDQ_RTOL}, mean {QDQ_MEAN_RTOL} relative)",
                        hint=QUANT_HINT)
