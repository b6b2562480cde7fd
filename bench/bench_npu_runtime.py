"""Emulated NPU: runtime throughput vs ONNX Runtime FP32, fidelity, and .om sizes.

    python -m bench.bench_npu_runtime [--models resnet8 mobilenetv2s resnet18
                                        efficientnet_lite0] [--images 2048] [--threads N]
                                        [--rounds 7]

For the two Fashion-MNIST demo networks: dopt calibration (min/max, 512 training images,
convolutions with Cin <= 16 left float as the NPU runs them), ``generate_final_model``,
``dopt omg`` FP16 and INT8 builds, then on the 10k test images the top-1 agreement of the
INT8 ``.om`` on the emulated NPU with the fake-quant PyTorch model. For ResNet-18
(ImageNet shape, random weights: size and speed do not depend on values) the same
pipeline calibrated on random inputs; EfficientNet-Lite0 (published weights) the same way
through the ONNX path (``dopt_so`` + ``dopt omg``). Throughput: batch 32, the emulated NPU
fast engine (FP16 and INT8 builds) against ONNX Runtime FP32 on the float ONNX model,
same process, same threads; 7 rounds, each running every engine in turn; images/s from
each engine's best round, slowdowns as the median over rounds of the ratio within a round.
The same models with the threads inside one whole-batch run (no slices,
``docs/omg.md``) are timed too. Writes
bench/results/npu_runtime.json.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from demos.fashion_mnist import data, demo
from dopt import runtime
from dopt.formats.fileio import write_json_atomic
from dopt.npu.omfile import read_om
from dopt.runtime.fast import WHOLE_BATCH, FastEngine
from dopt.formats import qdq as onnx_qdq
from dopt.dopt_torch.opt_main import generate_final_model
from dopt.npu import omg

from .bench_torch_qat import calibrate

OUT = Path(__file__).resolve().parent / "results"


def _pipeline(build, shape: str, calib: np.ndarray, dst: Path):
    cfg, _, _ = demo.npu_int8_config(build(), shape, dst)
    q = calibrate(build(), cfg, calib)
    torch.save(q.state_dict(), dst / "q.pth")
    files = generate_final_model(build(), str(cfg), pth_file=str(dst / "q.pth"),
                                 output_dir=str(dst / "final"))
    oms = {}
    for b in ("fp16", "int8"):
        args = ["--mode", "0", "--framework", "5", "--model", files["float_onnx"],
                "--output", str(dst / f"model_{b}"), "--input_shape", shape]
        if b == "int8":
            args += ["--compress_conf", files["param_file"]]
        omg.main(args)
        oms[b] = dst / f"model_{b}.om"
    return q, files, oms


CALIB_CONF = """strategy: "Quant_INT8-8"
device: USE_CPU
preprocess_parameter:
{
    input_type: BINARY
    input_file_path: "calib.bin"
}
"""


def _onnx_pipeline(float_onnx: Path, shape: str, calib: np.ndarray, dst: Path):
    """The no-training path a user of an ONNX model takes: ``dopt_so`` calibration, then
    ``dopt omg`` FP16 and INT8 (the same commands as in docs/quick_start)."""
    import subprocess
    import sys
    from dopt.calib.sets import write_bin610
    write_bin610(dst / "calib.bin", calib)
    (dst / "calib.prototxt").write_text(CALIB_CONF)
    py = [sys.executable, "-W", "ignore"]
    for cmd in (["-m", "dopt.dopt_so", "--mode", "0", "--framework", "5", "--model",
                 str(float_onnx), "--cal_conf", "calib.prototxt", "--output", "q.onnx",
                 "--input_shape", shape, "--compress_conf", "param", "--relax_path_rules"],
                ["-m", "dopt", "omg", "--framework", "5", "--model", str(float_onnx),
                 "--input_shape", shape, "--output", "model_fp16"],
                ["-m", "dopt", "omg", "--framework", "5", "--model", "q.onnx",
                 "--compress_conf", "param", "--input_shape", shape, "--output", "model_int8"]):
        r = subprocess.run(py + cmd, cwd=dst, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return {b: dst / f"model_{b}.om" for b in ("fp16", "int8")}


def _throughput(fns: dict, x: np.ndarray, peer: str, batch: int = 32,
                repeats: int = 7) -> tuple[dict, dict]:
    """Images/s of each engine (its best round) and each engine's time over the peer's,
    the median over rounds of the ratio within a round: the engines run in turn in every
    round, so a change in the machine's load hits a ratio's both sides."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            fn(x[:batch])  # warm
            t = time.perf_counter()
            for i in range(0, len(x) - batch + 1, batch):
                fn(x[i:i + batch])
            times[k].append(time.perf_counter() - t)
    n = (len(x) // batch) * batch
    ips = {k: n / min(v) for k, v in times.items()}
    ratio = {k: float(np.median(np.array(v) / np.array(times[peer])))
             for k, v in times.items() if k != peer}
    return ips, ratio


def bench_model(name: str, n_images: int, threads: int, rounds: int = 7) -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp)
        if name == "resnet18":
            from bench.zoo_models import resnet18
            rng = np.random.default_rng(0)
            calib = rng.standard_normal((64, 3, 224, 224)).astype(np.float32)
            x = rng.standard_normal((max(n_images // 8, 64), 3, 224, 224)).astype(np.float32)

            def build():
                torch.manual_seed(0)
                return resnet18().eval()
            q, files, oms = _pipeline(build, "input:1,3,224,224", calib, dst)
            labels = None
        elif name == "efficientnet_lite0":
            # ImageNet EfficientNet-Lite0 (bench/efficientnet_lite.py, published weights)
            # through the ONNX path; random inputs as for ResNet-18
            from bench import efficientnet_lite
            rng = np.random.default_rng(0)
            calib = rng.standard_normal((16, 3, 224, 224)).astype(np.float32)
            x = rng.standard_normal((max(n_images // 8, 64), 3, 224, 224)).astype(np.float32)
            efficientnet_lite.export_onnx(dst / "float.onnx", efficientnet_lite.load_pretrained()
                                          .eval(), opset=17)
            files = {"float_onnx": str(dst / "float.onnx")}
            oms = _onnx_pipeline(dst / "float.onnx", "x:1,3,224,224", calib, dst)
            labels = None
        else:
            xtr, _ = data.load("train")
            x, labels = data.load("test")
            calib = xtr[np.random.default_rng(0).permutation(len(xtr))[:512]]
            q, files, oms = _pipeline(lambda: demo.build_float(name), "x:1,1,28,28", calib, dst)
        row = {"model": name, "om_bytes": {b: p.stat().st_size for b, p in oms.items()}}
        row["int8_over_fp16_size"] = row["om_bytes"]["int8"] / row["om_bytes"]["fp16"]
        sess = {b: runtime.load(p, threads=threads) for b, p in oms.items()}
        ort_fp32 = onnx_qdq.ort_session(files["float_onnx"], optimize=True, threads=threads)
        iname = ort_fp32.get_inputs()[0].name
        if labels is not None:
            pred_fq = demo.predict(q, x)
            pred_npu = sess["int8"].predict(x, 500).argmax(1)
            pred_fp16 = sess["fp16"].predict(x, 500).argmax(1)
            pred_float = demo.predict_onnx(files["float_onnx"], x)
            row.update({
                "fake_quant_top1": float(100 * (pred_fq == labels).mean()),
                "npu_int8_top1": float(100 * (pred_npu == labels).mean()),
                "int8_agreement_with_fake_quant": float(100 * (pred_npu == pred_fq).mean()),
                "npu_fp16_top1": float(100 * (pred_fp16 == labels).mean()),
                "fp16_agreement_with_float": float(100 * (pred_fp16 == pred_float).mean())})
        xs = x[:n_images]
        fns = {"ort_fp32": lambda b: ort_fp32.run(None, {iname: b}),
               "npu_fp16": lambda b: sess["fp16"].run(b),
               "npu_int8": lambda b: sess["int8"].run(b)}
        for b in ("fp16", "int8"):  # each model with its threads inside one batch's run
            if sess[b]._engine.lanes > 1:
                one = FastEngine(read_om(oms[b]), threads=threads, lanes=1)
                one.slice = WHOLE_BATCH  # no slices: the whole batch in one run
                fns[f"npu_{b}_one_run"] = (lambda e, n: lambda v: e.run({n: v}))(
                    one, one.sess.get_inputs()[0].name)
        ips, ratio = _throughput(fns, xs, "ort_fp32", repeats=rounds)
        row["images_per_s"] = ips
        # None: every batch in one run (a float model whose slices would not pay)
        row["slice_samples"] = {b: sess[b]._engine.slice if sess[b]._engine.lanes > 1 else None
                                for b in sess}
        row["int8_lanes"] = sess["int8"]._engine.lanes
        row["slowdown_vs_ort_fp32"] = {k[4:]: v for k, v in ratio.items()}
        row["estimated_ms"] = {b: (sess[b].estimate or {}).get("summary", {}).get("total_ms")
                               for b in sess}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+",
                    default=["resnet8", "mobilenetv2s", "resnet18", "efficientnet_lite0"])
    ap.add_argument("--images", type=int, default=2048, help="images timed per engine")
    ap.add_argument("--threads", type=int, default=0, help="0: ONNX Runtime's default")
    ap.add_argument("--rounds", type=int, default=7,
                    help="rounds of every engine in turn; the slowdown is the median of the "
                         "per-round ratios (more rounds on a noisy machine)")
    ap.add_argument("--results", default=str(OUT / "npu_runtime.json"))
    a = ap.parse_args(argv)
    if a.rounds < 1:
        ap.error(f"--rounds must be at least 1 (got {a.rounds}): the slowdown is a median "
                 "over rounds")
    warnings.filterwarnings("ignore")
    rows = [bench_model(m, a.images, a.threads, a.rounds) for m in a.models]
    doc = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or 'cpu'}, "
           f"{__import__('os').cpu_count()} logical CPUs, {platform.system()}",
           "command": "python -m bench.bench_npu_runtime "
           + " ".join(sys.argv[1:] if argv is None else argv), "rows": rows}
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(a.results, doc, indent=1)
    print("\n| model | INT8/FP16 .om size | INT8 agreement w/ fake-quant | FP16 agreement w/ float "
          "| ORT FP32 img/s | NPU FP16 img/s (slowdown) | NPU INT8 img/s (slowdown) "
          "| one batch per run: FP16 / INT8 slowdown |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ips, sl = r["images_per_s"], r["slowdown_vs_ort_fp32"]
        print(f"| {r['model']} | {r['int8_over_fp16_size']:.3f} "
              f"({r['om_bytes']['int8'] / 1e6:.2f} / {r['om_bytes']['fp16'] / 1e6:.2f} MB) | "
              f"{r.get('int8_agreement_with_fake_quant', float('nan')):.2f} % | "
              f"{r.get('fp16_agreement_with_float', float('nan')):.2f} % | "
              f"{ips['ort_fp32']:.0f} | {ips['npu_fp16']:.0f} ({sl['fp16']:.2f}x) | "
              f"{ips['npu_int8']:.0f} ({sl['int8']:.2f}x) | "
              + " / ".join(f"{sl[f'{b}_one_run']:.2f}x" if f"{b}_one_run" in sl else "-"
                           for b in ("fp16", "int8")) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
