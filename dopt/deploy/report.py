"""Reports of a deploy run: JUnit XML for a CI system, one self-contained HTML page for a
person (charts as embedded PNG, no external file or script)."""
from __future__ import annotations

import base64
import html
import io
import xml.etree.ElementTree as ET

from ..formats.fileio import atomic_path


def write_junit(path, report: dict) -> None:
    """One ``testcase`` per gate; a failed gate is a ``failure`` with its message."""
    gates = report["gates"]
    suite = ET.Element("testsuite", name="dopt deploy", tests=str(len(gates)),
                       failures=str(sum(not g["passed"] for g in gates)), errors="0",
                       skipped="0", time=f"{report.get('seconds', 0) or 0:.3f}",
                       timestamp=report.get("created", ""))
    props = ET.SubElement(suite, "properties")
    for k, v in (("model", report["config"]["model"]),
                 ("profile", (report["config"].get("profile") or {}).get("name", "")),
                 ("dopt", report["versions"]["dopt"])):
        ET.SubElement(props, "property", name=k, value=str(v))
    for g in gates:
        case = ET.SubElement(suite, "testcase", classname="dopt.deploy.gates", name=g["gate"],
                             time="0")
        if not g["passed"]:
            f = ET.SubElement(case, "failure", message=g["message"], type="GateFailed")
            f.text = f"{g['gate']}: value {g['value']}, threshold {g['threshold']}"
        else:
            out = ET.SubElement(case, "system-out")
            out.text = g["message"]
    root = ET.Element("testsuites", name="dopt deploy", tests=suite.get("tests"),
                      failures=suite.get("failures"), errors="0")
    root.append(suite)
    ET.indent(root)
    with atomic_path(path) as tmp:
        tmp.write_bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _charts(report: dict) -> dict[str, str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    out = {}
    r = report["results"]
    names = ["float", "simulated", "deployed (INT8 .om)", "deployed (FP16 .om)"]
    vals = [r["float"]["metric"], r["simulated"]["metric"], r["deployed"]["metric"],
            r["deployed_fp16"]["metric"]]
    fig, ax = plt.subplots(figsize=(6.5, 2.8))
    bars = ax.bar(names, vals, color=["#888", "#4a90d9", "#2a6", "#c84"])
    lo = min(vals)
    span = max(vals) - lo
    ax.set_ylim(lo - max(span, abs(lo) * 0.01 + 1e-6) * 2, max(vals) + max(span, 1e-6) * 0.8)
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom",
                fontsize=8)
    ax.set_ylabel(r["metric_name"])
    ax.set_title("accuracy chain")
    out["chain"] = _png(fig)
    lat = report.get("per_layer_latency") or []
    if lat:
        lat = sorted(lat, key=lambda x: -x["fp16_ms"])[:30]
        fig, ax = plt.subplots(figsize=(7.5, max(2.5, 0.22 * len(lat) + 1)))
        y = range(len(lat))
        ax.barh([i + 0.2 for i in y], [x["fp16_ms"] for x in lat], height=0.4,
                label="FP16", color="#c84")
        ax.barh([i - 0.2 for i in y], [x["int8_ms"] for x in lat], height=0.4,
                label="INT8", color="#2a6")
        ax.set_yticks(list(y))
        ax.set_yticklabels([x["layer"] + (" *" if x["in_build"] == "fp16" else "")
                            for x in lat], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("estimated ms (estimate, not a measurement)")
        ax.set_title("per-layer latency (* kept FP16 in this build)")
        ax.legend(fontsize=7)
        out["latency"] = _png(fig)
    sens = (report.get("sensitivity") or {}).get("table") or []
    if sens:
        rows = sens[:30]
        total = sum(x["noise_only_int8"] for x in sens) or 1.0
        fig, ax = plt.subplots(figsize=(7.5, max(2.5, 0.22 * len(rows) + 1)))
        chosen = set(report["quantization"]["fp16_layers"])
        ax.barh(range(len(rows)), [x["noise_only_int8"] / total * 100 for x in rows],
                color=["#c84" if x["layer"] in chosen else "#4a90d9" for x in rows])
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([x["layer"] for x in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("share of the all-INT8 output noise (%), only this layer INT8")
        ax.set_title("per-layer sensitivity (orange: kept FP16)")
        out["sensitivity"] = _png(fig)
    return out


def _table(head: list[str], rows: list[list]) -> str:
    e = html.escape
    th = "".join(f"<th>{e(str(h))}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{c if str(c).startswith('<span') else e(str(c))}</td>"
                                   for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def _fmt(v, nd=4) -> str:
    if v is None:
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def write_html(path, report: dict) -> None:
    e = html.escape
    r = report["results"]
    charts = _charts(report)
    ok = report["status"] == "passed"
    badge = (f"<span class='{'pass' if ok else 'fail'}'>"
             f"{'PASSED' if ok else 'FAILED'}</span>")
    gates = _table(["gate", "result", "value", "threshold", "detail"],
                   [[g["gate"], f"<span class='{'pass' if g['passed'] else 'fail'}'>"
                     f"{'pass' if g['passed'] else 'FAIL'}</span>", _fmt(g["value"]),
                     _fmt(g["threshold"]), g["message"]] for g in report["gates"]]) \
        if report["gates"] else "<p>No gates configured.</p>"
    chain = _table(["model", r["metric_name"], "drop vs float", "runs on"], [
        ["float", _fmt(r["float"]["metric"]), "-", r["float"]["runs_on"]],
        ["simulated, all INT8", _fmt(r["simulated_all_int8"]["metric"]),
         _fmt(r["simulated_all_int8"]["drop"]), "ONNX Runtime, QDQ"],
        ["simulated (this build)", _fmt(r["simulated"]["metric"]), _fmt(r["simulated"]["drop"]),
         r["simulated"]["runs_on"]],
        ["deployed (this build)", _fmt(r["deployed"]["metric"]), _fmt(r["deployed"]["drop"]),
         r["deployed"]["runs_on"]],
        ["deployed FP16", _fmt(r["deployed_fp16"]["metric"]), _fmt(r["deployed_fp16"]["drop"]),
         r["deployed_fp16"]["runs_on"]]])
    p = r["placement"]
    place = _table(["outcome", "nodes"], [[k, v] for k, v in p["summary"].items()])
    if p["cpu_nodes"]:
        place += "<p>On the CPU: " + e(", ".join(p["cpu_nodes"])) + "</p>"
    perf = _table(["build", "estimated ms", "size MB"], [
        ["this build (model.om)", _fmt(r["latency_ms"]["deployed"]),
         _fmt(r["size_mb"]["deployed"])],
        ["all INT8", _fmt(r["latency_ms"]["int8_all"]), "-"],
        ["FP16 (model_fp16.om)", _fmt(r["latency_ms"]["fp16"]), _fmt(r["size_mb"]["fp16"])]])
    mp = report.get("mixed_precision")
    if mp:
        chosen = _table(["rank", "layer", "gain", "FP16 extra ms", "why"],
                        [[c["rank"], c["layer"], f"{c['gain']:.4g}", f"{c['fp16_extra_ms']:.4f}",
                          c["why"]] for c in mp["chosen"]]) if mp["chosen"] else \
            "<p>No layer needed to stay FP16.</p>"
        steps = _table(["layers FP16", "simulated metric", "cached"],
                       [[s["float_layers"], _fmt(s["metric"]), s["cached"]]
                        for s in mp["steps"]])
        mixed = (f"<p>max_drop {_fmt(mp['max_drop'])}; {mp['full_evaluations']} full "
                 f"evaluation(s) ({mp['cached_evaluations']} cached) of a budget of "
                 f"{mp['budget']}; ranking by {e(mp['ranking'])} per ms; "
                 f"{'meets' if mp['passed'] else 'does NOT meet'} max_drop"
                 f"{' (budget exhausted: best build so far)' if mp['budget_exhausted'] else ''}"
                 f".</p>{chosen}<h3>Search</h3>{steps}")
    else:
        mixed = "<p>Not needed: the all-INT8 build meets the accuracy gate (or none is set).</p>"
    img = "".join(f"<img alt='{k}' src='{v}'>" for k, v in charts.items())
    sig = report.get("signing") or {}
    sig_txt = ("signed (model-signing, ECDSA P-256): " + ", ".join(sig.get("files", []))
               if sig.get("signed") else "NOT signed: " + sig.get("why", ""))
    steps = _table(["step", "seconds"], [[s["step"], s["seconds"]] for s in report["steps"]])
    vers = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dopt deploy report</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:.5em 0}} td,th{{border:1px solid #ccc;padding:3px 8px;
font-size:13px;text-align:left}} th{{background:#f3f3f3}} .pass{{color:#070;font-weight:bold}}
.fail{{color:#b00;font-weight:bold}} img{{max-width:100%;display:block;margin:1em 0}}
.note{{color:#666;font-size:12px}}
</style></head><body>
<h1>dopt deploy {badge}</h1>
<p>model <code>{e(report['config']['model'])}</code> ({e(report['config']['framework'])}),
profile {e(str((report['config'].get('profile') or {}).get('name')))}, {r['samples']} evaluation
samples; {e(report['created'])}</p>
<h2>Gates</h2>{gates}
<h2>Accuracy: float &rarr; simulated &rarr; deployed</h2>{chain}
<p>Deployed vs simulated top-1 agreement: {_fmt(r['agreement'], 3)} %</p>
<h2>Performance (estimate)</h2>{perf}<p class="note">{e(str(r.get('estimate_label') or ''))}</p>
<h2>Placement</h2>{place}
<h2>FP16 layers chosen, and why</h2>{mixed}
<h2>Charts</h2>{img}
<h2>Signing</h2><p>{e(sig_txt)}</p>
<h2>Steps</h2>{steps}
<p class="note">{e(vers)}</p>
</body></html>
"""
    with atomic_path(path) as tmp:
        tmp.write_text(doc, encoding="utf-8")
