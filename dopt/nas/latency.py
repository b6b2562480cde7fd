"""NPU latency of a candidate: the emulated compiler's cost-model estimate (``dopt omg``).

The candidate's ONNX goes through the compiler's own preparation, lowering and placement
(``dopt.npu.compiler.analyze``) and the cost model prices it twice: FP16 as compiled
without a parameter file, and INT8 with every layer the profile quantizes (what a
``dopt_so`` / QAT parameter file gives). Estimates, not measurements (docs/cost_model.md).
"""
from __future__ import annotations

from ..errors import DoptError


def estimate_onnx(path, profile) -> dict:
    """``{"latency_fp16_ms", "latency_int8_ms", "npu_gmacs"}`` of the ONNX file ``path``."""
    import onnx

    from ..npu.compiler import analyze
    from ..npu.costmodel import estimate
    from ..npu.precheck import precheck
    model = onnx.load(str(path))
    try:
        _, graph, report = analyze(model, profile, fp16_check=False, source=str(path))
    except DoptError as e:
        raise DoptError(f"the emulated NPU compiler refused a candidate: {e}",
                        hint="check PreNet/PostNet use operators the NPU supports "
                             "(dopt omg --mode 3 on a result shows which)") from None
    fp16 = estimate(graph, report, profile)
    int8_nodes = [n.name for n in graph.nodes if n.op and profile.int8_form(n.op)]
    int8 = estimate(graph, precheck(graph, profile, int8_nodes), profile)
    return {"latency_fp16_ms": float(fp16["summary"]["total_ms"]),
            "latency_int8_ms": float(int8["summary"]["total_ms"]),
            "npu_gmacs": float(fp16["summary"]["gmacs"])}
