"""Post-training quantization, written once for every framework.

``run_ptq`` (``algorithm.py``) is the algorithm - layer selection, ``exclude_op``,
cross-layer equalization, calibration, bias correction, quantization parameters and the
check against float - on top of ``PtqBackend`` (``backend.py``), the few operations a
framework supplies. The ONNX, PyTorch and TensorFlow adapters implement the backend.
"""
from .algorithm import PtqOutcome, run_ptq
from .backend import PtqBackend, PtqLayer
from .job import DEFAULT_BIAS_CORRECTION, DEFAULT_EQUALIZATION, PtqJob, PtqOptions

__all__ = ["DEFAULT_BIAS_CORRECTION", "DEFAULT_EQUALIZATION", "PtqBackend", "PtqJob",
           "PtqLayer", "PtqOptions", "PtqOutcome", "run_ptq"]
