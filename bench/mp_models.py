"""Models, data, metric and the NNCF peer of the mixed-precision comparison
(``bench/bench_mixed_precision.py``).

One float ONNX file, one calibration array and one evaluation set per model feed both tools:
``dopt deploy`` (a project written here, the metric as an ``evaluate(predict)`` user
function) and NNCF's ``quantize_with_accuracy_control`` (the same metric as its
``validation_fn``). Data and float models come from the PTQ benchmark (``bench_ptq.prepare``,
``bench/ptq_data.py``), so the rows compare with ``bench/results/ptq.json``.

Metrics, in points (0-100) so that ``max_drop`` reads the same for both tools:

* ``agree_top1`` (EfficientNet-Lite0): top-1 agreement with the float model (same arg-max);
* ``mask_iou`` (PP-OCR det): IoU of the thresholded (0.3) text masks vs the float model's,
  pooled over the set; per sample, that sample's IoU;
* ``top1`` (Fashion-MNIST): top-1 accuracy on the real test labels.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NPU_OPS = ("Conv", "Gemm", "MatMul")
MASK_THRESHOLD = 0.3

# name -> PTQ-bench model, metric, sample counts, evaluation batch, max_drop (points),
# dopt calibration settings (prototxt lines)
MODELS = {
    "efficientnet_lite0": {"ptq": "efficientnet_lite0", "metric": "agree_top1", "calib": 64,
                           "eval": 256, "batch": 32, "max_drop": 3.0, "calibration": ""},
    "ppocr_det": {"ptq": "ppocr_det", "metric": "mask_iou", "calib": 64, "eval": 128,
                  "batch": 8, "max_drop": 3.0, "calibration": ""},
    "mobilenetv2s": {"ptq": "mobilenetv2s", "metric": "top1", "calib": 512, "eval": 10000,
                     "batch": 500, "max_drop": 0.02,
                     "calibration": 'calibration_algorithm: "minmax"\nbias_correction: false\n'},
}

# full-set / partial calls of the metric, per tool (the dopt user function runs in-process)
CALLS: dict[str, list[int]] = {"dopt": [], "nncf": []}


# --- metric ------------------------------------------------------------------------------

def metric(kind: str, out: np.ndarray, ref: np.ndarray) -> tuple[float, list[float]]:
    """(value, per-sample values), points. ``ref``: float top-1 indices (agree_top1), float
    masks (mask_iou) or labels (top1), for the same samples as ``out``."""
    if kind in ("agree_top1", "top1"):
        hit = (out.reshape(len(out), -1).argmax(1) == ref).astype(np.float64) * 100.0
        return float(hit.mean()), hit.tolist()
    b = out > MASK_THRESHOLD
    axes = tuple(range(1, b.ndim))
    inter = np.logical_and(ref, b).sum(axes).astype(np.float64)
    union = np.logical_or(ref, b).sum(axes).astype(np.float64)
    per = np.where(union > 0, inter / np.maximum(union, 1), 1.0) * 100.0
    pooled = 100.0 * inter.sum() / union.sum() if union.sum() else 100.0
    return float(pooled), per.tolist()


def reference(kind: str, float_out: np.ndarray, labels) -> np.ndarray:
    if kind == "top1":
        return np.asarray(labels, np.int64)
    if kind == "agree_top1":
        return float_out.reshape(len(float_out), -1).argmax(1)
    return float_out > MASK_THRESHOLD


def dopt_evaluate(folder, predict):
    """The body of the project's ``metric.py:evaluate``: the whole evaluation set, one call."""
    folder = Path(folder)
    spec = json.loads((folder / "metric.json").read_text())
    x = np.load(folder / "eval.npy", mmap_mode="r")
    ref = np.load(folder / "ref.npy")
    CALLS["dopt"].append(len(x))
    return metric(spec["metric"], np.asarray(predict(np.asarray(x))), ref)


METRIC_PY = '''"""The benchmark's metric for dopt deploy (bench/mp_models.py, shared with NNCF)."""
import sys
from pathlib import Path

sys.path.insert(0, {root!r})
from bench.mp_models import dopt_evaluate  # noqa: E402


def evaluate(predict):
    return dopt_evaluate(Path(__file__).resolve().parent, predict)
'''

CONFIG = """strategy: "Quant_INT8-8"
device: USE_CPU
{extra}preprocess_parameter:
{{
    input_type: BINARY
    input_file_path: "calib.bin"
}}
"""


# --- data and project --------------------------------------------------------------------

def prepare(name: str, work: Path, n_calib: int | None = None, n_eval: int | None = None) -> dict:
    """float.onnx, calib.npy, eval.npy, ref.npy (and calib.bin) in ``work``; returns facts."""
    from bench import bench_ptq

    spec = MODELS[name]
    kind = spec["metric"]
    n_calib, n_eval = n_calib or spec["calib"], n_eval or spec["eval"]
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    ex, labels, info = bench_ptq.prepare(spec["ptq"], n_calib, n_eval, work, self_check=False)
    ex = np.ascontiguousarray(ex, np.float32)
    np.save(work / "eval.npy", ex)
    float_out = bench_ptq.run_model(work / "float.onnx", ex, spec["batch"])
    ref = reference(kind, float_out, labels)
    np.save(work / "ref.npy", ref)
    from dopt.calib.sets import write_bin610
    write_bin610(work / "calib.bin", np.load(work / "calib.npy"))
    float_metric = metric(kind, float_out, ref)[0]
    return {"n_calib": n_calib, "n_eval": int(len(ex)), "metric": kind,
            "float_metric_ort": float_metric, "prepare_s": round(time.perf_counter() - t, 1),
            **{k: v for k, v in info.items() if k in ("calib_photos", "eval_photos", "data")}}


def write_project(name: str, work: Path, max_drop: float, max_evaluations: int = 12) -> Path:
    """The ``dopt deploy`` project of ``work``: config.prototxt, metric.py, deploy.yaml."""
    spec = MODELS[name]
    from bench.ptq_peers import _input_name
    shape = np.load(work / "calib.npy", mmap_mode="r").shape[1:]
    (work / "config.prototxt").write_text(CONFIG.format(extra=spec["calibration"]))
    (work / "metric.json").write_text(json.dumps({"metric": spec["metric"]}))
    (work / "metric.py").write_text(METRIC_PY.format(root=str(ROOT)))
    inp = _input_name(work / "float.onnx")
    (work / "deploy.yaml").write_text(f"""model: float.onnx
input_shape: "{inp}:1,{','.join(map(str, shape))}"
calibration: config.prototxt
evaluation: {{function: metric.py:evaluate, batch_size: {spec['batch']}}}
mixed_precision: {{max_evaluations: {max_evaluations}}}
gates:
  accuracy: {{max_drop: {max_drop}}}
output: out
""")
    return work / "deploy.yaml"


# --- NNCF --------------------------------------------------------------------------------

def nncf_accuracy_control(name: str, work: Path, max_drop: float) -> dict:
    """``nncf.quantize_with_accuracy_control`` on ``work/float.onnx``; writes nncf.onnx.

    Same calibration samples (``subset_size`` = all of them), same evaluation set and metric,
    absolute ``max_drop``; quantizers on Conv/Gemm/MatMul only (the NPU's INT8 op set, as
    in the PTQ benchmark). Every call of the validation function is recorded."""
    import nncf
    import onnx
    from dopt.formats.qdq import ort_session
    from bench.ptq_peers import _input_name

    spec = MODELS[name]
    kind, batch = spec["metric"], spec["batch"]
    calib = np.load(work / "calib.npy")
    x = np.load(work / "eval.npy")
    ref = np.load(work / "ref.npy")
    inp = _input_name(work / "float.onnx")
    model = onnx.load(str(work / "float.onnx"))
    calls = CALLS["nncf"]
    calls.clear()
    metrics_seen: list[tuple[int, float]] = []

    def validate(m, items):
        idx = np.asarray(list(items), np.int64)
        sess = ort_session(m.SerializeToString(), optimize=False)
        outs = [sess.run(None, {inp: x[idx[i:i + batch]]})[0] for i in range(0, len(idx), batch)]
        value, per = metric(kind, np.concatenate(outs), ref[idx])
        calls.append(len(idx))
        metrics_seen.append((len(idx), value))
        return value, per

    cal = nncf.Dataset(range(len(calib)), lambda i: {inp: calib[i:i + 1]})
    val = nncf.Dataset(range(len(x)), lambda i: {inp: x[i:i + 1]})
    ignored = sorted({n.op_type for n in model.graph.node} - set(NPU_OPS))
    t0 = time.perf_counter()
    q = nncf.quantize_with_accuracy_control(
        model, cal, val, validate, max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(calib), ignored_scope=nncf.IgnoredScope(types=ignored, validate=False))
    wall = time.perf_counter() - t0
    onnx.save(q, str(work / "nncf.onnx"))
    n = len(x)
    full = [v for k, v in metrics_seen if k == n]
    final, _ = validate(q, range(n))        # the result's metric, outside the count
    calls.pop()
    metrics_seen.pop()
    fl = nncf_float_layers(q)
    return {"tool": f"nncf {nncf.__version__}", "wall_s": round(wall, 1),
            "float_metric": full[0] if full else None,
            "all_int8_metric": full[1] if len(full) > 1 else None,
            "metric": final, "drop": (full[0] - final) if full else None,
            "validation_calls": len(calls),
            "full_set_calls": sum(1 for k in calls if k == n),
            "subset_calls": sum(1 for k in calls if k != n),
            "samples_evaluated": int(sum(calls)),
            "full_evaluation_equivalents": round(sum(calls) / n, 2),
            "ignored_types": ignored, **fl}


def nncf_float_layers(q) -> dict:
    """Conv/Gemm/MatMul nodes of NNCF's result with and without INT8 (a DequantizeLinear
    feeding the weight, resp. the data input)."""
    producer = {o: nd for nd in q.graph.node for o in nd.output}

    def dq(t):
        p = producer.get(t)
        return p is not None and p.op_type == "DequantizeLinear"

    int8, fl, partial = [], [], []
    for nd in q.graph.node:
        if nd.op_type not in NPU_OPS:
            continue
        w, a = len(nd.input) > 1 and dq(nd.input[1]), dq(nd.input[0])
        (int8 if w and a else fl if not (w or a) else partial).append(nd.name)
    return {"int8_layers": len(int8), "float_layers": fl, "partly_quantized": partial}


# --- dopt's compiler on a chosen set of float layers ----------------------------------------

def dopt_variant(out: Path, float_set, evaluate: bool = True) -> dict:
    """The dopt build of a deploy run (``out``) with ``float_set`` kept FP16: its estimated
    NPU latency and, if asked, its simulated metric (the same PTQ, other precisions)."""
    import onnx
    from dopt.deploy.config import load_config
    from dopt.deploy.evaluate import simulated_predictor
    from dopt.deploy.pipeline import _total_ms, compile_model
    from dopt.deploy.variants import Variants
    from dopt.formats import param_file as P

    w = out / "work"
    float_model = onnx.load(str(w / "float.onnx"))
    v = Variants(onnx.load(str(w / "model_qdq_all.onnx")), P.read_params(w / "quant_param_all.json"),
                 float_model)
    chosen = [n for n in v.layers if n in set(float_set)]
    qdq, params = v.build(chosen)
    cfg = load_config(out.parent / "deploy.yaml")
    om, _ = compile_model(qdq, cfg, params, "quant_param.json")
    res = {"fp16_layers": chosen, "not_int8_in_dopt": sorted(set(float_set) - set(v.layers)),
           "latency_ms": _total_ms(om.meta.get("estimate"))}
    if evaluate:
        spec = json.loads((out.parent / "metric.json").read_text())
        x = np.load(out.parent / "eval.npy")
        ref = np.load(out.parent / "ref.npy")
        # scored as dopt deploy scores its own builds: the NPU's data types (FP16 between
        # the Q/DQ pairs)
        pred = simulated_predictor(qdq, batch_size=cfg.evaluation.batch_size)
        res["simulated_metric"] = metric(spec["metric"], pred(x), ref)[0]
    return res


def compile_qdq_directly(out: Path, qdq_path: Path) -> float | None:
    """What ``dopt omg --model nncf.onnx`` gives: the QDQ pairs are stripped (no parameter
    file), so the estimate is the all-FP16 build's."""
    import onnx
    from dopt.deploy.config import load_config
    from dopt.deploy.pipeline import _total_ms, compile_model

    om, _ = compile_model(onnx.load(str(qdq_path)), load_config(out.parent / "deploy.yaml"),
                          None, None)
    return _total_ms(om.meta.get("estimate"))
