"""The peer quantizers of the PTQ benchmark: ONNX Runtime ``quantize_static`` and NNCF.

Each function takes the float ONNX model file, the calibration samples (float32, N x ...,
the same array for every method) and the path of the QDQ model to write. They run inside a
``bench.bench_ptq --worker`` subprocess, which measures wall time and memory around the call;
everything a peer does to the model (its own preprocessing, optimization, calibration, range
computation, writing the model) is inside the measured call.

ONNX Runtime (1.31): ``quantize_static(quant_format=QDQ, per_channel=True,
activation_type=QInt8, weight_type=QInt8, calibrate_method=MinMax|Entropy|Percentile)``.
``op_types_to_quantize=["Conv", "Gemm", "MatMul"]`` (dopt's NPU INT8 op set) unless
``all_ops``, which leaves ORT's default (every op it has a quantizer for). Notes from ORT's
source (``onnxruntime/quantization/calibrate.py``):

* MinMax adds ReduceMin/ReduceMax nodes to the graph, so it keeps only two numbers per tensor
  and batch (memory about flat in the sample count); Entropy and Percentile keep ALL
  calibrated intermediate tensors of ALL calibration batches in memory before building the
  histograms, so their peak memory grows linearly with the number of samples (16 GB for
  EfficientNet-Lite0 at 256 samples of 224x224);
* Entropy builds histograms over +-max|x| and, with its defaults (num_bins =
  num_quantized_bins = 128), the KL search has a single candidate: the scales and zero points
  it writes are exactly MinMax's (checked on resnet8: identical QuantizeLinear parameters),
  so ``ort:entropy`` rows equal ``ort:minmax`` rows, at 10x the time and memory.
  ``quantize_static`` has no option for the bin counts (its calibration extra_options are
  CalibTensorRangeSymmetric, CalibMovingAverage(Constant), CalibMaxIntermediateOutputs and
  CalibPercentile), so this is what a ``quantize_static`` user gets;
* Percentile (default 99.999 %, 2048 bins) is two-sided, i.e. asymmetric, unless
  ``CalibTensorRangeSymmetric`` is set (neither Entropy nor Percentile is symmetric by
  default in ORT 1.31);
* weights are symmetric per output channel (``WeightSymmetric`` defaults to True for QInt8),
  activations asymmetric (``ActivationSymmetric`` False) - a symmetric calibrated range simply
  gives a zero point of about 0.

``quant_pre_process`` (symbolic shape inference + ORT graph optimization) is NOT applied: the
float models handed over are already exported with BatchNorm folded (torch models) or are a
plain converted graph (PP-OCR), ``quantize_static`` runs ONNX shape inference itself, and it
works on them without it; the quantized graph then has exactly the float graph's structure.

NNCF (3.4.0): ``nncf.quantize(onnx.ModelProto, nncf.Dataset(...), subset_size=K)`` with its
defaults: preset PERFORMANCE (symmetric INT8 weights and activations), target_device ANY,
MinMax statistics (activations: min of per-sample minima / max of per-sample maxima; weights:
per-channel), FastBiasCorrection on (``fast_bias_correction=True``), no SmoothQuant (only for
``model_type=TRANSFORMER``). Its dataset items are single samples (batch 1; ``subset_size``
counts items). NNCF places quantizers from its hardware config (inputs of Conv, Gemm, MatMul,
but also Add, Mul, pooling, Concat, ...); to give it the same op set as the other peers,
``op_types`` ignores every other node type through ``IgnoredScope(types=..., validate=False)``;
``op_types=None`` (``--peer-all-ops``) keeps NNCF's own placement.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

NPU_OPS = ["Conv", "Gemm", "MatMul"]
ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def _input_name(model_path) -> str:
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    names = [i.name for i in m.graph.input if i.name not in inits]
    if len(names) != 1:
        raise ValueError(f"{model_path}: expected one input, got {names}")
    return names[0]


def ort_quantize(model_path, calib: np.ndarray, out_path, method: str = "minmax",
                 all_ops: bool = False, batch: int = 16, extra_options: dict | None = None):
    """ONNX Runtime static QDQ quantization; returns a dict of facts for the results."""
    import onnxruntime
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    name = _input_name(model_path)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(calib):
                return None
            x = np.ascontiguousarray(calib[self.i:self.i + batch], dtype=np.float32)
            self.i += batch
            return {name: x}

        def rewind(self):
            self.i = 0

    out_path = Path(out_path)
    quantize_static(
        str(model_path), str(out_path), Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=None if all_ops else list(NPU_OPS),
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, ORT_METHODS[method]),
        extra_options=dict(extra_options or {}),
    )
    return {"tool": f"onnxruntime {onnxruntime.__version__}", "batch": batch,
            "op_types": "ort-default" if all_ops else NPU_OPS,
            "extra_options": extra_options or {}}


def nncf_quantize(model_path, calib: np.ndarray, out_path, op_types=tuple(NPU_OPS),
                  preset: str | None = None):
    """NNCF post-training quantization of an ONNX model; returns facts for the results."""
    import nncf
    import onnx

    model = onnx.load(str(model_path))
    name = _input_name(model_path)
    dataset = nncf.Dataset(range(len(calib)),
                           lambda i: {name: np.ascontiguousarray(calib[i:i + 1], np.float32)})
    kw = {}
    if preset:
        kw["preset"] = getattr(nncf.QuantizationPreset, preset.upper())
    ignored = []
    if op_types is not None:
        ignored = sorted({n.op_type for n in model.graph.node} - set(op_types))
        kw["ignored_scope"] = nncf.IgnoredScope(types=ignored, validate=False)
    q = nncf.quantize(model, dataset, subset_size=len(calib), **kw)
    onnx.save(q, str(out_path))
    return {"tool": f"nncf {nncf.__version__}", "batch": 1, "preset": preset or "default",
            "op_types": list(op_types) if op_types is not None else "nncf-default",
            "ignored_types": ignored}
