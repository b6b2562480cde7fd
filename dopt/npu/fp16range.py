"""FP16 range analysis: which NPU kernels' outputs leave what IEEE half can hold.

The NPU computes FP16 kernels in FP16, so a value beyond 65504 becomes inf (then NaN),
and a layer whose values all sit below the smallest normal half (6.1e-5) loses its signal
- on the phone exactly as on the emulated NPU. Before deployment, the prepared float graph
runs once in float32 (ONNX Runtime) on sample inputs: the calibration data where the caller
has some, otherwise seeded random data shaped like each input. Every kernel's output
(after the nodes fused into it) is measured; the ``fp16_range`` placement rule turns the
measurements into findings that name the layer, the range seen and the fix.
"""
from __future__ import annotations

import numpy as np

from ..quant.numerics import FP16_MAX, FP16_MIN_NORMAL
from .lower import IRGraph

_FLOAT = (1, 10, 11)   # TensorProto FLOAT, FLOAT16, DOUBLE


def sample_feeds(model, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded N(0, 1) data for every graph input (static shapes, as compiled)."""
    inits = {i.name for i in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in t.shape.dim]
        if t.elem_type in _FLOAT:
            feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
        else:
            feeds[vi.name] = np.zeros(dims, np.int64 if t.elem_type == 7 else np.int32)
    return feeds


def kernel_outputs(graph: IRGraph, cpu_nodes: set[str]) -> dict[str, str]:
    """``{kernel (host) node: the tensor it writes}`` for NPU kernels with a float output."""
    out = {}
    for n in graph.nodes:
        if n.fused_into or n.name in cpu_nodes or not n.outputs or n.op is None:
            continue
        out[n.name] = n.attrs.get("fused_output", n.outputs[0])
    return out


def measure(model, graph: IRGraph, cpu_nodes: set[str], feeds: dict | None = None) -> dict:
    """``{kernel: {"tensor", "amax", "min", "max", "nonfinite"}}`` from one float32 run."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    wanted = kernel_outputs(graph, cpu_nodes)
    if not wanted:
        return {}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    types = {vi.name: vi.type.tensor_type.elem_type for vi in m.graph.value_info}
    tensors = [t for t in dict.fromkeys(wanted.values()) if types.get(t, 1) in _FLOAT]
    for t in tensors:
        if t not in have:
            m.graph.output.append(helper.make_tensor_value_info(t, types.get(t, 1), None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(m.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        vals = dict(zip(names, sess.run(None, feeds or sample_feeds(model))))
    except Exception:  # noqa: BLE001 - no measurement is no finding, never a failed compile
        return {}
    stats = {}
    for t in tensors:
        v = vals.get(t)
        if v is None or not np.issubdtype(v.dtype, np.floating) or not v.size:
            continue
        finite = v[np.isfinite(v)].astype(np.float64)
        stats[t] = {"amax": float(np.abs(finite).max(initial=0.0)),
                    "min": float(finite.min(initial=0.0)), "max": float(finite.max(initial=0.0)),
                    "nonfinite": int(v.size - finite.size)}
    return {k: dict(stats[t], tensor=t) for k, t in wanted.items() if t in stats}


def problem(info: dict) -> str | None:
    """``"overflow"``, ``"underflow"`` or None for one measured kernel output."""
    if info["nonfinite"] or info["amax"] > FP16_MAX:
        return "overflow"
    if 0.0 < info["amax"] < FP16_MIN_NORMAL:
        return "underflow"
    return None
