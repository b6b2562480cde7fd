"""``dopt prune``: prune a trained PyTorch model for the NPU, fine-tune it with distillation
from the unpruned model, and save files that reload with no shape surgery.

Order of work: check every argument and ``user_module.py`` (nothing is written before they
pass), measure the unpruned model (estimated latency, the user's metric), optionally the
per-group sensitivity table, choose the widths against the cost model, prune and save
``pruned_init.*``, fine-tune (progress bar; Ctrl-C exits 130 and the same command resumes
from the last checkpoint), save ``pruned.*`` and ``prune_report.json``. Errors are one
paragraph and exit 2.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import sys
import time
from pathlib import Path

from ..errors import DoptError, run_cli

PROG = "dopt prune"
#: UserModule methods the command calls: (name, positional arguments besides self)
USER_METHODS = (("__init__", 2), ("dataset_define", 2), ("metrics_func", 2), ("loss_func", 2))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True,
                    help="net.py:Name, a class or function building the float model")
    ap.add_argument("--weights", help="the trained state dict (.pth); default: as built")
    ap.add_argument("--input_shape", required=True, help="deployed input, e.g. 1,3,224,224")
    ap.add_argument("--target", required=True,
                    help="speedup=1.3 | target_ms=0.05 | size=0.6 | macs=0.5 (latency on the "
                         "emulated NPU's cost model)")
    ap.add_argument("--precision", default="int8", choices=("int8", "fp16"),
                    help="the precision the model will run at (alignment and estimate)")
    ap.add_argument("--importance", default="magnitude",
                    choices=("magnitude", "taylor", "bn_scale"))
    ap.add_argument("--depth", action="store_true",
                    help="also remove whole residual blocks (y = x + f(x)) where the estimate "
                         "says it pays: the way to lower a launch-bound network's latency")
    ap.add_argument("--sensitivity", action="store_true",
                    help="measure the per-group sensitivity table and let it weigh groups")
    ap.add_argument("--user_module", required=True,
                    help="user_module.py with class UserModule (dataset_define, "
                         "metrics_func, loss_func; scheduler_define optional)")
    ap.add_argument("--dataset_dir", required=True, help="passed to dataset_define")
    ap.add_argument("--output", default="prune_out", help="output folder (resumable)")
    ap.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs (0: none)")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--no-distill", dest="distill", action="store_false",
                    help="fine-tune with the user's loss only")
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--kd_weight", type=float, default=1.0)
    ap.add_argument("--max_ratio", type=float, default=0.75,
                    help="at most this share of a group's channels is removed")
    ap.add_argument("--ignore", action="append", default=[], metavar="LAYER",
                    help="a layer whose output channels stay (repeatable)")
    ap.add_argument("--eval_batches", type=int, default=None,
                    help="evaluate on at most this many batches (default: all)")
    ap.add_argument("--profile", default="kirin9000", help="hardware profile name or JSON")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _log(msg: str) -> None:
    print(f"[{PROG}] {msg}", file=sys.stderr, flush=True)


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        dims = ()
    if len(dims) < 2 or any(d <= 0 for d in dims):
        raise DoptError("the input shape must be positive integers, batch first",
                        field="--input_shape", found=repr(text), expected="e.g. 1,3,224,224")
    return dims


def _user_module(path: str):
    from ..userpy import load_module
    mod = load_module(path, field="--user_module")
    cls = getattr(mod, "UserModule", None)
    if not inspect.isclass(cls):
        raise DoptError("user_module.py has no class UserModule", file=path,
                        field="UserModule", hint="see the user_module.py interface in "
                                                 "docs/pruning.md")
    for meth, n in USER_METHODS:
        fn = getattr(cls, meth, None)
        try:
            ok = fn is not None and (meth == "__init__" and fn is object.__init__ or
                                     bool(inspect.signature(fn).bind(*([None] * (n + 1)))))
        except TypeError:
            ok = False
        if not ok:
            raise DoptError(f"UserModule.{meth} is missing or cannot take {n} arguments",
                            file=path, field=f"UserModule.{meth}",
                            hint="see the user_module.py interface in docs/pruning.md")
    return mod


def _fingerprint(a, shape) -> dict:
    def digest(p):
        if not p:
            return None
        try:
            return hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16]
        except OSError:
            raise DoptError("the file does not exist or cannot be read", file=p,
                            hint="check the path given on the command line") from None
    return {"model": a.model, "model_py": digest(a.model.rsplit(":", 1)[0]),
            "weights": digest(a.weights), "input_shape": list(shape), "target": a.target,
            "precision": a.precision, "importance": a.importance,
            "sensitivity": a.sensitivity, "max_ratio": a.max_ratio, "ignore": a.ignore,
            "profile": a.profile, **({"depth": True} if a.depth else {})}


def run(a) -> int:
    from ..distill import make_config
    from ..formats.fileio import write_json_atomic
    from ..npu.profile import load_profile
    from .backend import backend_class
    from .search import choose_widths
    from .sensitivity import render_text, sensitivity_table, write_sensitivity
    from .target import PruneTarget
    t0 = time.time()
    target = PruneTarget.parse(a.target)
    shape = _shape(a.input_shape)
    if a.epochs < 0 or a.batch_size <= 0 or not a.lr > 0:
        raise DoptError("epochs must be >= 0, batch_size and lr > 0", field="--epochs")
    distill = ({"temperature": a.temperature, "kd_weight": a.kd_weight}
               if a.distill and a.epochs else None)
    if distill:
        make_config(ce_weight=0.0, **distill)   # checked before any work
    profile = load_profile(a.profile)
    user = _user_module(a.user_module)
    out = Path(a.output)
    fp = _fingerprint(a, shape)
    state_file = out / "prune_state.json"
    state = None
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text("utf-8"))
        except ValueError:
            state = None
        if not isinstance(state, dict) or state.get("fingerprint") != fp:
            raise DoptError("the output folder holds a pruning run with other settings",
                            file=str(state_file), field="--output",
                            hint="use another --output, or delete the folder to start over")
    out.mkdir(parents=True, exist_ok=True)

    cls = backend_class("torch")
    job = cls.for_command(model_spec=a.model, weights=a.weights, user_module=user,
                          dataset_dir=a.dataset_dir, input_shape=shape,
                          batch_size=a.batch_size, epochs=a.epochs, importance=a.importance,
                          ignored=a.ignore, eval_batches=a.eval_batches, depth=a.depth,
                          log=_log)
    if state is None:
        base_metric = job.metric()
        _log(f"unpruned model: metric {base_metric:.4f}")
        table = None
        if a.sensitivity:
            table = sensitivity_table(job.backend, profile.channel_block(a.precision == "int8"),
                                      max_ratio=a.max_ratio, log=_log)
            write_sensitivity(table, out)
            print(render_text(table))
        plan = choose_widths(job.backend, target, profile, precision=a.precision,
                             sensitivity=table, max_ratio=a.max_ratio, log=_log)
        job.backend.apply(plan.widths)
        pruned_metric = job.metric()
        gone = sum(1 for g in plan.groups if g.get("kind") == "block" and g["kept"] == 0)
        _log(f"pruned ({len(plan.widths) - gone} groups narrowed"
             + (f", {gone} residual block(s) removed" if gone else "")
             + f"), BatchNorm recalibrated: metric {pruned_metric:.4f}")
        job.save(out, "pruned_init", builder=a.model)
        state = {"fingerprint": fp, "plan": plan.as_dict(), "metric_unpruned": base_metric,
                 "metric_pruned": pruned_metric}
        write_json_atomic(out / "prune_plan.json", plan.as_dict())
        write_json_atomic(state_file, state)
    else:
        _log("resuming: the pruned model of the earlier run is in pruned_init.py")
        job.restore(out / "pruned_init.py")
    ft = None
    if a.epochs:
        ft = job.finetune(epochs=a.epochs, lr=a.lr, distill=distill,
                          state=out / "finetune_state.pt", progress=not a.no_progress)
    final_metric = job.metric()
    files = job.save(out, "pruned", builder=a.model)
    plan = state["plan"]
    report = {"target": plan["target"], "precision": plan["precision"],
              "channel_block": plan["channel_block"], "widths": plan["widths"],
              "estimate_before": plan["before"], "estimate_after": plan["after"],
              "metric": {"unpruned": state["metric_unpruned"],
                         "pruned_before_finetune": state["metric_pruned"],
                         "final": final_metric},
              "finetune": {"epochs": a.epochs, "distill": distill,
                           "last": ft["last"] if ft else None},
              "files": files, "seconds": round(time.time() - t0, 1),
              "note": plan["note"]}
    write_json_atomic(out / "prune_report.json", report)
    b, f = plan["before"], plan["after"]
    p = plan["precision"]
    print(f"estimated {p.upper()} latency {b[f'latency_{p}_ms']:.4f} -> "
          f"{f[f'latency_{p}_ms']:.4f} ms (estimate, {b[f'latency_{p}_ms'] / f[f'latency_{p}_ms']:.3f}x); "
          f"MACs {b['macs'] / 1e6:.2f} -> {f['macs'] / 1e6:.2f} M; parameters {b['params']} -> "
          f"{f['params']}")
    print(f"metric: unpruned {state['metric_unpruned']:.4f}, pruned {state['metric_pruned']:.4f}, "
          f"fine-tuned {final_metric:.4f}")
    print(f"wrote {files['py']}, {files['pth']}, {files['onnx']}, {out / 'prune_report.json'}")
    return 0


def main(argv=None) -> int:
    a = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    return run_cli(PROG, lambda: run(a),
                   interrupted="interrupted: the same command resumes from the last checkpoint")
