"""Outputs laid out as the reference's: ``results/model_arch_result_N.py`` (``N`` = the
number of the point on the Pareto plot), the Pareto plot, a CSV and JSON of every evaluated
candidate, and TensorBoard events in ``log_<application>/`` (the Pareto front as a figure
and as scalars). ``results/`` is built beside its final place and swapped in whole."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import DoptError

COLUMNS = ("trial", "generation", "arch", "accuracy", "constraint", "params", "macs",
           "latency_fp16_ms", "latency_int8_ms", "pareto_index", "worker")


def rows_from_study(study) -> tuple[list[dict], int]:
    """Evaluated candidates (reused duplicates once) and how many were rejected."""
    import optuna
    S = optuna.trial.TrialState
    rows, seen, rejected = [], set(), 0
    for t in study.get_trials(deepcopy=False):
        if t.state == S.PRUNED:
            rejected += 1
        if t.state != S.COMPLETE or "reused_from" in t.user_attrs:
            continue
        a = t.user_attrs
        if a["key"] in seen:
            continue
        seen.add(a["key"])
        rows.append({"trial": t.number,
                     "generation": t.system_attrs.get("nsga2:generation",
                                                      t.system_attrs.get("NSGAIISampler:generation")),
                     "arch": a["key"], "accuracy": float(t.values[0]),
                     "constraint": float(t.values[1]), "params": a.get("params"),
                     "macs": a.get("macs"), "latency_fp16_ms": a.get("latency_fp16_ms"),
                     "latency_int8_ms": a.get("latency_int8_ms"), "pareto_index": None,
                     "worker": a.get("worker")})
    return rows, rejected


def pareto_front(rows: list[dict]) -> list[dict]:
    """Non-dominated rows (accuracy up, constraint down), cheapest first, numbered 0..K-1."""
    front = []
    for r in rows:
        dominated = any(o["accuracy"] >= r["accuracy"] and o["constraint"] <= r["constraint"]
                        and (o["accuracy"] > r["accuracy"] or o["constraint"] < r["constraint"])
                        for o in rows)
        if not dominated:
            front.append(r)
    front.sort(key=lambda r: (r["constraint"], -r["accuracy"]))
    for i, r in enumerate(front):
        r["pareto_index"] = i
    return front


def plot_pareto(rows, front, cfg, xlabel: str, dest: Path):
    """The Pareto plot (PNG at ``dest``); returns the matplotlib figure for TensorBoard."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.scatter([r["constraint"] for r in rows], [r["accuracy"] for r in rows], s=14,
               color="0.7", label="evaluated candidates")
    ax.plot([r["constraint"] for r in front], [r["accuracy"] for r in front], "o-",
            color="tab:red", ms=5, label="Pareto front")
    for r in front:
        ax.annotate(str(r["pareto_index"]), (r["constraint"], r["accuracy"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(cfg.constraint_value, color="tab:blue", ls="--", lw=1,
               label=f"constraint_value {cfg.constraint_value:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (search estimate)")
    ax.set_title(f"NASEA {cfg.application_type}: {len(rows)} candidates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(dest)
    return fig


def tensorboard_writer(logdir: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise DoptError("TensorBoard logs need the Python package 'tensorboardX'",
                        hint="pip install 'dopt[nas]'") from None
    logdir.mkdir(parents=True, exist_ok=True)
    return SummaryWriter(logdir=str(logdir))


def _header(r: dict, cfg, profile) -> dict:
    return {"index": r["pareto_index"], "model_param_size": r["params"],
            "accuracy": round(r["accuracy"], 6), "macs": r["macs"],
            "latency_fp16_ms_estimate": round(r["latency_fp16_ms"], 5),
            "latency_int8_ms_estimate": round(r["latency_int8_ms"], 5),
            "npu_profile": f"{profile.name} {profile.version}",
            "constraint": f"{cfg.constraint_type} <= {cfg.constraint_value:g}",
            "arch": r["arch"]}


def write_outputs(out_dir: Path, cfg, study, backend, space, profile, xlabel: str,
                  log=print) -> dict:
    """Write ``results/`` (swapped in whole) and the Pareto front into ``log_<app>/``."""
    rows, rejected = rows_from_study(study)
    if not rows:
        raise DoptError("the search evaluated no candidate", hint="run the command again")
    front = pareto_front(rows)
    final = out_dir / "results"
    stage = Path(tempfile.mkdtemp(prefix=".results.", dir=out_dir))
    try:
        for r in front:
            n = r["pareto_index"]
            backend.write_result(space.parse_key(r["arch"]), stage / f"model_arch_result_{n}.py",
                                 _header(r, cfg, profile))
        fig = plot_pareto(rows, front, cfg, xlabel, stage / "pareto.png")
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in sorted(rows, key=lambda r: r["trial"]):
            w.writerow(r)
        (stage / "candidates.csv").write_text(buf.getvalue(), encoding="utf-8")
        doc = {"scenario": cfg.fingerprint(), "constraint_label": xlabel,
               "profile": {"name": profile.name, "version": profile.version},
               "evaluated": len(rows), "rejected_over_budget": rejected,
               "pareto": front, "candidates": sorted(rows, key=lambda r: r["trial"])}
        (stage / "candidates.json").write_text(json.dumps(doc, indent=1) + "\n", "utf-8")
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=".results.old.", dir=out_dir))
            os.replace(final, old / "results")
        os.replace(stage, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    tb = tensorboard_writer(out_dir / f"log_{cfg.app_short}")
    try:
        tb.add_figure("pareto", fig, global_step=len(rows))
        for r in sorted(rows, key=lambda r: r["trial"]):
            tb.add_scalar("search/accuracy", r["accuracy"], r["trial"])
            tb.add_scalar(f"search/{cfg.constraint_type}", r["constraint"], r["trial"])
        for r in front:
            tb.add_scalar("pareto/accuracy", r["accuracy"], r["pareto_index"])
            tb.add_scalar(f"pareto/{cfg.constraint_type}", r["constraint"], r["pareto_index"])
    finally:
        tb.close()
    return {"evaluated": len(rows), "rejected": rejected, "pareto": front}


_FIND_USER_MODULE = '''

def _user_module():
    """The search's user_module.py: in the current folder, next to this file or one up."""
    import importlib
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (os.getcwd(), here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(d, "user_module.py")):
            sys.path.insert(0, d)
            break
    else:
        raise SystemExit("user_module.py (with PreNet and PostNet) was not found in the "
                         "current folder, next to this file or one folder up")
    return importlib.import_module("user_module")
'''


def result_file(header: dict, blocks_source: str, writes: list[str], main: str) -> str:
    """The text of ``model_arch_result_N.py``: a docstring with the header, the framework's
    block code (``blocks_source``, its module docstring dropped), the header as variables,
    the ``user_module.py`` lookup, then ``main`` (the framework's ``build()`` / ``main()``,
    which call ``_user_module()``). ``writes``: what running it writes, for the docstring."""
    head = [f'"""NASEA search result {header["index"]}: a network of the Pareto front (dopt).', ""]
    head += [f"{k}: {v}" for k, v in header.items() if k != "index"]
    head += ["", "python3 model_arch_result_N.py rebuilds it (PreNet/PostNet from user_module.py)",
             "and writes " + ", ".join(writes) + ". The accuracy is the search's estimate",
             "with supernet weights; train the network fully for better.", '"""', "import os"]
    body = blocks_source.split('"""', 2)[2].lstrip("\n")  # without the module docstring
    imports, _, rest = body.partition("\n\n\n")
    values = [f"{k} = {v!r}" for k, v in header.items()]
    return ("\n".join(head) + "\n" + imports + "\n\n" + "\n".join(values) + "\n\n\n" + rest
            + _FIND_USER_MODULE + main)


def layers_literal(specs) -> str:
    """The layer specs as a Python list literal, one per line."""
    return "[\n" + "".join(f"    {tuple(s)!r},\n" for s in specs) + "]"
