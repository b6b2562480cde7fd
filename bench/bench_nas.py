"""NASEA benchmark on Fashion-MNIST (PyTorch) under the emulated NPU's INT8 latency of the
hand-designed MobileNetV2S.

    python -m bench.bench_nas [--epochs 2 --pop 8 --gens 4 --seeds 0 1 2 --top 5]

Uses the demo (``demos/nas_fashion_mnist``: its ``scen.yaml``, ``user_module.py`` and the
12,000 shipped training images, of which the last sixth is the validation split) and the
search's own code (the PyTorch backend, ``dopt.nas.search``, Optuna's samplers):

1. budget: MobileNetV2S's estimated INT8 latency (``demos.nas_fashion_mnist.budget``);
2. one supernet, trained once for ``--epochs`` (resumable: ``--work`` keeps it);
3. per seed, NSGA-II and random search with the same number of evaluations on that
   supernet; hypervolume of (validation error, latency / budget) against (1, 1);
4. the top ``--top`` picks of the seed-0 NSGA-II front by proxy accuracy, each retrained
   from scratch with MobileNetV2S's recipe (``demos/fashion_mnist/train_float.py``: AdamW
   2e-3, weight decay 1e-4, one-cycle, batch 128, horizontal flips) for
   ``--retrain-epochs`` over the training split; Kendall tau of proxy vs retrained
   validation accuracy; MobileNetV2S and ResNet8 retrained the same way;
5. the best pick by retrained validation accuracy: test accuracy, parameters, FP16/INT8
   latency against both, then dopt calibration + QAT -> ``dopt omg`` (FP16 and INT8) ->
   the emulated NPU runtime, as ``demos/fashion_mnist/demo.py`` does.

Writes bench/results/nas.json and prints the Markdown tables of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demos" / "nas_fashion_mnist"
OUT = Path(__file__).resolve().parent / "results"


@contextlib.contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def hypervolume(rows, budget: float) -> float:
    """Area dominated by (error = 1 - accuracy, latency / budget) points inside the box
    [0, 1] x [0, 1] (2-D: a sweep over latency)."""
    pts = sorted((r["latency_int8_ms"] / budget, 1.0 - r["accuracy"]) for r in rows
                 if r["latency_int8_ms"] <= budget)
    area, best_err = 0.0, 1.0
    for i, (lat, err) in enumerate(pts):
        best_err = min(best_err, err)
        nxt = pts[i + 1][0] if i + 1 < len(pts) else 1.0
        area += (nxt - lat) * (1.0 - best_err)
    return area


def kendall_tau(a, b) -> float:
    from scipy.stats import kendalltau
    return float(kendalltau(a, b)[0])


def split_data():
    """Training and validation splits of the shipped images (as the demo's user_module), and
    the test set for final numbers."""
    from demos.fashion_mnist import data
    x, y = data.load("train")
    xte, yte = data.load("test")
    n_val = len(x) // 6
    return (x[:-n_val], y[:-n_val]), (x[-n_val:], y[-n_val:]), (xte, yte)


def accuracy(model, x, y, batch=500) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy()
                            == y[i:i + batch]).sum())
    return correct / len(x)


def retrain(model, train, epochs: float, seed: int = 0, lr=2e-3, batch=128):
    """MobileNetV2S's recipe (``train_float.py``) on the training split."""
    xtr, ytr = train
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(xtr) / batch)
    total = max(1, int(epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=total)
    model.train()
    step = 0
    while step < total:
        perm = rng.permutation(len(xtr))
        for i in range(0, len(xtr), batch):
            if step >= total:
                break
            idx = perm[i:i + batch]
            xb = torch.from_numpy(xtr[idx])
            if rng.random() < 0.5:
                xb = xb.flip(3)
            loss = F.cross_entropy(model(xb), torch.from_numpy(ytr[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    return model.eval()


def qat_to_npu(model_fn, name: str, train, test, work: Path, qat_steps: int, seed=0) -> dict:
    """dopt calibration + QAT, the final model and its INT8 parameter file, ``dopt omg``
    (FP16 and INT8) and the emulated NPU runtime on the test set (the demo's steps)."""
    from demos.fashion_mnist import demo
    from dopt.dopt_torch.opt_main import (freeze_bn_stats, generate_final_model, optimize_model,
                                          set_calibrate_state)
    xtr, ytr = train
    xte, yte = test
    work.mkdir(parents=True, exist_ok=True)
    model = model_fn()
    cfg_path, n_int8, narrow = demo.npu_int8_config(model, "x:1,1,28,28", work)
    rng = np.random.default_rng(seed)
    q = optimize_model(model, str(cfg_path))
    set_calibrate_state(q, True)
    calib = xtr[rng.permutation(len(xtr))[:1024]]
    with torch.no_grad():
        for i in range(0, len(calib), 128):
            q(torch.from_numpy(calib[i:i + 128]))
    set_calibrate_state(q, False)
    acc_cal = float((demo.predict(q, xte) == yte).mean())
    opt = torch.optim.SGD(q.parameters(), lr=1e-4, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(qat_steps, 1))
    q.train()
    for step in range(qat_steps):
        if step == qat_steps // 2:
            freeze_bn_stats(q)
        idx = rng.integers(0, len(xtr), 64)
        loss = F.cross_entropy(q(torch.from_numpy(xtr[idx])), torch.from_numpy(ytr[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    pred_q = demo.predict(q, xte)
    pth = work / "quant.pth"
    torch.save(q.state_dict(), pth)
    files = generate_final_model(model_fn(), str(cfg_path), pth_file=str(pth),
                                 output_dir=str(work / "final"))
    npu = demo.compile_and_run(work / "final", files, xte, yte, pred_q)
    return {"model": name, "int8_layers": n_int8, "float_layers": narrow,
            "calibrated": acc_cal, "qat": float((pred_q == yte).mean()),
            "npu_fp16": npu["fp16"]["acc"] / 100, "npu_int8": npu["int8"]["acc"] / 100,
            "npu_int8_agree": npu["int8"]["agree"] / 100,
            "npu_fp16_ms": npu["fp16"]["latency_ms"], "npu_int8_ms": npu["int8"]["latency_ms"],
            "om_int8_kib": npu["int8"]["size"] / 1024}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2, help="supernet epochs")
    ap.add_argument("--pop", type=int, default=8, help="NSGA-II population")
    ap.add_argument("--gens", type=int, default=4, help="NSGA-II generations")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--top", type=int, default=5, help="Pareto picks retrained")
    ap.add_argument("--retrain-epochs", type=float, default=3.0)
    ap.add_argument("--qat-steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=None, help="keep the supernet here (resume); default: a "
                    "temporary folder")
    ap.add_argument("--results", default="nas.json", help="file name in bench/results/")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import optuna

    from demos.fashion_mnist import models
    from demos.nas_fashion_mnist import budget as demo_budget
    from dopt.nas import report, search
    from dopt.nas.config import load_scen
    from dopt.nas.space import SearchSpace
    from dopt.nas.usermodule import load_user_module
    from dopt.npu.profile import load_profile
    from dopt_adapters.torch.nas_backend import TorchNasBackend
    from dopt_adapters.torch.nas_supernet import build_static

    t_start = time.time()
    times = {}
    est_mb = demo_budget.estimate()
    est_rn = demo_budget.estimate(models.build("resnet8"))
    budget = est_mb["latency_int8_ms"]
    print(f"budget: MobileNetV2S estimated INT8 {budget:.4f} ms ({est_mb['profile']})",
          flush=True)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-nas-"))
    work.mkdir(parents=True, exist_ok=True)

    with _cwd(DEMO):
        cfg = load_scen("scen.yaml")
        um = load_user_module(cfg.framework, str(DEMO / "user_module.py"))
        cfg = dataclasses.replace(cfg, epochs=a.epochs, pop_size=a.pop, generation_num=a.gens,
                                  constraint_value=budget, latency_precision="int8",
                                  constraint_type="latency")
        backend = TorchNasBackend(cfg, um, log=lambda m: print(m, flush=True))
        profile = load_profile(cfg.profile)
        space = SearchSpace(cfg.filters, cfg.strides, backend.in_channels(),
                            profile.alignment["fp16_channel_block"], cfg.width_multipliers)
        backend.bind_space(space)
        t = time.time()
        backend.train_supernet(work / "supernet.pt", scalar=None, progress=True)
        times["supernet_s"] = time.time() - t

        evaluate = backend.evaluate
        cache: dict[str, float] = {}

        def cached(arch):  # deterministic: the same sub-net scores the same in every study
            k = space.key(arch)
            if k not in cache:
                cache[k] = evaluate(arch)
            return cache[k]
        backend.evaluate = cached

        runs = []
        tmp = work / "tmp"
        tmp.mkdir(exist_ok=True)
        costs = search.Costs(backend, cfg, profile, space, tmp)
        cheapest, _ = search.check_feasible(cfg, space, costs)
        t = time.time()
        for seed in a.seeds:
            for name in ("nsga2", "random"):
                s_cfg = dataclasses.replace(cfg, seed=seed)
                sampler = optuna.samplers.NSGAIISampler(population_size=a.pop, seed=seed) \
                    if name == "nsga2" else optuna.samplers.RandomSampler(seed=seed)
                optuna.logging.set_verbosity(optuna.logging.WARNING)
                study = optuna.create_study(directions=["maximize", "minimize"],
                                            sampler=sampler)
                search.seed_study(study, space, cheapest)
                done = search.search(study, s_cfg, space, backend, costs, progress=False)
                rows, rejected = report.rows_from_study(study)
                front = report.pareto_front(copy.deepcopy(rows))
                runs.append({"seed": seed, "sampler": name, "evaluations": len(rows),
                             "rejected": rejected, "hypervolume": hypervolume(rows, budget),
                             "best_accuracy": max(r["accuracy"] for r in rows),
                             "front": front, "rows": rows, "done": done})
                print(f"seed {seed} {name}: {len(rows)} distinct candidates, {rejected} "
                      f"rejected, hypervolume {runs[-1]['hypervolume']:.4f}, best proxy "
                      f"{runs[-1]['best_accuracy']:.4f}", flush=True)
        times["search_s"] = time.time() - t

    train, val, test = split_data()
    # top picks: the seed-0 NSGA-II front by proxy accuracy, then its best other candidates
    r0 = next(r for r in runs if r["sampler"] == "nsga2" and r["seed"] == a.seeds[0])
    ranked = sorted(r0["rows"], key=lambda r: -r["accuracy"])
    front_keys = {r["arch"] for r in r0["front"]}
    picks = sorted([r for r in ranked if r["arch"] in front_keys],
                   key=lambda r: -r["accuracy"])[:a.top]
    picks += [r for r in ranked if r["arch"] not in front_keys][:a.top - len(picks)]
    um_pre, um_post = um.PreNet, um.PostNet

    def pick_fn(key):
        return lambda: build_static(space, space.parse_key(key), um_pre(), um_post())

    t = time.time()
    retrained, states = [], {}
    for r in picks:
        net = retrain(pick_fn(r["arch"])(), train, a.retrain_epochs)
        states[r["arch"]] = copy.deepcopy(net.state_dict())
        retrained.append({**{k: r[k] for k in ("arch", "accuracy", "params", "latency_fp16_ms",
                                                 "latency_int8_ms")},
                          "val": accuracy(net, *val), "test": accuracy(net, *test)})
        print(f"retrained {r['arch']}: proxy {r['accuracy']:.4f}, val "
              f"{retrained[-1]['val']:.4f}, test {retrained[-1]['test']:.4f}", flush=True)
    tau = kendall_tau([r["accuracy"] for r in retrained], [r["val"] for r in retrained])
    baselines = []
    for name, est in (("MobileNetV2S", est_mb), ("ResNet8", est_rn)):
        net = retrain(models.build(name.lower()), train, a.retrain_epochs)
        baselines.append({"model": name, "params": sum(p.numel() for p in net.parameters()),
                          "val": accuracy(net, *val), "test": accuracy(net, *test),
                          "latency_fp16_ms": est["latency_fp16_ms"],
                          "latency_int8_ms": est["latency_int8_ms"]})
        print(f"retrained {name}: val {baselines[-1]['val']:.4f}, test "
              f"{baselines[-1]['test']:.4f}", flush=True)
    times["retrain_s"] = time.time() - t
    best = max(retrained, key=lambda r: r["val"])
    t = time.time()
    npu_dir = work / "npu"
    shutil.rmtree(npu_dir, ignore_errors=True)
    best_fn = pick_fn(best["arch"])
    state = states[best["arch"]]

    def best_trained():
        m = best_fn()
        m.load_state_dict(state)
        return m.eval()
    from dopt.errors import DoptError
    try:
        npu = qat_to_npu(best_trained, best["arch"], train, test, npu_dir, a.qat_steps)
    except DoptError as e:  # a miss to report, not a reason to lose the numbers above
        npu = {"model": best["arch"], "error": str(e)}
    times["npu_s"] = time.time() - t
    times["total_s"] = time.time() - t_start

    mb = baselines[0]
    goal_a = best["latency_int8_ms"] <= mb["latency_int8_ms"] and \
        best["test"] >= mb["test"] + 0.003
    goal_b = best["test"] >= mb["test"] and best["latency_int8_ms"] <= 0.7 * mb["latency_int8_ms"]
    summary = {}
    for name in ("nsga2", "random"):
        hv = [r["hypervolume"] for r in runs if r["sampler"] == name]
        summary[name] = {"hypervolume_mean": float(np.mean(hv)), "hypervolume": hv,
                         "evaluations": [r["evaluations"] for r in runs if r["sampler"] == name]}
    OUT.mkdir(exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor()
            or platform.machine(), "threads": a.threads, "torch": torch.__version__,
            "optuna": optuna.__version__, "args": vars(a), "profile": est_mb["profile"],
            "budget_ms": budget, "times": times}
    res = {"meta": meta, "summary": summary, "kendall_tau_top": tau, "picks": retrained,
           "baselines": baselines, "best": best, "npu": npu, "goal_met": goal_a or goal_b,
           "runs": [{k: v for k, v in r.items() if k != "rows"} for r in runs]}
    from dopt.formats.fileio import atomic_path
    with atomic_path(OUT / a.results) as tmp_json:
        Path(tmp_json).write_text(json.dumps(res, indent=1, default=str))

    print(f"\nbudget {budget:.4f} ms (MobileNetV2S, estimated INT8, {est_mb['profile']}); "
          f"{a.pop} x {a.gens} evaluations per search; supernet {a.epochs} epochs")
    print("\n| search | hypervolume per seed | mean |")
    print("|---|---|---|")
    for name in ("nsga2", "random"):
        s = summary[name]
        print(f"| {'NSGA-II' if name == 'nsga2' else 'random'} | "
              f"{' / '.join(f'{v:.4f}' for v in s['hypervolume'])} | "
              f"{s['hypervolume_mean']:.4f} |")
    print(f"\nKendall tau, proxy vs retrained validation accuracy of the top {len(retrained)}: "
          f"{tau:+.2f}")
    print("\n| network | proxy acc | retrained val | test | parameters | FP16 ms | INT8 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in retrained:
        print(f"| `{r['arch']}`{' (best)' if r is best else ''} | {r['accuracy']:.4f} | "
              f"{r['val']:.4f} | {r['test']:.4f} | {r['params']} | {r['latency_fp16_ms']:.4f} "
              f"| {r['latency_int8_ms']:.4f} |")
    for b in baselines:
        print(f"| {b['model']} | - | {b['val']:.4f} | {b['test']:.4f} | {b['params']} | "
              f"{b['latency_fp16_ms']:.4f} | {b['latency_int8_ms']:.4f} |")
    if "error" in npu:
        print(f"\nbest pick through dopt QAT -> dopt omg -> emulated NPU: failed: {npu['error']}")
    else:
        print(f"\nbest pick through dopt QAT -> dopt omg -> emulated NPU: calibrated "
              f"{npu['calibrated']:.4f}, QAT {npu['qat']:.4f}, NPU FP16 {npu['npu_fp16']:.4f}, "
              f"NPU INT8 {npu['npu_int8']:.4f} (agrees with fake-quant on "
              f"{npu['npu_int8_agree']:.4f}), .om INT8 {npu['om_int8_kib']:.0f} KiB, runtime "
              f"estimate FP16 {npu['npu_fp16_ms']:.4f} / INT8 {npu['npu_int8_ms']:.4f} ms")
    print(f"goal (<= latency and >= +0.3 point, or same accuracy at <= 0.7x latency): "
          f"{'met' if goal_a or goal_b else 'missed'}; times {json.dumps(times)}")
    return res


if __name__ == "__main__":
    random.seed(0)
    main()
