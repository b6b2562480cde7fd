"""End-to-end demo: float model -> config -> optimize -> calibrate -> short QAT -> final model.

    python -m demos.fashion_mnist.demo            # MobileNetV2-style network (default)
    python -m demos.fashion_mnist.demo --model resnet8

Uses only what ships with the repository: the float weights in ``weights/`` and
the Fashion-MNIST files in ``data/`` (full 10k test set, 12k training images).
Ctrl-C during QAT keeps what was trained so far and goes on to export.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dopt.formats import qdq as onnx_qdq
from dopt.dopt_torch.opt_main import (generate_config_file, generate_final_model,
                                      freeze_bn_stats, get_quant_loss, optimize_model,
                                      set_calibrate_state)

from dopt_adapters.torch.api import npu_skips_int8
from dopt_adapters.torch.npu_edges import npu_numerics

from . import data, models

HERE = Path(__file__).resolve().parent


def build_float(name: str):
    model = models.build(name)
    state = torch.load(HERE / "weights" / f"{name}.pth", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model


def predict(model, x, batch=500, desc=None) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(x), batch), desc=desc, leave=False, disable=None if desc else True):
            out.append(model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy())
    return np.concatenate(out)


def predict_onnx(path, x, batch=500, optimize=False) -> np.ndarray:
    """Top-1 with ONNX Runtime (graph optimizations off: the file's exact QDQ semantics)."""
    sess = onnx_qdq.ort_session(str(path), optimize=optimize)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0].argmax(1)
                           for i in range(0, len(x), batch)])


def npu_int8_config(model, input_shape: str, dst: Path):
    """``dst/config_gen.json`` from the template, ``dst/config.json`` with every layer INT8
    where the NPU runs INT8; convolutions with Cin <= 16 stay float (the profile's rule).
    Returns (config path, number of INT8 layers, sorted float layers)."""
    gen = dst / "config_gen.json"
    generate_config_file(model, input_shape, dst_path=str(gen))
    cfg = json.loads(gen.read_text())
    narrow = set(npu_skips_int8(dict(model.named_modules()), cfg["layer_strategy"]))
    for name, entry in cfg["layer_strategy"].items():
        entry["quant_strategy"] = "float" if name in narrow else "Quant_INT8-8"
    cfg_path = dst / "config.json"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return cfg_path, len(cfg["layer_strategy"]) - len(narrow), sorted(narrow)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(models.MODELS), default="mobilenetv2s")
    ap.add_argument("--out", default=str(HERE / "out"), help="output folder (recreated)")
    ap.add_argument("--calib-samples", type=int, default=1024)
    ap.add_argument("--qat-epochs", type=float, default=1.0,
                    help="passes over the 12k shipped training images")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--freeze-bn-at", type=float, default=0.5,
                    help="fraction of QAT after which BN statistics are frozen")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    t_start = time.time()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    xte, yte = data.load("test")
    xtr, ytr = data.load("train")
    print(f"data: {len(xte)} test images, {len(xtr)} training images ({data.find_dir('test')})")

    model = build_float(a.model)
    acc_float = 100 * (predict(model, xte, desc="float eval") == yte).mean()
    print(f"[1/6] float model {a.model}: top-1 {acc_float:.2f}%")

    # step 1: config template, then mark layers Quant_INT8-8 (what a user edits by hand)
    cfg_path, n_int8, narrow = npu_int8_config(model, "x:1,1,28,28", out)
    print(f"[2/6] config: {n_int8} layers set to Quant_INT8-8, {len(narrow)} kept float "
          f"(Cin <= 16: {', '.join(narrow) or '-'}) in {cfg_path}")

    # step 2a: no-training calibration
    t = time.time()
    qmodel = optimize_model(model, str(cfg_path))
    set_calibrate_state(qmodel, True)
    calib = xtr[rng.permutation(len(xtr))[:a.calib_samples]]
    with torch.no_grad():
        for i in tqdm(range(0, len(calib), 128), desc="calibrate", leave=False, disable=None):
            qmodel(torch.from_numpy(calib[i:i + 128]))
    set_calibrate_state(qmodel, False)
    t_cal = time.time() - t
    pred_cal = predict(qmodel, xte, desc="fake-quant eval")
    acc_cal = 100 * (pred_cal == yte).mean()
    torch.save(qmodel.state_dict(), out / "calibrated.pth")
    print(f"[3/6] calibrated on {len(calib)} images in {t_cal:.1f}s: top-1 {acc_cal:.2f}%")

    # step 2b: short QAT in an ordinary training loop
    opt = torch.optim.SGD(qmodel.parameters(), lr=a.lr, momentum=0.9)
    steps = int(a.qat_epochs * len(xtr) / a.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    t = time.time()
    qmodel.train()
    done = 0
    try:
        for step in tqdm(range(steps), desc="QAT", leave=False, disable=None):
            if step == int(a.freeze_bn_at * steps):
                freeze_bn_stats(qmodel)
            idx = rng.integers(0, len(xtr), a.batch)
            xb = torch.from_numpy(xtr[idx])
            loss = F.cross_entropy(qmodel(xb), torch.from_numpy(ytr[idx]))
            total = loss + 0.05 * get_quant_loss(qmodel)
            opt.zero_grad()
            total.backward()
            opt.step()
            sched.step()
            done = step + 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: keeping the {done} QAT steps done so far")
    t_qat = time.time() - t
    pth = out / "quant.pth"
    torch.save(qmodel.state_dict(), pth)
    pred_qat = predict(qmodel, xte, desc="fake-quant eval")
    acc_qat = 100 * (pred_qat == yte).mean()
    print(f"[4/6] QAT {done} steps (batch {a.batch}) in {t_qat:.1f}s: top-1 {acc_qat:.2f}%")

    # step 3: deployable files from a freshly built float model + the quant checkpoint
    t = time.time()
    final = out / "final"
    files = generate_final_model(models.build(a.model), str(cfg_path), pth_file=str(pth),
                                 output_dir=str(final))
    pred_qdq = predict_onnx(files["qdq_onnx"], xte)
    with npu_numerics(False):  # the QDQ file is float32 between its Q/DQ pairs
        pred_qat32 = predict(qmodel, xte, desc="fake-quant eval (float32 edges)")
    agree = 100 * (pred_qdq == pred_qat32).mean()
    acc_qdq = 100 * (pred_qdq == yte).mean()
    print(f"[5/6] final model written in {time.time() - t:.1f}s; ONNX Runtime QDQ top-1 "
          f"{acc_qdq:.2f}%, agreement with fake-quant {agree:.2f}%")

    # step 4: offline compilation for the NPU (FP16 and INT8) and the emulated runtime
    npu = compile_and_run(final, files, xte, yte, pred_qat)

    print("\nsummary (10k Fashion-MNIST test images)")
    print(f"  float              {acc_float:6.2f}%")
    print(f"  calibrated INT8    {acc_cal:6.2f}%  ({acc_cal - acc_float:+.2f})")
    print(f"  QAT INT8           {acc_qat:6.2f}%  ({acc_qat - acc_float:+.2f})")
    print(f"  QDQ on ONNX Runtime {acc_qdq:5.2f}%  (agrees with fake-quant on {agree:.2f}%)")
    for b in ("fp16", "int8"):
        r = npu[b]
        print(f"  emulated NPU {b.upper()}   {r['acc']:6.2f}%  (agrees with "
              f"{'float' if b == 'fp16' else 'fake-quant'} on {r['agree']:.2f}%), "
              f".om {r['size'] / 1024:.0f} KiB, estimated latency {r['latency_text']}")
    print(f"  INT8 .om / FP16 .om size: {npu['int8']['size'] / npu['fp16']['size']:.3f}")
    print("files:")
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(out.parent)}  ({p.stat().st_size / 1024:.0f} KiB)")
    print(f"total time {time.time() - t_start:.0f}s")
    return {"float": acc_float, "calibrated": acc_cal, "qat": acc_qat, "qdq": acc_qdq,
            "agreement": agree, "npu": npu}


def compile_and_run(final: Path, files: dict, xte, yte, pred_qat) -> dict:
    """``dopt omg`` twice (FP16 float build, INT8 build with the parameter file), then run."""
    from dopt import runtime
    from dopt.npu import omg
    pred_float = predict_onnx(files["float_onnx"], xte)
    res = {}
    for build in ("fp16", "int8"):
        t = time.time()
        args = ["--mode", "0", "--framework", "5", "--model", str(files["float_onnx"]),
                "--output", str(final / f"model_{build}"), "--input_shape", "x:1,1,28,28",
                "--check_report", str(final / f"check_report_{build}.json")]
        if build == "int8":
            args += ["--compress_conf", str(files["param_file"])]
        print(f"\n$ dopt omg {' '.join(args)}")
        omg.main(args)
        om_path = final / f"model_{build}.om"
        sess = runtime.load(om_path)
        pred = sess.predict(xte, batch_size=500).argmax(1)
        ref = pred_qat if build == "int8" else pred_float
        est = sess.estimate or {}
        res[build] = {"acc": 100 * float((pred == yte).mean()),
                      "agree": 100 * float((pred == ref).mean()),
                      "size": om_path.stat().st_size,
                      "latency_ms": float(est.get("summary", {}).get("total_ms", float("nan"))),
                      "latency_text": est.get("summary", {}).get("total_text", "n/a"),
                      "placement": sess.om.meta["summary"], "seconds": time.time() - t}
        print(f"[6/6] {build.upper()} .om on the emulated NPU: top-1 {res[build]['acc']:.2f}%, "
              f"agreement {res[build]['agree']:.2f}% "
              f"with the {'fake-quant' if build == 'int8' else 'float'} model, "
              f"placement {res[build]['placement']}")
    return res


if __name__ == "__main__":
    main()
