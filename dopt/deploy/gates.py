"""Deployment gates: each a named check with its value, threshold and a one-line verdict.

Accuracy is judged on the deployed build (the ``.om`` on the emulated NPU) against the
float model; latency, size and memory on the compiler's estimate and the ``.om`` file;
regression gates against the ``report.json`` of an earlier run.
"""
from __future__ import annotations


def _row(gate: str, passed: bool, value, threshold, message: str) -> dict:
    return {"gate": gate, "passed": bool(passed), "value": value, "threshold": threshold,
            "message": message}


def check(gates: dict, r: dict, baseline: dict | None) -> list[dict]:
    rows = []
    name = r["metric_name"]
    fv, dv = r["float"]["metric"], r["deployed"]["metric"]
    if "accuracy" in gates:
        g = gates["accuracy"]
        limit = r["max_drop_abs"]
        drop = fv - dv
        shown = f"{g['max_drop'] * 100:g}% of float = {limit:.4f}" if g["relative"] \
            else f"{limit:g}"
        rows.append(_row("accuracy.max_drop", drop <= limit + 1e-12, drop, limit,
                         f"{name}: float {fv:.4f} -> deployed {dv:.4f}, drop {drop:.4f} "
                         f"(max {shown})"))
    if "agreement" in gates:
        lim = gates["agreement"]["min"]
        a = r["agreement"]
        rows.append(_row("agreement.min", a is not None and a >= lim, a, lim,
                         "deployed vs simulated top-1 agreement " +
                         (f"{a:.3f}%" if a is not None else "not measurable (the evaluation "
                          "produced no per-sample outputs)") + f" (min {lim:g}%)"))
    if "latency" in gates:
        g = gates["latency"]
        if "max_ms" in g:
            v = r["latency_ms"]["deployed"]
            rows.append(_row("latency.max_ms", v is not None and v <= g["max_ms"], v,
                             g["max_ms"], f"estimated latency of model.om {v:.4f} ms "
                             f"(max {g['max_ms']:g} ms; an estimate, not a measurement)"))
        if "fp16_max_ms" in g:
            v = r["latency_ms"]["fp16"]
            rows.append(_row("latency.fp16_max_ms", v is not None and v <= g["fp16_max_ms"], v,
                             g["fp16_max_ms"], f"estimated latency of model_fp16.om {v:.4f} ms "
                             f"(max {g['fp16_max_ms']:g} ms; an estimate)"))
    if "size" in gates:
        v, lim = r["size_mb"]["deployed"], gates["size"]["max_mb"]
        rows.append(_row("size.max_mb", v <= lim, v, lim,
                         f"model.om is {v:.4f} MB (max {lim:g} MB)"))
    if "memory" in gates:
        v, lim = r["memory_mib"], gates["memory"]["max_mb"]
        rows.append(_row("memory.max_mb", v <= lim, v, lim,
                         f"estimated peak memory {v:.4f} MiB (weights + live activations; "
                         f"max {lim:g})"))
    if "placement" in gates:
        g = gates["placement"]
        lim = 0 if g.get("strict") else g.get("max_cpu_nodes")
        if lim is not None:
            p = r["placement"]
            shown = ", ".join(p["cpu_nodes"][:8]) or "none"
            rows.append(_row("placement.strict" if g.get("strict") else "placement.max_cpu_nodes",
                             p["cpu_count"] <= lim, p["cpu_count"], lim,
                             f"{p['cpu_count']} node(s) fall back to the CPU ({shown}; max {lim})"))
    if "regression" in gates and baseline is not None:
        g = gates["regression"]
        lim = baseline["metric"] - g["accuracy_tolerance"]
        rows.append(_row("regression.accuracy", dv >= lim - 1e-12, dv, lim,
                         f"deployed {name} {dv:.4f} vs baseline {baseline['metric']:.4f} "
                         f"(min {lim:.4f})"))
        v = r["latency_ms"]["deployed"]
        lim = baseline["latency_ms"] * (1 + g["latency_tolerance"])
        rows.append(_row("regression.latency", v is not None and v <= lim + 1e-12, v, lim,
                         f"estimated latency {v:.4f} ms vs baseline {baseline['latency_ms']:.4f}"
                         f" ms (max {lim:.4f})"))
        v = r["size_mb"]["deployed"]
        lim = baseline["size_mb"] * (1 + g["size_tolerance"])
        rows.append(_row("regression.size", v <= lim + 1e-12, v, lim,
                         f"model.om {v:.4f} MB vs baseline {baseline['size_mb']:.4f} MB "
                         f"(max {lim:.4f})"))
    return rows
