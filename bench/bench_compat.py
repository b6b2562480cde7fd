"""Compatibility suite: public networks compiled and run on the emulated NPU, vs ONNX Runtime.

    python -m bench.bench_compat                      # Model Zoo (onnx wheel) + torchvision
    python -m bench.bench_compat --only zoo           # or: torchvision
    python -m bench.bench_compat --all-variants       # every torchvision variant
    python -m bench.bench_compat --write-doc          # regenerate docs/compatibility.md

Each network (``bench/compat_models.py``) runs in a fresh worker process under a time limit
(the compiler must never hang): compiled with FP32 weights and run on the CPU device, which
must match ONNX Runtime FP32 within 1e-4 (max |diff| / max |reference|); compiled FP16 and run
on the emulated NPU, which must stay within FP16 tolerance (relative error <= 2e-2 and the
same top-1 on every sample) unless the pre-check predicted an FP16 overflow/underflow, which
is then the reported reason. A network dopt does not support must be refused with a
``DoptError`` naming the node and the reason; anything else counts as a crash. Results:
``bench/results/compat.json`` and the table in ``docs/compatibility.md``.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dopt.formats.fileio import write_json_atomic
from dopt.quant.numerics import FP16_DRIFT_TOLERANCE

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "compat.json"
DOC = ROOT / "docs" / "compatibility.md"
TAG = "COMPAT_RESULT "
CPU_RTOL = 1e-4
FP16_RTOL = FP16_DRIFT_TOLERANCE   # one bound: the pre-check's fp16_drift rule reads it too
BATCH = 2


def rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    scale = float(np.max(np.abs(ref))) or 1.0
    return float(np.max(np.abs(got.astype(np.float64) - ref))) / scale


def _input(model, shape, seed=0) -> tuple[str, np.ndarray]:
    inits = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    free = not dims or dims[0] <= 0
    dims = list(shape) if shape else [d if d > 0 else 1 for d in dims]
    if free:
        dims[0] = BATCH
    x = np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
    return inp.name, x


def check(model, name: str, shape=None) -> dict:
    """Compile FP32 + FP16, run on the CPU device and the emulated NPU, compare with ORT."""
    import onnxruntime as ort

    from dopt import runtime
    from dopt.errors import DoptError
    from dopt.npu.compiler import compile_onnx
    from dopt.npu.profile import load_profile

    row: dict = {"model": name, "status": "ok"}
    in_name, x = _input(model, shape)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = ort.InferenceSession(model.SerializeToString(), so,
                               providers=["CPUExecutionProvider"]).run(None, {in_name: x})[0]
    profile = load_profile()
    shapes = {in_name: (1,) + tuple(x.shape[1:])}
    try:
        t0 = time.perf_counter()
        om32, report = compile_onnx(model, profile, input_shapes=shapes,
                                    weight_data_type="FP32", source=name)
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        s = report["summary"]
        row.update(nodes=sum(s.values()), npu=s["npu"] + s["npu_degraded"], fused=s["fused"],
                   cpu=s["cpu"], cpu_ops=sorted({x["onnx_op"] for x in report["nodes"]
                                                 if x["outcome"] == "cpu"}))
        row["fp16_range"] = [f["node"] for f in report.get("fp16_range", [])]
        drift = report.get("fp16_drift") or {}
        row["fp16_drift"] = {"predicted": max(drift["outputs"].values(), default=0.0),
                             "first": drift["first"]} if drift else None
        cpu = runtime.Session(om32, device="cpu").run({in_name: x})
        row["cpu_rel_err"] = rel_err(ref, next(iter(cpu.values())))
        om16, _ = compile_onnx(model, profile, input_shapes=shapes, source=name)
        npu = next(iter(runtime.Session(om16, device="npu").run({in_name: x}).values()))
        finite = bool(np.all(np.isfinite(npu)))
        row["npu_finite"] = finite
        row["npu_rel_err"] = rel_err(ref, npu) if finite else None
        row["npu_top1_agree"] = (float(np.mean(ref.reshape(len(ref), -1).argmax(1)
                                               == npu.reshape(len(npu), -1).argmax(1)))
                                 if finite else 0.0)
    except DoptError as e:
        row.update(status="refused", reason=str(e)[:400])
        return row
    ok_cpu = row["cpu_rel_err"] <= CPU_RTOL
    ok_npu = finite and row["npu_rel_err"] <= FP16_RTOL and row["npu_top1_agree"] == 1.0
    if not ok_cpu:
        row["status"] = "mismatch (CPU device)"
    elif not ok_npu and not finite:
        row["status"] = ("FP16 range (predicted)" if row["fp16_range"] else
                         "mismatch (emulated NPU)")
    elif not ok_npu:
        # Beyond the network-level bar: FP16 drift accumulated over many layers, or an
        # emulation error? Every kernel against the reference interpreter tells which.
        from dopt.runtime.verify import kernel_agreement
        rows = kernel_agreement(om16, {in_name: x[:1]}, npu=True)
        bad = [r["kernel"] for r in rows if not r["within_bound"]]
        row["kernels_outside_bound"] = bad[:10]
        predicted = bool(row["fp16_drift"] and row["fp16_drift"]["first"])
        row["status"] = ("mismatch (emulated NPU)" if bad else
                         "FP16 drift (predicted)" if predicted else "FP16 drift (not predicted)")
    return row


def _worker(kind: str, name: str) -> int:
    from bench import compat_models as cm
    t0 = time.perf_counter()
    try:
        if kind == "zoo":
            import onnx
            row = check(onnx.load(str(cm.zoo_models()[name])), name)
        else:
            m, shape = cm.export_torchvision(name)
            row = check(m, name, shape)
    except Exception as e:  # noqa: BLE001 - a crash is a result here
        import traceback
        traceback.print_exc()
        row = {"model": name, "status": "crash", "reason": f"{type(e).__name__}: {e}"[:400]}
    row.update(kind=kind, wall_s=round(time.perf_counter() - t0, 1))
    print(TAG + json.dumps(row), flush=True)
    return 0


def run_worker(cmd: list, tag: str, timeout: int, ident: dict) -> dict:
    """Run one network's worker process under ``timeout``; its result row (the line tagged
    ``tag``), or a timeout / crash row carrying ``ident`` and the reason."""
    try:
        r = subprocess.run([sys.executable] + cmd, cwd=ROOT, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**ident, "status": "timeout", "reason": f"no result within {timeout} s"}
    for line in r.stdout.splitlines():
        if line.startswith(tag):
            return json.loads(line[len(tag):])
    return {**ident, "status": "crash",
            "reason": (r.stderr.strip().splitlines() or ["no output"])[-1][:400]}


def run_one(kind: str, name: str, timeout: int) -> dict:
    return run_worker(["-m", "bench.bench_compat", "--worker", kind, name], TAG, timeout,
                      {"model": name, "kind": kind})


def merge_rerun(path: Path, result: dict, key) -> dict:
    """The last full result in ``path`` with the rows of ``result`` (a re-run of some
    networks) in place of theirs, and the re-run recorded under ``updates``."""
    full = json.loads(path.read_text())
    new = {key(r): r for r in result["rows"]}
    full["rows"] = [new.pop(key(r), r) for r in full["rows"]] + list(new.values())
    full.setdefault("updates", []).append({k: result[k] for k in ("command", "date", "machine")}
                                          | {"models": [r["model"] for r in result["rows"]]})
    return full


def table(rows: list[dict]) -> str:
    lines = ["| source | network | result | nodes (NPU / fused / CPU) | CPU ops | "
             "CPU device vs ORT | emulated NPU vs ORT | drift predicted at compile | top-1 | "
             "compile s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        src = "onnx Model Zoo" if r.get("kind") == "zoo" else "torchvision"
        if r["status"] in ("refused", "crash", "timeout"):
            lines.append(f"| {src} | {r['model']} | {r['status']}: {r.get('reason', '')} "
                         "| | | | | | | |")
            continue
        npu = (f"{r['npu_rel_err']:.1e}" if r.get("npu_rel_err") is not None else "non-finite")
        d = r.get("fp16_drift")
        drift = "-" if not d else (f"{d['predicted']:.1e}" + (f" (flagged at {d['first']})"
                                                              if d["first"] else ""))
        lines.append(
            f"| {src} | {r['model']} | {r['status']} | {r['nodes']} ({r['npu']} / {r['fused']} / "
            f"{r['cpu']}) | {', '.join(r['cpu_ops']) or '-'} | {r['cpu_rel_err']:.1e} | {npu} | "
            f"{drift} | {r['npu_top1_agree']:.0%} | {r.get('compile_s', '')} |")
    return "\n".join(lines)


def write_table(doc: Path, marker: str, result: dict, render) -> None:
    """Rewrite the block between ``<!-- marker:begin -->`` and ``<!-- marker:end -->`` of
    ``doc``: the command, machine and date of ``result``, its re-runs, and ``render(rows)``."""
    text = doc.read_text(encoding="utf-8")
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    a, b = text.index(begin) + len(begin), text.index(end)
    reruns = "".join(f"\n`{u['command']}` on {u['machine']}, {u['date']}: re-ran "
                     f"{', '.join(u['models'])}." for u in result.get("updates", []))
    body = (f"\n\n`{result['command']}` on {result['machine']}, {result['date']}.{reruns}\n\n"
            + render(result["rows"]) + "\n\n")
    doc.write_text(text[:a] + body + text[b:], encoding="utf-8")


def write_doc(result: dict) -> None:
    write_table(DOC, "compat", result, table)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("zoo", "torchvision"))
    ap.add_argument("--models", default="", help="comma-separated names (default: all)")
    ap.add_argument("--all-variants", action="store_true")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--write-doc", action="store_true", help="only rewrite the doc table")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return _worker(*a.worker)
    if a.write_doc:
        write_doc(json.loads(RESULTS.read_text()))
        return 0
    from bench import compat_models as cm
    jobs = []
    if a.only in (None, "zoo"):
        jobs += [("zoo", n) for n in cm.zoo_models()]
    if a.only in (None, "torchvision"):
        jobs += [("torchvision", n) for n in cm.torchvision_names(a.all_variants)]
    if a.models:
        want = set(a.models.split(","))
        jobs = [j for j in jobs if j[1] in want]
    rows = []
    for kind, name in jobs:
        r = run_one(kind, name, a.timeout)
        rows.append(r)
        print(f"{kind:12s} {name:22s} {r['status']:24s} "
              f"cpu={r.get('cpu', '-')} npu_err={r.get('npu_rel_err', '-')} "
              f"{r.get('reason', '')[:120]}", flush=True)
    result = {"command": "python -m bench.bench_compat " + " ".join(argv or sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
              "rows": rows}
    if not a.models and not a.only:
        write_json_atomic(RESULTS, result, indent=1)
        write_doc(result)
    elif a.models and RESULTS.is_file():
        # a re-run of some networks replaces their rows in the last full result and says so
        full = merge_rerun(RESULTS, result, lambda r: (r.get("kind"), r["model"]))
        write_json_atomic(RESULTS, full, indent=1)
        write_doc(full)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
