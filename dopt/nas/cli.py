"""``dopt nas -c scen.yaml`` (also ``dopt_so -c scen.yaml`` and ``python3 dopt_so.py -c
scen.yaml``, the reference's command): hardware-aware architecture search (NASEA).

Order of work: read and check ``scen.yaml`` and ``user_module.py`` (nothing is written
before both pass), check the constraint can be met at all, train the supernet (resumable),
search (resumable, optionally with several worker processes), write ``results/`` and the
TensorBoard logs. Errors are one paragraph and exit 2; Ctrl-C exits 130 and the same
command resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import DoptError, run_cli

PROG = "dopt nas"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--config", required=True, help="the scenario file (scen.yaml)")
    ap.add_argument("--user_module", default=None,
                    help="user_module.py to use (default: the current folder's, as the reference)")
    ap.add_argument("--output", default=".",
                    help="folder for log_<application>/, results/ and nas_state/ (default: the "
                         "current folder, as the reference)")
    ap.add_argument("--workers", type=int, default=1,
                    help="evaluate candidates in this many local processes sharing the study")
    ap.add_argument("--search-only", action="store_true",
                    help="join the search of a run whose supernet is trained (another worker, "
                         "possibly on another machine sharing the output folder); writes no "
                         "results")
    ap.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--run-token", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--max-evals", type=int, default=None,
                    help="stop after this many evaluations in this run (re-run to continue)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def _log(msg: str) -> None:
    print(f"[dopt nas] {msg}", file=sys.stderr, flush=True)


def _check_state(state: Path, cfg) -> None:
    """A resumed run must describe the same search as the state it resumes."""
    f = state / "scenario.json"
    now = cfg.fingerprint()
    if f.is_file():
        try:
            before = json.loads(f.read_text("utf-8"))
        except ValueError:
            before = None
        if isinstance(before, dict) and before != now:
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise DoptError("scen.yaml changed since the search state in this folder was "
                            "created: " + ", ".join(f"{k} was {before.get(k)!r}, now "
                                                    f"{now.get(k)!r}" for k in changed[:4]),
                            file=str(f), field=changed[0],
                            hint="restore the old values to resume, or pass another --output "
                                 "(or delete nas_state/) to start a new search")
        return
    state.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f.name + ".tmp")
    tmp.write_text(json.dumps(now, indent=1) + "\n", "utf-8")
    tmp.replace(f)


def _spawn_workers(args, out: Path, n: int, token: str) -> list:
    procs = []
    for k in range(1, n):
        cmd = [sys.executable, "-m", "dopt", "nas", "-c", args.config, "--output", str(out),
               "--search-only", "--worker-index", str(k), "--no-progress", "--run-token",
               token]
        if args.user_module:
            cmd += ["--user_module", args.user_module]
        if args.max_evals is not None:
            cmd += ["--max-evals", str(args.max_evals)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def _wait_ready(study, procs, token: str, timeout_s: float = 900.0) -> None:
    """Start evaluating together with the workers (they load the supernet first), so the
    evaluations spread over all of them."""
    want = [f"worker_ready_{k}" for k in range(1, len(procs) + 1)]
    t0 = time.monotonic()
    while not all(study.user_attrs.get(k) == token for k in want):
        if any(p.poll() is not None for p in procs) or time.monotonic() - t0 > timeout_s:
            _join_workers(procs)
            return
        time.sleep(0.2)


def _join_workers(procs) -> None:
    bad = []
    for p in procs:
        _out, err = p.communicate()
        if p.returncode != 0:
            bad.append((p.returncode, (err or "").strip().splitlines()[-1:] or [""]))
    if bad:
        code, tail = bad[0]
        raise DoptError(f"{len(bad)} search worker(s) failed (exit {code}): {tail[0]}",
                        hint="re-run the command to resume; the study keeps every finished "
                             "evaluation")


def run(args) -> int:
    from ..npu.profile import load_profile
    from . import report, search
    from .backend import backend_class
    from .config import load_scen
    from .space import SearchSpace
    from .usermodule import load_user_module

    if args.workers < 1:
        raise DoptError("--workers must be at least 1", field="--workers",
                        found=str(args.workers))
    cfg = load_scen(args.config)
    um = load_user_module(cfg.framework, args.user_module)
    out = Path(args.output)
    if not out.is_dir():
        raise DoptError("the output folder does not exist", file=str(out), field="--output",
                        hint="create it first")
    state = out / "nas_state"
    backend = backend_class(cfg.framework)(cfg, um, log=_log)
    coordinator = backend.rank == 0 and not args.search_only
    worker_index = args.worker_index + backend.rank
    if coordinator:
        _log(backend.device_note)
    profile = load_profile(cfg.profile)
    space = SearchSpace(cfg.filters, cfg.strides, backend.in_channels(),
                        profile.alignment["fp16_channel_block"], cfg.width_multipliers,
                        fixed=cfg.feature_choose or ())
    backend.bind_space(space)
    xlabel = search.constraint_label(cfg)
    with tempfile.TemporaryDirectory(prefix="dopt-nas-") as tmp:
        costs = search.Costs(backend, cfg, profile, space, Path(tmp))
        if coordinator:
            arch, value = search.check_feasible(cfg, space, costs)
            _log(f"search space: {len(space)} layers, {space.size():.3g} networks; cheapest "
                 f"candidate {xlabel} {value:.6g} (budget {cfg.constraint_value:g})")
        if coordinator:
            backend.check_data()
        if backend.rank == 0:
            _check_state(state, cfg)
        ckpt = state / getattr(backend, "checkpoint_name", "supernet.pt")
        if args.search_only:
            if not backend.supernet_done(ckpt):
                raise DoptError("the supernet of this search is not trained yet",
                                file=str(ckpt), hint="run the command without --search-only "
                                "first (it trains the supernet), then add workers")
            backend.load_supernet(ckpt)
        else:
            tb = report.tensorboard_writer(out / f"log_{cfg.app_short}") \
                if backend.rank == 0 else None
            try:
                backend.train_supernet(ckpt, scalar=tb.add_scalar if tb else None,
                                       progress=not args.no_progress)
            finally:
                if tb is not None:
                    tb.close()
        if backend.rank == 0:  # creates the study; other processes open it afterwards
            study = search.open_study(state, cfg, worker_index)
        if coordinator:
            n = search.fail_stale_trials(study)
            if n:
                _log(f"{n} evaluation(s) interrupted earlier will be redone")
            search.seed_study(study, space, arch)
        backend.barrier()
        if backend.rank != 0:
            study = search.open_study(state, cfg, worker_index)
        token = f"{os.getpid()}-{time.time_ns()}"
        procs = _spawn_workers(args, out, args.workers, token) \
            if coordinator and backend.world == 1 and args.workers > 1 else []
        if args.search_only and args.run_token:
            study.set_user_attr(f"worker_ready_{args.worker_index}", args.run_token)
        if procs:
            _wait_ready(study, procs, token)
        try:
            done = search.search(study, cfg, space, backend, costs, worker_index=worker_index,
                                 max_evals=args.max_evals, progress=coordinator and
                                 not args.no_progress, log=_log)
        finally:
            if procs:
                _join_workers(procs)
        backend.barrier()
        if not coordinator:
            backend.close()
            return 0
        _log(f"this run: {done['evaluated']} evaluated, {done['rejected']} rejected over "
             f"budget, {done['reused']} repeats reused")
        res = report.write_outputs(out, cfg, study, backend, space, profile, xlabel, log=_log)
    backend.close()
    target = cfg.pop_size * cfg.generation_num
    status = "complete" if res["evaluated"] >= target or _complete(study) >= target \
        else "partial (re-run the command to continue)"
    print(f"NASEA search {status}: {_complete(study)}/{target} evaluations, "
          f"{res['rejected']} candidates rejected over budget, {len(res['pareto'])} on the "
          f"Pareto front")
    for r in res["pareto"]:
        print(f"  model_arch_result_{r['pareto_index']}.py: accuracy {r['accuracy']:.4f}, "
              f"{r['params']} parameters, {r['macs']} MACs, estimated latency FP16 "
              f"{r['latency_fp16_ms']:.4f} ms / INT8 {r['latency_int8_ms']:.4f} ms")
    print(f"results: {out / 'results'}; TensorBoard: {out / ('log_' + cfg.app_short)}")
    return 0


def _complete(study) -> int:
    import optuna
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: run(args),
                   interrupted="interrupted; run the same command again to resume")
