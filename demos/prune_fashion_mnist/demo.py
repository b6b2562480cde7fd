"""Prune -> fine-tune with distillation -> QAT (distilled) -> INT8 and FP16 ``.om``.

    python -m demos.prune_fashion_mnist.demo                     # both networks
    python -m demos.prune_fashion_mnist.demo --models resnet8 --epochs 1 --qat-steps 200

Uses only what ships with the repository (demos/fashion_mnist: the float weights and the
Fashion-MNIST files). Step 1 is the no-code command ``dopt prune`` (the same command line
is printed); steps 2-4 are the plugin-mode QAT of demos/fashion_mnist on the pruned model
built from the saved ``pruned.py`` (no shape surgery), with the distillation loss from the
unpruned model in the QAT loop.
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from dopt.cli.main import main as dopt_main
from dopt.dopt_torch.opt_main import (freeze_bn_stats, generate_final_model, optimize_model,
                                      set_calibrate_state)
from dopt_adapters.torch.distill import DistillationLoss

from ..fashion_mnist import data, demo

HERE = Path(__file__).resolve().parent
FM = HERE.parent / "fashion_mnist"
CLASSES = {"resnet8": "ResNet8", "mobilenetv2s": "MobileNetV2S"}


def load_pruned(py: Path):
    spec = importlib.util.spec_from_file_location(f"pruned_{py.parent.name}", py)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(name: str, a, out: Path, xtr, ytr, xte, yte) -> dict:
    rng = np.random.default_rng(a.seed)
    prune_dir = out / name / "prune"
    args = ["prune", "--model", f"{FM / 'models.py'}:{CLASSES[name]}",
            "--weights", str(FM / "weights" / f"{name}.pth"), "--input_shape", "1,1,28,28",
            "--target", a.target, "--precision", "int8",
            "--user_module", str(HERE / "user_module.py"), "--dataset_dir", str(FM / "data"),
            "--output", str(prune_dir), "--epochs", str(a.epochs), "--batch_size", "128"] \
        + (["--depth"] if a.depth else [])
    print(f"\n[1/4] {name}: $ dopt {' '.join(args)}", flush=True)
    rc = dopt_main(args)
    if rc != 0:
        raise SystemExit(rc)
    mod = load_pruned(prune_dir / "pruned.py")
    pruned, teacher = mod.load(), demo.build_float(name).eval()
    acc_float = 100 * (demo.predict(teacher, xte) == yte).mean()
    acc_pruned = 100 * (demo.predict(pruned, xte) == yte).mean()
    print(f"[2/4] {name}: unpruned float {acc_float:.2f}%, pruned + fine-tuned {acc_pruned:.2f}%")

    qdir = out / name / "qat"
    qdir.mkdir(parents=True)
    cfg, n_int8, narrow = demo.npu_int8_config(pruned, "x:1,1,28,28", qdir)
    q = optimize_model(pruned, str(cfg))
    set_calibrate_state(q, True)
    with torch.no_grad():
        calib = xtr[rng.permutation(len(xtr))[:1024]]
        for i in range(0, len(calib), 128):
            q(torch.from_numpy(calib[i:i + 128]))
    set_calibrate_state(q, False)
    kd = DistillationLoss(teacher, q, temperature=4.0)   # CE + KL to the unpruned float model
    opt = torch.optim.SGD(q.parameters(), lr=1e-4, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(a.qat_steps, 1))
    q.train()
    for step in range(a.qat_steps):
        if step == a.qat_steps // 2:
            freeze_bn_stats(q)
        idx = rng.integers(0, len(xtr), 64)
        xb = torch.from_numpy(xtr[idx])
        loss = kd(q(xb), xb, torch.from_numpy(ytr[idx]), progress=step / a.qat_steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    kd.remove()
    torch.save(q.state_dict(), qdir / "quant.pth")
    pred_qat = demo.predict(q, xte)
    acc_qat = 100 * (pred_qat == yte).mean()
    print(f"[3/4] {name}: {n_int8} layers INT8 ({len(narrow)} kept float), QAT "
          f"{a.qat_steps} steps with distillation: {acc_qat:.2f}%")
    final = qdir / "final"
    files = generate_final_model(mod.build(), str(cfg), pth_file=str(qdir / "quant.pth"),
                                 output_dir=str(final))
    npu = demo.compile_and_run(final, files, xte, yte, pred_qat)
    print(f"[4/4] {name}: INT8 .om {npu['int8']['acc']:.2f}% (estimated "
          f"{npu['int8']['latency_ms']:.4f} ms), FP16 .om {npu['fp16']['acc']:.2f}%")
    return {"float": acc_float, "pruned": acc_pruned, "qat": acc_qat, "npu": npu}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet8", "mobilenetv2s"],
                    choices=sorted(CLASSES))
    ap.add_argument("--target", default="speedup=1.25",
                    help="dopt prune --target (these 28x28 nets are launch-bound: "
                         "docs/pruning.md; ResNet8 reaches 1.28x at most)")
    ap.add_argument("--no-depth", dest="depth", action="store_false",
                    help="channels only (without --depth these nets reach about 1.03x)")
    ap.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs after pruning")
    ap.add_argument("--qat-steps", type=int, default=200)
    ap.add_argument("--out", default=str(HERE / "out"), help="output folder (recreated)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    t0 = time.time()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    xtr, ytr = data.load("train")
    xte, yte = data.load("test")
    res = {n: run(n, a, out, xtr, ytr, xte, yte) for n in a.models}
    print("\nsummary (10k Fashion-MNIST test images; latencies are estimates)")
    for n, r in res.items():
        print(f"  {n}: float {r['float']:.2f}%, pruned {r['pruned']:.2f}%, QAT {r['qat']:.2f}%, "
              f"INT8 .om {r['npu']['int8']['acc']:.2f}% at {r['npu']['int8']['latency_ms']:.4f} ms")
    print(f"total time {time.time() - t0:.0f}s")
    return res


if __name__ == "__main__":
    main()
