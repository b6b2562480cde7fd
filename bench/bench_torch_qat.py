"""PyTorch plugin-mode benchmark on Fashion-MNIST (ResNet-style and MobileNetV2-style).

    python -m bench.bench_torch_qat --data ../shared/data/fashion-mnist [--models resnet8]

For each network: float accuracy; dopt calibration only (min/max, 1024 images);
dopt QAT (1 epoch over the 60k training set, SGD momentum 0.9, lr 1e-4 cosine, BN frozen
half-way, cross-entropy + distillation from the float model; mean of 3 runs with different
batch orders); ONNX Runtime ``quantize_static``
(QDQ, per-channel, MinMax, same 1024 images) as the peer; QAT step time vs float
training step time; calibration wall time and peak RSS growth for 256 vs 2048
samples. Writes bench/results/torch_qat.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from demos.fashion_mnist import data, demo, models
from dopt.formats.fileio import write_json_atomic
from dopt_adapters.torch.distill import DistillationLoss
from dopt_adapters.torch.npu_edges import npu_numerics
from dopt.dopt_torch.opt_main import (freeze_bn_stats, generate_config_file, generate_final_model,
                                      optimize_model, set_calibrate_state)

from .memwatch import PeakRSS

OUT = Path(__file__).resolve().parent / "results"


def int8_config(model, dst: Path) -> Path:
    generate_config_file(model, "x:1,1,28,28", dst_path=str(dst / "gen.json"))
    cfg = json.loads((dst / "gen.json").read_text())
    for e in cfg["layer_strategy"].values():
        e["quant_strategy"] = "Quant_INT8-8"
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst / "config.json"


def calibrate(model, cfg, calib):
    q = optimize_model(model, str(cfg))
    set_calibrate_state(q, True)
    with torch.no_grad():
        for i in range(0, len(calib), 128):
            q(torch.from_numpy(calib[i:i + 128]))
    set_calibrate_state(q, False)
    return q


def acc(pred, y):
    return float(100 * (pred == y).mean())


def step_ratio(float_model, qat_model, xtr, ytr, steps=40, batch=64, seed=0) -> dict:
    """Float and QAT training steps timed in turn (the same batches, one after the other),
    so that a change in the machine's load hits both: medians and their ratio."""
    rng = np.random.default_rng(seed)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-5) for m in (float_model, qat_model)]
    times = ([], [])
    for m in (float_model, qat_model):
        m.train()
    for s in range(steps + 5):
        idx = rng.integers(0, len(xtr), batch)
        x, y = torch.from_numpy(xtr[idx]), torch.from_numpy(ytr[idx])
        for k, (m, opt) in enumerate(zip((float_model, qat_model), opts)):
            t = time.perf_counter()
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if s >= 5:
                times[k].append(time.perf_counter() - t)
    f, q = float(np.median(times[0])), float(np.median(times[1]))
    return {"float_step_s": f, "qat_step_s": q, "qat_step_ratio": q / f}


def qat(q, xtr, ytr, epochs=1.0, lr=1e-3, batch=64, seed=0, optimizer="sgd", freeze_at=0.5,
        teacher=None, kd_weight=1.0, kd_temp=2.0):
    """QAT loop; with ``teacher`` (the float model) the loss adds distillation towards it."""
    rng = np.random.default_rng(seed)
    if optimizer == "sgd":  # the reference's recipe: SGD with momentum on the quant model
        opt = torch.optim.SGD(q.parameters(), lr=lr, momentum=0.9)
    else:
        opt = torch.optim.Adam(q.parameters(), lr=lr)
    steps = int(epochs * len(xtr) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    kd = DistillationLoss(teacher, q, temperature=kd_temp, kd_weight=kd_weight) \
        if teacher is not None else None
    q.train()
    for s in range(steps):
        if s == int(freeze_at * steps) and hasattr(q, "dopt_quant_info"):
            freeze_bn_stats(q)
        idx = rng.integers(0, len(xtr), batch)
        xb = torch.from_numpy(xtr[idx])
        if rng.random() < 0.5:
            xb = xb.flip(3)  # the float training's augmentation
        logits = q(xb)
        labels = torch.from_numpy(ytr[idx])
        # CE + kd_weight * T^2 * KL(teacher_T || student_T): dopt.distill's loss
        loss = kd(logits, xb, labels) if kd is not None else F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return q


class _Reader:
    def __init__(self, x):
        self.it = iter([{"x": x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.it, None)


def ort_static(model, calib, work: Path, method: str = "MinMax"):
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    fp = work / "float.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.from_numpy(calib[:1]),), str(fp), dynamo=False,
                          opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    qp = work / f"ort_{method}.onnx"
    t = time.perf_counter()
    with PeakRSS() as mem:
        quantize_static(str(fp), str(qp), _Reader(calib), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method))
    return qp, time.perf_counter() - t, mem.delta_mib


def run_model(name, a, xtr, ytr, xte, yte):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    calib = xtr[rng.permutation(len(xtr))[:a.calib]]
    work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    float_model = demo.build_float(name)
    r = {"model": name, "params": sum(p.numel() for p in float_model.parameters())}
    r["float"] = acc(demo.predict(float_model, xte), yte)
    cfg = int8_config(float_model, work)

    t = time.perf_counter()
    q = calibrate(demo.build_float(name), cfg, calib)
    r["calib_time_s"] = time.perf_counter() - t
    r["calibrated"] = acc(demo.predict(q, xte), yte)
    for n in (256, 2048):
        with PeakRSS() as mem:
            calibrate(demo.build_float(name), cfg, xtr[:n])
        r[f"calib_peak_mib_{n}"] = mem.delta_mib

    qp, t_ort, mem_ort = ort_static(demo.build_float(name), calib, work)
    r["ort_minmax"] = acc(demo.predict_onnx(qp, xte, optimize=True), yte)
    r["ort_calib_time_s"] = t_ort
    r["ort_calib_peak_mib"] = mem_ort

    r.update(step_ratio(demo.build_float(name), calibrate(demo.build_float(name), cfg, calib),
                        xtr, ytr))
    if a.step_time_only:
        return r

    qat_accs, qat_times, q0 = [], [], None
    for seed in range(a.seeds):  # QAT noise is of the order of the bars: report the spread
        qs = copy.deepcopy(q)
        t = time.perf_counter()
        qat(qs, xtr, ytr, epochs=a.qat_epochs, lr=a.lr, seed=seed, optimizer=a.optimizer,
            freeze_at=a.freeze_bn_at,
            teacher=demo.build_float(name).eval() if a.distill else None)
        qat_times.append(time.perf_counter() - t)
        pred = demo.predict(qs, xte)
        qat_accs.append(acc(pred, yte))
        if q0 is None:
            q0 = qs
    q = q0
    r["qat_runs"] = qat_accs
    r["qat"] = float(np.mean(qat_accs))
    r["qat_time_s"] = float(np.mean(qat_times))
    if a.float_control:  # the same fine-tuning on the float model: drift without quantization
        r["float_finetune_runs"] = []
        for seed in range(a.seeds):
            fm = demo.build_float(name)
            qat(fm, xtr, ytr, epochs=a.qat_epochs, lr=a.lr, seed=seed, optimizer=a.optimizer,
                freeze_at=a.freeze_bn_at)
            r["float_finetune_runs"].append(acc(demo.predict(fm, xte), yte))
    pth = work / "quant.pth"
    torch.save(q.state_dict(), pth)
    files = generate_final_model(models.build(name), str(cfg), str(pth), str(work / "final"))
    pred_qdq = demo.predict_onnx(files["qdq_onnx"], xte)
    with npu_numerics(False):  # the QDQ file is float32 between its Q/DQ pairs, as in the demo
        pred_q32 = demo.predict(q, xte)
    r["qdq_agreement"] = float(100 * (pred_qdq == pred_q32).mean())
    r["qdq_ort"] = acc(pred_qdq, yte)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder with the full Fashion-MNIST files")
    ap.add_argument("--models", nargs="+", default=["resnet8", "mobilenetv2s"])
    ap.add_argument("--calib", type=int, default=1024)
    ap.add_argument("--qat-epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    ap.add_argument("--freeze-bn-at", type=float, default=0.5,
                    help="fraction of QAT after which BN statistics are frozen (0: from the start)")
    ap.add_argument("--no-distill", dest="distill", action="store_false",
                    help="plain cross-entropy QAT (default adds distillation from the float "
                         "model, T=2, weight 1)")
    ap.add_argument("--seeds", type=int, default=3, help="QAT runs (different batch orders)")
    ap.add_argument("--results", default="torch_qat.json", help="file name in bench/results/")
    ap.add_argument("--step-time-only", action="store_true",
                    help="only the QAT step / float step ratio (interleaved timing), no QAT runs")
    ap.add_argument("--float-control", action="store_true",
                    help="also fine-tune the float model with the same recipe, without "
                         "distillation (how much of the QAT change is plain fine-tuning drift)")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    xtr, ytr = data.load("train", a.data)
    xte, yte = data.load("test", a.data)
    rows = []
    for name in a.models:
        r = run_model(name, a, xtr, ytr, xte, yte)
        print(json.dumps(r), flush=True)
        rows.append(r)
    OUT.mkdir(exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "cpus": torch.get_num_threads(), "torch": torch.__version__}
    write_json_atomic(OUT / a.results, {"meta": meta, "rows": rows})
    if a.step_time_only:
        for r in rows:
            print(f"{r['model']}: float step {r['float_step_s'] * 1e3:.1f} ms, QAT step "
                  f"{r['qat_step_s'] * 1e3:.1f} ms, ratio {r['qat_step_ratio']:.2f}x")
        return 0
    print("\n| model | float | dopt calib | dopt QAT | ORT quantize_static | QDQ agreement | "
          "QAT step / float step | calib time dopt / ORT | calib peak MiB 256 / 2048 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['float']:.2f} | {r['calibrated']:.2f} "
              f"({r['calibrated'] - r['float']:+.2f}) | {r['qat']:.2f} ({r['qat'] - r['float']:+.2f}; "
              f"runs {min(r['qat_runs']) - r['float']:+.2f}..{max(r['qat_runs']) - r['float']:+.2f})"
              f" | {r['ort_minmax']:.2f} ({r['ort_minmax'] - r['float']:+.2f}) | "
              f"{r['qdq_agreement']:.2f}% | {r['qat_step_ratio']:.2f}x | "
              f"{r['calib_time_s']:.2f}s / {r['ort_calib_time_s']:.2f}s | "
              f"{r['calib_peak_mib_256']:.0f} / {r['calib_peak_mib_2048']:.0f} |")


if __name__ == "__main__":
    main()
