"""NPU-aware pruning benchmark on Fashion-MNIST (ResNet8 and MobileNetV2S, demos/fashion_mnist).

    python -m bench.bench_prune [--models resnet8 mobilenetv2s] [--epochs 1] [--data DIR]

Per network: the unpruned float and INT8 accuracy and estimated FP16/INT8 latency; then
``dopt.prune`` with depth pruning at the issue's target (0.6x the unpruned estimated INT8
latency) or, where that cannot be reached, at the smallest estimate it can reach (every
group at its smallest aligned width, every removable residual block removed), fine-tuned
with and without distillation for the same budget;
and Torch-Pruning as its README shows it (magnitude importance, one uniform ratio, no
alignment) at the same MACs, fine-tuned with the same distillation budget. INT8 accuracy is
dopt's calibrated fake-quant model (1024 images, no QAT), the same for every row. Writes
bench/results/prune.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from demos.fashion_mnist import data, demo, models
from dopt.errors import DoptError

OUT = Path(__file__).resolve().parent / "results"


def acc(model, x, y) -> float:
    return float(100 * (demo.predict(model, x) == y).mean())


def int8_acc(model, xcal, x, y, work: Path) -> float:
    """Top-1 of dopt's calibrated INT8 fake-quant model (the layers the NPU runs INT8)."""
    from dopt.dopt_torch.opt_main import optimize_model, set_calibrate_state
    cfg, _n, _narrow = demo.npu_int8_config(model, "x:1,1,28,28", work)
    q = optimize_model(copy.deepcopy(model), str(cfg))
    set_calibrate_state(q, True)
    with torch.no_grad():
        for i in range(0, len(xcal), 128):
            q(torch.from_numpy(xcal[i:i + 128]))
    set_calibrate_state(q, False)
    return acc(q, x, y)


def estimate(model) -> dict:
    from dopt.nas.latency import estimate_onnx
    from dopt.npu.profile import load_profile
    from dopt_adapters.torch.prune_backend import write_onnx
    import torch_pruning as tp
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.onnx"
        write_onnx(copy.deepcopy(model).eval(), torch.zeros(1, 1, 28, 28), p)
        e = estimate_onnx(p, load_profile())
    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, 1, 28, 28))
    return {"fp16_ms": e["latency_fp16_ms"], "int8_ms": e["latency_int8_ms"],
            "macs": int(macs), "params": int(params)}


def finetune(model, teacher, xtr, ytr, epochs, distill: bool, lr=1e-3, batch=128, seed=0):
    from dopt_adapters.torch.distill import DistillationLoss
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    kd = DistillationLoss(teacher, model, temperature=4.0, ce_weight=0.0) if distill else None
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = int(epochs * len(xtr) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    model.train()
    for s in range(steps):
        idx = rng.integers(0, len(xtr), batch)
        xb = torch.from_numpy(xtr[idx])
        if rng.random() < 0.5:
            xb = xb.flip(3)   # the float training's augmentation
        logits = model(xb)
        loss = F.cross_entropy(logits, torch.from_numpy(ytr[idx]))
        if kd is not None:
            loss = loss + kd(logits, xb, progress=s / steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    if kd is not None:
        kd.remove()
    return model.eval()


def tp_uniform(model, macs_goal: int):
    """Torch-Pruning's README recipe: MagnitudeImportance(p=2), one ratio for every layer,
    the classifier ignored; the ratio bisected to reach ``macs_goal``."""
    import torch_pruning as tp
    x = torch.zeros(1, 1, 28, 28)
    out_layer = model.fc if hasattr(model, "fc") else model.classifier
    lo, hi, best = 0.0, 0.9, None
    for _ in range(12):
        r = (lo + hi) / 2
        m = copy.deepcopy(model)
        pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=r, ignored_layers=[m.fc if hasattr(m, "fc")
                                                                       else m.classifier])
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(m, x)
        if macs <= macs_goal:
            best, hi = (r, m), r
        else:
            lo = r
    del out_layer
    return best


def tuned_row(m, teacher, a, xtr, ytr, xte, yte, xcal, work, distill) -> dict:
    """Fine-tune a pruned model for the benchmark's budget and measure it."""
    before_ft = acc(m, xte, yte)
    finetune(m, teacher, xtr, ytr, a.epochs, distill)
    return {**estimate(m), "acc_pruned": before_ft, "acc": acc(m, xte, yte),
            "int8_acc": int8_acc(m, xcal, xte, yte, work)}


def baseline(name, xtr, xte, yte, xcal, work) -> tuple:
    """``(teacher, calibration batches, unpruned row)`` of a demo network."""
    teacher = demo.build_float(name).eval()
    calib = [torch.from_numpy(xtr[i:i + 128]) for i in range(0, 20 * 128, 128)]
    return teacher, calib, {**estimate(teacher), "acc": acc(teacher, xte, yte),
                            "int8_acc": int8_acc(teacher, xcal, xte, yte, work)}


def sweep_model(name, a, xtr, ytr, xte, yte, xcal) -> dict:
    """Accuracy against estimated latency at milder targets, for an equal-accuracy reading:
    dopt (depth on) at each ``--sweep`` speed-up, and Torch-Pruning's uniform recipe at the
    same MACs as each; both fine-tuned alike (no distillation)."""
    import dopt.prune as P
    from dopt_adapters.torch.prune_backend import recalibrate_bn
    res = {"model": name, "rows": {}}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        teacher, calib, res["unpruned"] = baseline(name, xtr, xte, yte, xcal, work)
        for sp in a.sweep:
            m = demo.build_float(name)
            r = P.prune(m, (1, 1, 28, 28), f"speedup={sp}", calib_data=calib, depth=True)
            row = tuned_row(m, teacher, a, xtr, ytr, xte, yte, xcal, work, False)
            res["rows"][f"dopt speedup={sp}"] = {**row, "widths": r.plan.widths}
            ratio, t = tp_uniform(demo.build_float(name), row["macs"])
            recalibrate_bn(t, calib)
            t.eval()
            res["rows"][f"Torch-Pruning uniform (same MACs as speedup={sp})"] = {
                **tuned_row(t, teacher, a, xtr, ytr, xte, yte, xcal, work, False),
                "ratio": ratio}
            print(f"{name} speedup={sp}: dopt {row['int8_ms']:.4f} ms {row['int8_acc']:.2f} %",
                  flush=True)
    return res


def run_model(name, a, xtr, ytr, xte, yte, xcal) -> dict:
    import dopt.prune as P
    from dopt.npu.profile import load_profile
    from dopt.prune.search import Meter, group_widths
    from dopt_adapters.torch.prune_backend import TorchPruneBackend
    res = {"model": name}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        teacher, calib, res["unpruned"] = baseline(name, xtr, xte, yte, xcal, work)
        goal = 0.6 * res["unpruned"]["int8_ms"]
        prof = load_profile()
        block = prof.channel_block(True)
        try:
            P.prune(demo.build_float(name), (1, 1, 28, 28), f"target_ms={goal}",
                    calib_data=calib, depth=True)
            res["target_0.6x"] = "met"
            target_ms = goal
        except DoptError as e:
            res["target_0.6x"] = f"missed: {e.what}"
            # the reachable floor: every group at its smallest aligned INT8 width, every
            # removable residual block removed
            be = TorchPruneBackend(demo.build_float(name), input_shape=(1, 1, 28, 28),
                                   calib_data=calib, depth=True)
            floor = {g.name: group_widths(g, block)[-1] for g in be.groups()}
            target_ms = Meter(be, prof, "int8", work)(floor)["latency"] * 1.0001
        res["target_ms"] = target_ms
        rows = {}
        for distill in (True, False):
            m = demo.build_float(name)
            t = time.time()
            r = P.prune(m, (1, 1, 28, 28), f"target_ms={target_ms}", calib_data=calib,
                        depth=True)
            res["plan"] = r.plan.as_dict()
            row = tuned_row(m, teacher, a, xtr, ytr, xte, yte, xcal, work, distill)
            rows["dopt" + (" + distill" if distill else "")] = {
                **row, "seconds": time.time() - t, "widths": r.plan.widths}
        macs_goal = rows["dopt + distill"]["macs"]
        ratio, m = tp_uniform(demo.build_float(name), macs_goal)
        from dopt_adapters.torch.prune_backend import recalibrate_bn
        recalibrate_bn(m, calib)
        m.eval()
        rows["Torch-Pruning uniform (same MACs) + distill"] = {
            **tuned_row(m, teacher, a, xtr, ytr, xte, yte, xcal, work, True), "ratio": ratio}
        res["rows"] = rows
    return res


def table(results) -> str:
    lines = ["| model | variant | est. FP16 ms | est. INT8 ms | INT8 x | MACs (M) | float top-1 "
             "| INT8 top-1 (calibrated) | INT8 drop |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        u = r["unpruned"]
        lines.append(f"| {r['model']} | unpruned | {u['fp16_ms']:.4f} | {u['int8_ms']:.4f} | "
                     f"1.000 | {u['macs'] / 1e6:.2f} | {u['acc']:.2f} | {u['int8_acc']:.2f} | - |")
        for k, v in r["rows"].items():
            lines.append(f"| {r['model']} | {k} | {v['fp16_ms']:.4f} | {v['int8_ms']:.4f} | "
                         f"{v['int8_ms'] / u['int8_ms']:.3f} | {v['macs'] / 1e6:.2f} | "
                         f"{v['acc']:.2f} | {v['int8_acc']:.2f} | "
                         f"{v['int8_acc'] - u['int8_acc']:+.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet8", "mobilenetv2s"],
                    choices=sorted(models.MODELS))
    ap.add_argument("--epochs", type=float, default=1.0,
                    help="fine-tuning passes over the training images")
    ap.add_argument("--data", default=None, help="Fashion-MNIST folder (default: shipped)")
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--sweep", type=float, nargs="+", default=None, metavar="SPEEDUP",
                    help="instead: dopt at these INT8 speed-ups and Torch-Pruning at the same "
                         "MACs (writes prune_sweep.json)")
    ap.add_argument("--results", default=None,
                    help="file name in bench/results/ (default prune.json / prune_sweep.json)")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    xtr, ytr = data.load("train", a.data)
    xte, yte = data.load("test", a.data, limit=a.test_limit)
    xcal = xtr[np.random.default_rng(0).permutation(len(xtr))[:1024]]
    results = []
    t0 = time.time()
    for name in a.models:
        if a.sweep:
            results.append(sweep_model(name, a, xtr, ytr, xte, yte, xcal))
            continue
        results.append(run_model(name, a, xtr, ytr, xte, yte, xcal))
        print(f"{name}: target 0.6x: {results[-1]['target_0.6x']}", flush=True)
    doc = {"protocol": {"epochs": a.epochs, "train_images": len(xtr), "test_images": len(xte),
                        "int8": "dopt calibrated fake-quant, 1024 images, no QAT"},
           "machine": platform.platform(), "processor": platform.processor(),
           "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - t0),
           "results": results}
    OUT.mkdir(exist_ok=True)
    fname = a.results or ("prune_sweep.json" if a.sweep else "prune.json")
    if a.sweep:
        doc["protocol"]["sweep"] = a.sweep
    tmp = OUT / (fname + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=float))
    tmp.replace(OUT / fname)
    print(table(results))


if __name__ == "__main__":
    main()
