"""The pre-check report (``dopt omg --mode 3``): per node, per op type, per partition."""
from __future__ import annotations

from collections import OrderedDict

from .lower import IRGraph
from .profile import HardwareProfile
from .rules import CPU, DEGRADED, FUSED, NPU, Context, Outcome, evaluate, runs_int8


def precheck(graph: IRGraph, profile: HardwareProfile, int8_nodes=(), *,
             fp16_ranges: dict | None = None, fp16_drift: dict | None = None) -> dict:
    """``fp16_ranges``: measured kernel outputs (``fp16range.measure``) for the FP16 range
    rule; ``fp16_drift``: ``fp16range.measure_drift``'s result for the FP16 drift rule."""
    ctx = Context(graph, profile, frozenset(int8_nodes), fp16_ranges or {}, fp16_drift or {})
    nodes = []
    for n in graph.nodes:
        outcome, findings = evaluate(n, ctx)
        nodes.append({"node": n.name, "onnx_op": n.onnx_op, "ir_op": n.op,
                      "int8": outcome is not CPU and runs_int8(n, ctx),
                      "outcome": outcome.value,
                      "findings": [f.as_dict() for f in findings]})
    fp16 = [{"node": x["node"], **f["values"]} for x in nodes for f in x["findings"]
            if f["rule"] == "fp16_range"]
    return {"profile": profile.stamp(), "nodes": nodes, "op_types": _by_op_type(nodes),
            "fp16_range": fp16,
            "fp16_drift": _drift_summary(fp16_drift),
            "partitions": _partitions(graph, nodes),
            "summary": {o.value: sum(1 for x in nodes if x["outcome"] == o)
                        for o in reversed(Outcome)}}


def _drift_summary(d: dict | None) -> dict | None:
    """The report's view of the drift measurement: the outputs, the bound, the named kernel
    and the ten kernels that drift most (the whole table stays out of the JSON)."""
    if not d:
        return None
    top = sorted(d["kernels"].items(), key=lambda kv: -kv[1])[:10]
    return {"tolerance": d["tolerance"], "outputs": d["outputs"], "first": d["first"],
            "exceeded": d["first"] is not None, "most_drift": dict(top)}


def _by_op_type(nodes: list[dict]) -> list[dict]:
    rows: "OrderedDict[tuple, dict]" = OrderedDict()
    for x in nodes:
        reason = "; ".join(sorted({f["rule"] for f in x["findings"]})) or "-"
        key = (x["ir_op"] or f"(ONNX {x['onnx_op']})", x["outcome"], reason)
        row = rows.setdefault(key, {"op": key[0], "count": 0, "outcome": key[1],
                                    "reason": reason, "nodes": []})
        row["count"] += 1
        row["nodes"].append(x["node"])
    return list(rows.values())


def _partitions(graph: IRGraph, nodes: list[dict]) -> list[dict]:
    """Consecutive runs (in graph order) on one device; fused nodes follow their host."""
    device_of_tensor = {t: "input" for t in graph.inputs}
    parts: list[dict] = []
    for n, x in zip(graph.nodes, nodes):
        dev = Outcome(x["outcome"]).device.value
        if x["outcome"] == FUSED and parts:
            dev = parts[-1]["device"]
        if not parts or parts[-1]["device"] != dev:
            parts.append({"id": len(parts), "device": dev, "nodes": [], "inputs_from": []})
        p = parts[-1]
        p["nodes"].append(n.name)
        for t in n.inputs:
            src = device_of_tensor.get(t)
            if src not in (None, dev, "input") and t not in p["inputs_from"]:
                p["inputs_from"].append(t)
        for t in n.outputs:
            device_of_tensor[t] = dev
    for p in parts:
        p["transfers_in"] = len(p.pop("inputs_from"))
    return parts


# what each count of ``report["prepared"]`` (``prepare(changes=...)``) means, for the text
PREPARED_TEXT = {
    "qdq_pairs_removed": "Quantize/Dequantize pairs removed (INT8 comes from the parameter file)",
    "sums_to_adds": "Sum nodes written as Adds",
    "inference_noops_removed": "inference no-ops removed (Dropout, Identity)",
    "shape_nodes_folded": "shape computations folded",
    "hard_activations_formed": "HardSigmoid/HardSwish formed from their element-wise formula",
    "transposes_cancelled": "Transposes cancelled (an exporter's layout changes)",
}


def render_text(report: dict) -> str:
    s = report["summary"]
    lines = [f"pre-check against {report['profile']['name']} {report['profile']['version']}: "
             f"{s[NPU]} on NPU, {s[DEGRADED]} on NPU degraded, {s[FUSED]} fused away, "
             f"{s[CPU]} CPU fallback", "",
             "| op | count | outcome | reason | nodes |", "|---|---|---|---|---|"]
    for r in report["op_types"]:
        names = ", ".join(r["nodes"][:6]) + (" ..." if len(r["nodes"]) > 6 else "")
        lines.append(f"| {r['op']} | {r['count']} | {r['outcome']} | {r['reason']} | {names} |")
    details = [x for x in report["nodes"] if x["findings"] and x["outcome"] != FUSED]
    if details:
        lines += ["", "details:"]
        for x in details:
            for f in x["findings"]:
                if f["outcome"] == FUSED:
                    continue
                lines.append(f"- {x['node']} ({x['ir_op'] or x['onnx_op']}): {f['message']}"
                             + (f" -> {f['hint']}" if f["hint"] else ""))
    if report.get("prepared"):
        lines += ["", "graph rewrites before lowering: " + ", ".join(
            f"{v} {PREPARED_TEXT.get(k, k)}" for k, v in report["prepared"].items())]
    if report.get("fusions"):
        from .costmodel import render_fusions
        lines += ["", f"fused kernels ({len(report['fusions'])}; execution-time fusion rules of "
                  f"the profile):"] + render_fusions(report["fusions"])
    lines += ["", "partitions: " + ", ".join(
        f"#{p['id']} {p['device']} ({len(p['nodes'])} nodes, {p['transfers_in']} transfers in)"
        for p in report["partitions"])]
    return "\n".join(lines)
