"""``dopt deploy``: convert -> PTQ -> mixed precision -> compile -> evaluate -> gates -> sign.

Each step reuses the path a user would run by hand: conversion through the framework's
adapter (PyTorch: ``generate_final_model`` with every layer float; TensorFlow:
``dopt_convert_model``), PTQ through ``dopt_so``'s ``dopt_quantize_file`` on the ONNX file
with the user's ``config.prototxt`` and calibration set, compilation through
``dopt.npu.compiler`` (what ``dopt omg`` runs) with the parameter file, and the
deployed build is measured on the emulated NPU runtime. Everything is checked before
anything is written; the outputs appear together at the end (``build/`` signed,
``report.html``, ``junit.xml``), marked failed when a gate fails.

Output folder::

    build/          model.om (INT8 / mixed), model_fp16.om, quant_param.json, report.json,
                    deploy_manifest.json, dopt.sig        <- the signed deployment
    report.html     junit.xml
    work/           float.onnx, model_qdq.onnx, sensitivity.json, search state
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import DoptError
from .config import DeployConfig, load_config

STEPS = ("convert", "quantize", "compile", "evaluate", "sensitivity", "mixed precision",
         "final build", "gates", "reports")


class Progress:
    """One line per step on stderr, with its time."""

    def __init__(self, log=None, total: int = len(STEPS)):
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.total, self.i, self.t = total, 0, None
        self.steps: list[dict] = []

    def start(self, name: str) -> None:
        self.i += 1
        self.t = time.perf_counter()
        self.name = name
        self.log(f"[{self.i}/{self.total}] {name} ...")

    def done(self, **figures) -> None:
        dt = time.perf_counter() - self.t
        self.steps.append({"step": self.name, "seconds": round(dt, 3), **figures})
        shown = ", ".join(f"{k} {v}" for k, v in figures.items() if not isinstance(v, (list, dict)))
        self.log(f"      {self.name}: {dt:.1f} s" + (f" ({shown})" if shown else ""))


# --- step helpers ---------------------------------------------------------------------

def _load_calibration(cfg: DeployConfig):
    """``config.prototxt`` as is; a relative ``input_file_path`` is looked up beside the
    prototxt first, then (as the reference does) in the current folder."""
    from ..calib.prototxt import load_so_config
    so = load_so_config(cfg.calibration, check_paths=False)
    fixed = []
    for pp in so.preprocess:
        raw = pp.input_file_path
        cands = [Path(raw)] if os.path.isabs(raw) else [cfg.calibration.parent / raw,
                                                         Path(os.path.abspath(raw))]
        hit = next((c for c in cands if c.exists()), None)
        if hit is None:
            raise DoptError(f"the input_file_path of preprocess_parameter {pp.index + 1} does "
                            f"not exist", file=str(cfg.calibration),
                            field=f"preprocess_parameter[{pp.index}].input_file_path",
                            found=repr(raw), hint="a relative path is read beside the "
                            "prototxt or in the current folder")
        fixed.append(dataclasses.replace(pp, path=hit.resolve()))
    return dataclasses.replace(so, preprocess=fixed)


def _calibration_feeds(cfg: DeployConfig, so, input_format: str):
    from ..calib import sets as calibset
    readers = calibset.open_all(so, cfg.input_shapes, input_format)
    names = list(cfg.input_shapes)
    batch = so.batch_size or max(1, next(iter(cfg.input_shapes.values()))[0])
    available = min(r.num_samples for r in readers)
    limit = min(available, so.calibration_samples) if so.calibration_samples else available

    def feeds():
        return calibset.iter_feeds(readers, names, batch, limit)
    return readers, feeds, limit


def _first_samples(feeds, n: int) -> dict:
    from ..ptq.algorithm import first_samples
    return first_samples(feeds(), n)


def convert(cfg: DeployConfig, work: Path, log) -> tuple[object, Path]:
    """The user's model as a float ONNX graph (source framework's layer names)."""
    import onnx
    from ..formats.qdq import load_model
    dest = work / "float.onnx"
    if cfg.framework == "onnx":
        m = load_model(cfg.model, field="model", purpose="Deploying ONNX models")
    elif cfg.framework == "pytorch":
        m = _convert_torch(cfg, work, log)
    else:
        from ..plugin_manager import get_plugin_manager
        got = get_plugin_manager().hook.dopt_convert_model(
            framework=3, model_path=cfg.model, input_shapes=cfg.input_shapes,
            out_nodes=cfg.out_nodes, params=None, params_file=None)
        if got is None:
            raise DoptError("no installed dopt adapter converts TensorFlow models",
                            file=str(cfg.path), field=cfg.where("model"),
                            hint="pip install 'dopt[tf]'")
        m = got[0]
    onnx.save(m, str(dest))
    return m, dest


def _convert_torch(cfg: DeployConfig, work: Path, log):
    import dopt
    from .. import userpy
    from ..formats.qdq import load_model
    if ".py:" not in cfg.model:
        raise DoptError("name the model class or builder function", file=str(cfg.path),
                        field=cfg.where("model"), expected="model: net.py:ClassName",
                        found=repr(cfg.model))
    model = userpy.build(cfg.model, field="model")
    gen = work / "float_config.json"
    # every layer float: the export is the plain float graph, BatchNorm fused
    dopt.generate_config_file(model, cfg.input_shape, dst_path=str(gen))
    files = dopt.generate_final_model(model, str(gen), pth_file=str(cfg.weights),
                                      output_dir=str(work / "export"))
    return load_model(files["float_onnx"], field="model")


def quantize(cfg: DeployConfig, so, float_path: Path, work: Path, log) -> tuple[object, dict]:
    """``dopt_so --framework 5 --model float.onnx --cal_conf config.prototxt`` as a call."""
    from .. import plugin_manager
    from ..calib.loop import resolve_algorithm
    from ..formats import param_file as P
    from ..formats.qdq import load_model
    from ..ptq import DEFAULT_BIAS_CORRECTION, DEFAULT_EQUALIZATION, PtqJob
    input_format = cfg.input_format
    readers, feeds, limit = _calibration_feeds(cfg, so, input_format)
    out, par = work / "model_qdq_all.onnx", work / "quant_param_all.json"
    try:
        claims = [c for c in plugin_manager.get_plugin_manager().hook.dopt_claim_file(
            framework=5, model_path=str(float_path)) if c]
        if not claims:
            raise DoptError("no installed dopt adapter quantizes ONNX models",
                            hint="pip install 'dopt[onnx]'")
        job = PtqJob(framework=5, model=str(float_path), output=str(out), compress_conf=str(par),
                     input_shapes=cfg.input_shapes, feeds=feeds, num_samples=limit,
                     algorithm=resolve_algorithm(so.calibration_algorithm, file=so.path),
                     input_format=input_format, out_nodes=None, exclude=list(so.exclude_op),
                     equalization=(DEFAULT_EQUALIZATION if so.equalization is None
                                   else so.equalization),
                     bias_correction=(DEFAULT_BIAS_CORRECTION if so.bias_correction is None
                                      else so.bias_correction),
                     use_gpu=so.device == "USE_GPU", config_file=so.path, progress=False,
                     log=lambda s: log(f"      dopt_so: {s}"))
        written = plugin_manager.get_plugin_manager().hook.dopt_quantize_file(
            adapter=claims[0], job=job)
        sample = _first_samples(feeds, 512)
    finally:
        for r in readers:
            r.close()
    if written is None:
        raise DoptError(f"the '{claims[0]}' adapter does not implement no-training quantization")
    return load_model(out, field="model"), P.read_params(par), sample, job


def compile_model(model, cfg: DeployConfig, params: dict | None, params_name: str | None):
    from ..npu.compiler import compile_onnx
    from ..npu.profile import load_profile
    return compile_onnx(model, load_profile(cfg.profile), params=params, params_file=params_name,
                        input_shapes=cfg.input_shapes, source=Path(cfg.model).name)


def per_layer_ms(est: dict | None, layers) -> dict[str, float]:
    """Estimated ms of each layer's kernels (the layer and its ``<layer>/...`` steps)."""
    out = {n: 0.0 for n in layers}
    for k in (est or {}).get("kernels", []):
        node = k.get("node", "")
        base = node.split("/")[0] if node not in out else node
        for cand in (node, base):
            if cand in out:
                out[cand] += float(k.get("time_us", 0.0)) / 1e3
                break
    return out


def _total_ms(est: dict | None) -> float | None:
    s = (est or {}).get("summary") or {}
    return float(s["total_ms"]) if "total_ms" in s else None


def _placement(report: dict) -> dict:
    from ..npu.rules import CPU
    s = {str(getattr(k, "value", k)): v for k, v in report.get("summary", {}).items()}
    cpu_nodes = [x["node"] for x in report.get("nodes", []) if x.get("outcome") == CPU]
    return {"summary": s, "cpu_nodes": cpu_nodes, "cpu_count": len(cpu_nodes)}


def _versions() -> dict:
    import dopt
    v = {"dopt": dopt.__version__, "python": platform.python_version(), "numpy": np.__version__}
    for mod in ("onnx", "onnxruntime", "model_signing", "matplotlib"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken: reported as such
            v[mod] = None
    return v


def _read_baseline(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text("utf-8"))
        r = doc["results"]
        base = {"metric": float(r["deployed"]["metric"]),
                "latency_ms": float(r["latency_ms"]["deployed"]),
                "size_mb": float(r["size_mb"]["deployed"])}
    except (OSError, ValueError, KeyError, TypeError):
        raise DoptError("the baseline is not the report.json of a dopt deploy run",
                        file=str(path), field="gates.regression.baseline",
                        expected="a report.json written by dopt deploy (results.deployed."
                                 "metric, results.latency_ms, results.size_mb)") from None
    return base


def _install_dir(stage: Path, out: Path) -> None:
    """Move the staged outputs into ``out``; an earlier run's files of the same names are
    replaced (the search state in ``work/`` survives unless replaced)."""
    out.mkdir(parents=True, exist_ok=True)
    for item in sorted(stage.iterdir()):
        dest = out / item.name
        if dest.is_dir() and not dest.is_symlink():
            old = out / f".old-{item.name}-{os.getpid()}"
            os.replace(dest, old)
            os.replace(item, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(item, dest)


# --- the run --------------------------------------------------------------------------

def run(config, *, output=None, log=None, resume: bool = True) -> dict:
    """Run the deployment described by ``config`` (a ``deploy.yaml`` path or a loaded
    ``DeployConfig``); returns the report (``report["status"]`` is ``passed`` or
    ``failed``). Bad input raises ``DoptError`` before anything is written."""
    cfg = config if isinstance(config, DeployConfig) else load_config(config, output=output)
    prog = Progress(log)
    say = prog.log
    t_all = time.perf_counter()
    # -- everything that can be wrong with the input, before writing anything
    so = _load_calibration(cfg)
    from .evaluate import make_evaluator
    evaluator = make_evaluator(cfg.evaluation, so, cfg.input_shapes, cfg.input_format)
    baseline = _read_baseline(cfg.gates["regression"]["baseline"]) \
        if "regression" in cfg.gates else None
    password = None
    if cfg.signing_password_env:
        password = os.environ.get(cfg.signing_password_env)
        if password is None:
            raise DoptError(f"the environment variable {cfg.signing_password_env} is not set",
                            file=str(cfg.path), field=cfg.where("signing.password_env"))
    if cfg.signing_key is not None:
        from .signing import _lib
        _lib()
    tmp = Path(tempfile.mkdtemp(prefix=".dopt-deploy-", dir=cfg.output.resolve().parent))
    try:
        report = _run(cfg, so, evaluator, baseline, password, tmp, prog, resume)
        state = cfg.output / "work" / "search_state.json"
        if state.is_file():   # a re-run of the same search reuses its evaluations
            shutil.copyfile(state, tmp / "work" / state.name)
        _install_dir(tmp, cfg.output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - t_all, 2)
    failed = [g["gate"] for g in report["gates"] if not g["passed"]]
    say(f"dopt deploy: {report['status'].upper()}" + (
        f": gate(s) failed: {', '.join(failed)}" if failed else "") +
        f"; outputs in {cfg.output} ({report['seconds']:.1f} s)")
    return report


def _run(cfg, so, evaluator, baseline, password, stage: Path, prog: Progress,
         resume: bool) -> dict:
    from ..formats import param_file as P
    from ..npu import omfile
    from . import gates as G
    from . import mixed, report as R, sensitivity as S
    from .evaluate import agreement, om_predictor, ort_predictor, simulated_predictor
    from .variants import Variants
    say = prog.log
    build, work = stage / "build", stage / "work"
    build.mkdir()
    work.mkdir()
    state_path = cfg.output / "work" / "search_state.json"
    bs = cfg.evaluation.batch_size

    prog.start("convert")
    float_model, float_path = convert(cfg, work, say)
    float_bytes = float_model.SerializeToString()
    prog.done(framework=cfg.framework, nodes=len(float_model.graph.node))

    prog.start("quantize")
    qdq_all, params_all, calib_sample, job = quantize(cfg, so, float_path, work, say)
    variants = Variants(qdq_all, params_all, float_model, equalized=bool(job.equalization))
    prog.done(int8_layers=len(variants.layers),
              float_layers=len(params_all.get("float_layers") or []),
              algorithm=job.algorithm)

    prog.start("compile")
    om16, rep16 = compile_model(float_model, cfg, None, None)
    om8, rep8 = compile_model(qdq_all, cfg, params_all, "quant_param.json")
    est16, est8 = om16.meta.get("estimate"), om8.meta.get("estimate")
    t16, t8 = per_layer_ms(est16, variants.layers), per_layer_ms(est8, variants.layers)
    extra = {n: max(t16[n] - t8[n], 0.0) for n in variants.layers}
    # INT8 only where it pays: a layer the estimate gives no gain in INT8 (its Quantize /
    # Dequantize steps cost more than the narrower arithmetic saves, as on small, launch-bound
    # layers) stays FP16 whenever mixed precision is on; FP16 is closer to float as well
    slower = [n for n in variants.layers if t8[n] > t16[n]] if cfg.mixed.enabled else []
    prog.done(fp16_ms=round(_total_ms(est16) or 0, 4), int8_ms=round(_total_ms(est8) or 0, 4))

    prog.start("evaluate")
    float_score = evaluator(ort_predictor(float_bytes, optimize=True, batch_size=bs))
    sim_all = evaluator(simulated_predictor(qdq_all, batch_size=bs))
    prog.done(float=round(float_score.value, 4), simulated_int8=round(sim_all.value, 4),
              samples=evaluator.samples or sim_all.samples)

    acc_gate = cfg.gates.get("accuracy")
    max_drop_abs = None
    if acc_gate:
        max_drop_abs = acc_gate["max_drop"] * abs(float_score.value) if acc_gate["relative"] \
            else acc_gate["max_drop"]
    need_mixed = (cfg.mixed.enabled and max_drop_abs is not None
                  and float_score.value - sim_all.value > max_drop_abs)

    prog.start("sensitivity")
    sens = None
    if cfg.mixed.enabled and calib_sample:
        feed = {k: v[:cfg.mixed.sensitivity_samples] for k, v in calib_sample.items()}
        worst, _ = S.worst_samples(float_bytes, qdq_all.SerializeToString(), feed,
                                   cfg.mixed.worst_samples)
        sens = S.cheap(variants, float_bytes, worst, both=False, log=say)
        lat = {n: {"fp16_ms": t16[n], "int8_ms": t8[n], "fp16_extra_ms": extra[n]}
               for n in variants.layers}
        sens["table"] = S.table(sens, lat)
        prog.done(layers=len(variants.layers), samples=sens["samples"],
                  all_int8_sqnr_db=round(sens["all_int8_sqnr_db"], 2))
    else:
        prog.done(skipped="mixed_precision.enabled is false" if not cfg.mixed.enabled
                  else "no calibration samples")

    prog.start("mixed precision")
    search = None
    float_set: list[str] = []

    def with_slower(fs):
        return list(fs) + [n for n in slower if n not in fs]

    states: list = []

    def run_search(layers, base_metric, tag, budget=None, seed=None, max_evals=None):
        budget = max_drop_abs if budget is None else budget
        if cfg.mixed.ranking == "metric":
            full = S.full(variants, evaluator, batch_size=bs, log=say)
            gain = {n: full[n]["metric_only_float"] - sim_all.value for n in full}
            for row in sens["table"]:
                row.update(full.get(row["layer"], {}))
        else:
            gain = {n: r["noise_only_int8"] for n, r in sens["layers"].items()}
        ranking = mixed.rank(layers, gain, extra)
        if tag == "repair":   # only the prefixes whose FP16 cost the trim's saving can pay
            ranking = mixed.affordable(ranking, all8_ms - trim_ms)
        fp = mixed.fingerprint(qdq_all.SerializeToString(), params_all, cfg.raw.get("evaluation"),
                               budget, [r["layer"] for r in ranking], evaluator.samples,
                               sorted(slower), tag)
        state = mixed.State(state_path if resume else None, fp)
        if not resume:
            state.path = state_path
        for k, v in (seed or {}).items():      # the same builds, judged by another budget
            state.evals.setdefault(k, v)
        states.append(state)

        def evaluate(fs):
            m, _ = variants.build(with_slower(fs))
            return evaluator(simulated_predictor(m, batch_size=bs)).value

        def on_best(fs, m):
            doc = variants.params_for(with_slower(fs))
            best = cfg.output / "work" / "best_quant_param.json"
            best.parent.mkdir(parents=True, exist_ok=True)
            P.write_params(best, doc)

        return mixed.search(ranking, evaluate, float_metric=float_score.value,
                            max_drop=budget, max_evaluations=(cfg.mixed.max_evaluations
                                                              if max_evals is None else max_evals),
                            state=state, base_metric=base_metric, log=say, on_best=on_best)

    all8_ms = _total_ms(est8) or 0.0
    trim_ms = all8_ms
    trim_sim = None
    if need_mixed and sens is not None:
        search = run_search([n for n in variants.layers if n not in slower], sim_all.value,
                            "accuracy")
        float_set = with_slower(search.float_layers)
        prog.done(fp16_layers=len(float_set), full_evaluations=search.evaluations,
                  cached=search.cached, passed=search.passed)
    else:
        why = ("no accuracy gate" if max_drop_abs is None else
               "mixed_precision.enabled is false" if not cfg.mixed.enabled else
               "INT8 meets max_drop")
        float_set = list(slower)
        if slower and max_drop_abs is not None and sens is not None:
            # INT8 meets the budget, but the trimmed build (slower layers FP16) may not: then
            # the layers that regain the most accuracy per ms join it, as long as the whole
            # build stays below all-INT8's estimate (else the final build keeps all-INT8)
            q_trim, p_trim = variants.build(slower)
            trim_ms = _total_ms(compile_model(q_trim, cfg, p_trim, "quant_param.json")[0]
                                .meta.get("estimate")) or all8_ms
            trim_sim = evaluator(simulated_predictor(q_trim, batch_size=bs))
            if trim_ms < all8_ms and float_score.value - trim_sim.value > max_drop_abs:
                say(f"      FP16 where INT8 is slower ({len(slower)} layer(s), {trim_ms:.4g} ms "
                    f"against all-INT8's {all8_ms:.4g} ms) drops "
                    f"{float_score.value - trim_sim.value:.4g} > {max_drop_abs:g}: "
                    f"looking for layers that restore it within the saving")
                search = run_search([n for n in variants.layers if n not in slower],
                                    trim_sim.value, "repair")
                if search.passed:
                    float_set = with_slower(search.float_layers)
                    trim_sim = None
        prog.done(skipped=why, fp16_where_int8_is_slower=len(slower),
                  **({} if search is None else {"repair_evaluations": search.evaluations,
                                                 "repair_passed": search.passed}))

    prog.start("final build")
    qdq, params = variants.build(float_set)
    om_final, rep_final = compile_model(qdq, cfg, params, "quant_param.json")
    sim = (sim_all if not float_set else trim_sim if trim_sim is not None and
           float_set == list(slower) else evaluator(simulated_predictor(qdq, batch_size=bs)))
    trimmed_ms = _total_ms(om_final.meta.get("estimate")) or 0.0
    lost = (max_drop_abs is not None and float_score.value - sim.value > max_drop_abs
            and float_score.value - sim_all.value <= max_drop_abs)
    if (search is None or not need_mixed) and float_set and (trimmed_ms >= all8_ms or lost):
        # the estimate of the whole build, or the metric, does not bear the per-layer view out
        why = (f"its estimate {trimmed_ms:.4g} ms is not below all-INT8's {all8_ms:.4g} ms"
               if trimmed_ms >= all8_ms else
               f"its drop {float_score.value - sim.value:.4g} exceeds max_drop {max_drop_abs:g}")
        say(f"      keeping all-INT8: the build with FP16 on the {len(float_set)} layer(s) the "
            f"estimate gives no INT8 gain is not kept: {why}")
        float_set, slower, sim = [], [], sim_all
        qdq, params = variants.build(float_set)
        om_final, rep_final = compile_model(qdq, cfg, params, "quant_param.json")
    om_path, om16_path = build / "model.om", build / "model_fp16.om"
    omfile.write_om(om16_path, om16)
    import onnx

    def deploy(qdq, params, om_final):
        """Write the build's ``.om``, parameter file and QDQ model; the deployed metric."""
        omfile.write_om(om_path, om_final)
        P.write_params(build / "quant_param.json", params)
        onnx.save(qdq, str(work / "model_qdq.onnx"))
        return evaluator(om_predictor(om_path, batch_size=bs))

    deployed = deploy(qdq, params, om_final)
    # the deployed build is the judge: where the simulation met max_drop and the emulated NPU
    # does not, the budget is tightened by the gap and the search resumes on its history
    retries: list[dict] = []
    budget = max_drop_abs
    evaluations = search.evaluations if search is not None else 0
    while (need_mixed and search is not None and search.passed and len(retries) < 2
           and float_score.value - deployed.value > max_drop_abs
           >= float_score.value - sim.value and evaluations < cfg.mixed.max_evaluations):
        gap = sim.value - deployed.value
        budget -= max(gap, 0.0) + 1e-9
        say(f"      the deployed build drops {float_score.value - deployed.value:.4g} > "
            f"max_drop {max_drop_abs:g} where its simulation drops "
            f"{float_score.value - sim.value:.4g}: searching again with the budget less the "
            f"gap ({budget:.4g})")
        search = run_search([n for n in variants.layers if n not in slower], sim_all.value,
                            "accuracy", budget=budget, seed=states[-1].evals,
                            max_evals=cfg.mixed.max_evaluations - evaluations)
        evaluations += search.evaluations
        float_set = with_slower(search.float_layers)
        retries.append({"deployed_drop": float_score.value - deployed.value,
                        "simulated_drop": float_score.value - sim.value, "budget": budget,
                        "fp16_layers": len(float_set), "evaluations": search.evaluations})
        qdq, params = variants.build(float_set)
        om_final, rep_final = compile_model(qdq, cfg, params, "quant_param.json")
        sim = evaluator(simulated_predictor(qdq, batch_size=bs))
        deployed = deploy(qdq, params, om_final)
    deployed16 = evaluator(om_predictor(om16_path, batch_size=bs))
    est = om_final.meta.get("estimate")
    agree = agreement(deployed, sim)
    prog.done(deployed=round(deployed.value, 4), simulated=round(sim.value, 4),
              agreement=None if agree is None else round(agree, 3),
              latency_ms=round(_total_ms(est) or 0, 4))

    fv = float_score.value
    results = {
        "metric_name": evaluator.name,
        "samples": evaluator.samples or deployed.samples,
        "float": {"metric": fv, "runs_on": "ONNX Runtime FP32"},
        "simulated_all_int8": {"metric": sim_all.value, "drop": fv - sim_all.value},
        "simulated": {"metric": sim.value, "drop": fv - sim.value,
                      "runs_on": "ONNX Runtime, QDQ model"},
        "deployed": {"metric": deployed.value, "drop": fv - deployed.value,
                     "runs_on": "emulated NPU, model.om"},
        "deployed_fp16": {"metric": deployed16.value, "drop": fv - deployed16.value,
                          "runs_on": "emulated NPU, model_fp16.om"},
        "agreement": agree,
        "latency_ms": {"deployed": _total_ms(est), "int8_all": _total_ms(est8),
                       "fp16": _total_ms(est16)},
        "size_mb": {"deployed": om_path.stat().st_size / 1e6,
                    "fp16": om16_path.stat().st_size / 1e6},
        "memory_mib": ((est or {}).get("summary", {}).get("peak_memory_bytes", 0) / 2**20),
        "placement": _placement(rep_final),
        "estimate_label": (est or {}).get("label"),
        "max_drop_abs": max_drop_abs,
    }
    if deployed.per_sample is not None:
        results["deployed"]["per_sample"] = {"n": len(deployed.per_sample)}

    prog.start("gates")
    gate_rows = G.check(cfg.gates, results, baseline)
    status = "passed" if all(g["passed"] for g in gate_rows) else "failed"
    for g in gate_rows:
        say(f"      gate {g['gate']}: {'PASS' if g['passed'] else 'FAIL'} - {g['message']}")
    prog.done(passed=sum(g["passed"] for g in gate_rows), failed=sum(not g["passed"]
                                                                       for g in gate_rows))

    prog.start("reports")
    layer_lat = [{"layer": n, "fp16_ms": t16[n], "int8_ms": t8[n], "fp16_extra_ms": extra[n],
                  "in_build": "fp16" if n in float_set else "int8"} for n in variants.layers]
    chosen = []
    if search is not None:
        by = {r["layer"]: r for r in search.ranking}
        what = "output noise removed" if cfg.mixed.ranking == "sqnr" else "metric regained"
        for i, n in enumerate(x for x in float_set if x in by):
            r = by[n]
            chosen.append({"layer": n, "rank": i + 1, "gain": r["gain"],
                           "fp16_extra_ms": r["fp16_extra_ms"], "gain_per_ms": r["gain_per_ms"],
                           "why": f"rank {i + 1} by {what} per ms of FP16 latency "
                                  f"({r['gain_per_ms']:.4g}/ms)"})
    report = {
        "format": "dopt.deploy_report", "version": 1, "status": status,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {"file": str(cfg.path), "model": cfg.model, "framework": cfg.framework,
                   "input_shape": cfg.input_shape, "calibration": str(cfg.calibration),
                   "evaluation": {"kind": cfg.evaluation.kind, "source": str(cfg.evaluation.path),
                                  "samples": results["samples"]},
                   "profile": om_final.profile, "gates": cfg.raw.get("gates") or {}},
        "versions": _versions(),
        "quantization": {"algorithm": job.algorithm, "equalization": bool(job.equalization),
                         "bias_correction": bool(job.bias_correction),
                         "calibration_samples": job.num_samples,
                         "int8_layers": [n for n in variants.layers if n not in float_set],
                         "fp16_layers": float_set,
                         "fp16_where_int8_is_slower": slower,
                         "float_layers_ptq": params_all.get("float_layers") or [],
                         "notes": variants.notes},
        "results": results,
        "gates": gate_rows,
        "mixed_precision": None if search is None else {
            "purpose": ("bring the drop within max_drop" if need_mixed else
                        "restore the drop of the build with FP16 where INT8 is slower"),
            "max_drop": max_drop_abs, "ranking": cfg.mixed.ranking,
            "full_evaluations": evaluations, "cached_evaluations": search.cached,
            "deployed_checks": retries,
            "budget": cfg.mixed.max_evaluations, "budget_exhausted": search.budget_exhausted,
            "passed": search.passed, "chosen": chosen, "steps": search.log,
            "ranked": search.ranking, "seconds": round(search.seconds, 2)},
        "sensitivity": None if sens is None else {
            "samples": sens["samples"], "all_int8_sqnr_db": sens["all_int8_sqnr_db"],
            "table": sens["table"]},
        "per_layer_latency": layer_lat,
        "estimate": {"label": (est or {}).get("label"), "top_time": (est or {}).get("top_time")},
        "files": {"om": "build/model.om", "om_fp16": "build/model_fp16.om",
                  "param_file": "build/quant_param.json", "report": "build/report.json",
                  "qdq_model": "work/model_qdq.onnx", "float_model": "work/float.onnx"},
        "signing": ({"signed": True, "files": ["model.om", "model_fp16.om", "quant_param.json",
                                               "report.json"],
                     "signature": "build/dopt.sig", "manifest": "build/deploy_manifest.json"}
                    if cfg.signing_key else {"signed": False,
                                             "why": "no signing.key in deploy.yaml"}),
        "steps": prog.steps,
    }
    from ..formats.fileio import write_json_atomic
    write_json_atomic(build / "report.json", report)
    if sens is not None:
        write_json_atomic(work / "sensitivity.json", {"layers": sens["table"],
                                                      "all_int8_sqnr_db":
                                                      sens["all_int8_sqnr_db"]})
    if cfg.signing_key is not None:
        from .signing import sign_folder
        sign_folder(build, cfg.signing_key, password=password,
                    files=["model.om", "model_fp16.om", "quant_param.json", "report.json"],
                    extra={"build_status": status})
    R.write_junit(stage / "junit.xml", report)
    R.write_html(stage / "report.html", report)
    prog.done(signed=cfg.signing_key is not None)
    return report
