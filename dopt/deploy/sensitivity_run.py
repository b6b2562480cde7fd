"""``dopt sensitivity``: the per-layer table of ``dopt deploy``, on its own.

Converts and quantizes exactly as ``dopt deploy`` does (same ``deploy.yaml``), compiles
the FP16 and INT8 builds for the per-layer latency estimate, and writes
``sensitivity.json``, ``sensitivity.md`` (the ranked table) and ``sensitivity.png``.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..errors import DoptError
from ..formats.fileio import atomic_path, staged_outputs, write_json_atomic


def run_sensitivity(config, output, *, full: bool = False, log=None) -> list[dict]:
    from . import pipeline as PL, sensitivity as S
    from .config import DeployConfig, load_config
    from .evaluate import make_evaluator, ort_predictor
    from .variants import Variants
    cfg = config if isinstance(config, DeployConfig) else load_config(config)
    say = log or PL.Progress().log
    so = PL._load_calibration(cfg)
    evaluator = make_evaluator(cfg.evaluation, so, cfg.input_shapes, cfg.input_format) \
        if full else None
    out = Path(output)
    if not out.resolve().parent.is_dir():
        raise DoptError("the output folder's parent does not exist", file=str(out),
                        field="--output")
    work = Path(tempfile.mkdtemp(prefix=".dopt-sens-", dir=out.resolve().parent))
    try:
        say("sensitivity: convert and quantize")
        float_model, float_path = PL.convert(cfg, work, say)
        float_bytes = float_model.SerializeToString()
        qdq, params, sample, job = PL.quantize(cfg, so, float_path, work, say)
        if not sample:
            raise DoptError("the calibration set gave no sample", file=str(cfg.calibration))
        variants = Variants(qdq, params, float_model, equalized=bool(job.equalization))
        say("sensitivity: compile FP16 and INT8 for the latency estimate")
        om16, _ = PL.compile_model(float_model, cfg, None, None)
        om8, _ = PL.compile_model(qdq, cfg, params, "quant_param.json")
        t16 = PL.per_layer_ms(om16.meta.get("estimate"), variants.layers)
        t8 = PL.per_layer_ms(om8.meta.get("estimate"), variants.layers)
        feed = {k: v[:cfg.mixed.sensitivity_samples] for k, v in sample.items()}
        worst, _ = S.worst_samples(float_bytes, qdq.SerializeToString(), feed,
                                   cfg.mixed.worst_samples)
        say(f"sensitivity: {len(variants.layers)} layers on the {len(next(iter(worst.values())))}"
            f" worst of {len(next(iter(feed.values())))} calibration samples")
        res = S.cheap(variants, float_bytes, worst, log=say)
        lat = {n: {"fp16_ms": t16[n], "int8_ms": t8[n],
                   "fp16_extra_ms": max(t16[n] - t8[n], 0.0)} for n in variants.layers}
        if full:
            bs = cfg.evaluation.batch_size
            fm = evaluator(ort_predictor(float_bytes, optimize=True, batch_size=bs)).value
            q = evaluator(ort_predictor(qdq.SerializeToString(), optimize=False,
                                        batch_size=bs)).value
            say(f"sensitivity: {evaluator.name} float {fm:.4f}, all INT8 {q:.4f}")
            per = S.full(variants, evaluator, batch_size=bs, log=say)
            for n in per:
                lat[n].update(per[n])
            res["float_metric"], res["int8_metric"] = fm, q
        rows = S.table(res, lat)
        name = evaluator.name if evaluator else "metric"
        text = S.render_table(rows, name)
        doc = {"format": "dopt.sensitivity", "version": 1, "model": cfg.model,
               "samples": res["samples"], "all_int8_sqnr_db": res["all_int8_sqnr_db"],
               "metric_name": name, "float_metric": res.get("float_metric"),
               "int8_metric": res.get("int8_metric"), "layers": rows}
        with staged_outputs(out) as stage:
            write_json_atomic(stage / "sensitivity.json", doc)
            (stage / "sensitivity.md").write_text(text + "\n", encoding="utf-8")
            _chart(stage / "sensitivity.png", rows)
        print(text)
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _chart(path: Path, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    total = sum(r["noise_only_int8"] for r in rows) or 1.0
    shown = rows[:40]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.22 * len(shown) + 1)))
    ax.barh(range(len(shown)), [r["noise_only_int8"] / total * 100 for r in shown],
            color="#4a90d9")
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([r["layer"] for r in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("share of the all-INT8 output noise (%), only this layer INT8")
    ax.set_title("per-layer quantization sensitivity")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
