"""No-training quantization of an ONNX model: calibrate in ONNX Runtime, write QDQ + params.

The model runs in ONNX Runtime with the input of every quantized node exposed as an
extra output; the core observers turn those batches into ranges, the core numerics into
scales. What is written is the float graph the parameter file is keyed against, with
QuantizeLinear/DequantizeLinear applied (``dopt.onnx_qdq.build_qdq``): ONNX Runtime runs
it, and ``dopt omg --compress_conf`` compiles it (it strips the QDQ pairs again).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

import dopt
from dopt import numerics as nm
from dopt import onnx_qdq
from dopt import params as P
from dopt.bias_correction import corrected_bias
from dopt.calibrate import Statistics, calibrate, resolve_algorithm
from dopt.equalize import equalize_pair
from dopt.errors import DoptError
from dopt.fileio import atomic_paths
from dopt.npu import prepare as prep
from dopt.npu.profile import load_profile
from dopt.npu.rules import int8_skip_reason, int8_skipped

QUANT_OPS = ("Conv", "Gemm", "MatMul")
# activations between two convolutions through which equalization is exact: f(x/s) = f(x)/s
HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu", "Identity")
CHECK_SAMPLES = 32  # calibration samples the quantized model is compared with float on


@dataclass
class Layer:
    node: object
    weight: np.ndarray          # output channels first
    groups: int
    in_axis: int                # channel axis of the node's activation input

    @property
    def name(self) -> str:
        return self.node.name


@dataclass
class PtqResult:
    model: object               # the QDQ ModelProto
    float_model: object         # the float graph the parameter file is keyed against
    params: dict
    quantized: list[str]
    float_layers: dict[str, str]
    stats: Statistics
    seconds: float
    notes: list[str] = field(default_factory=list)


def prepare_model(model, *, input_shapes=None, out_nodes=None, file=None):
    """Opset >= 13 (per-channel QDQ), named nodes, the user's shapes, constants folded.

    Unlike the compiler's preparation the batch stays free: calibration runs batches.
    """
    for n in model.graph.node:
        if any(a.type in (5, 10) for a in n.attribute):
            raise DoptError(f"node '{n.name}' ({n.op_type}) holds a subgraph (control flow)",
                            file=file, field=n.name,
                            hint="export the model without If/Loop/Scan (e.g. trace it)")
    v = prep.model_opset(model)
    if v < onnx_qdq.QDQ_MIN_OPSET or v > prep.MAX_OPSET:
        m = prep.convert_opset(model, file)
    else:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        m.ir_version = min(m.ir_version or prep.IR_VERSION, 10)
    prep.name_nodes(m)
    if input_shapes:
        prep.set_input_shapes(m, input_shapes, file)
    if out_nodes:
        prep.cut_outputs(m, out_nodes, file)
    prep.strip_qdq(m)
    prep.fold_constants(m)
    try:
        return onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # noqa: BLE001 - types are a convenience; ONNX Runtime infers its own
        return m


def _attr(node, name, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name),
                default)


def find_layers(m) -> dict[str, Layer]:
    """The Conv / Gemm / MatMul nodes of ``onnx_qdq.graph_layers`` that take an activation."""
    inits = {i.name: i for i in m.graph.initializer}
    nodes = {n.name: n for n in m.graph.node}
    out = {}
    for name, g in onnx_qdq.graph_layers(m).items():
        n = nodes[name]
        if n.op_type not in QUANT_OPS or n.input[0] in inits:
            continue
        w = numpy_helper.to_array(inits[g["weight"]]).astype(np.float32)
        if n.op_type == "Conv":
            groups, in_axis = int(_attr(n, "group", 1)), 1
        elif w.ndim == 2 and (n.op_type == "MatMul" or not _attr(n, "transA", 0)):
            groups, in_axis = 1, -1
        else:
            continue
        out[name] = Layer(n, np.moveaxis(w, onnx_qdq.weight_axis(n), 0), groups, in_axis)
    return out


def select_layers(layers: dict[str, Layer], exclude, *, npu_placement: bool, file=None):
    """Split into INT8 and float layers; ``exclude`` names weights (reference) or nodes."""
    by_weight = {ly.node.input[1]: name for name, ly in layers.items()}
    floats: dict[str, str] = {}
    for item in exclude:
        name = by_weight.get(item, item if item in layers else None)
        if name is None:
            sample = ", ".join(list(by_weight)[:5])
            raise DoptError(f"exclude_op names '{item}', which is neither a weight nor a "
                            f"quantizable node of the model", file=file, field="exclude_op",
                            expected=f"weight names of Conv/Gemm/MatMul nodes (e.g. {sample})",
                            hint="list them with 'dopt omg --mode 1 --framework 5 --model ...'")
        floats[name] = "exclude_op"
    if npu_placement:
        profile = load_profile()
        for name, ly in layers.items():
            cin = ly.weight.shape[1] * ly.groups if ly.node.op_type == "Conv" else 0
            if name not in floats and ly.node.op_type == "Conv" and \
                    int8_skipped(cin, ly.groups, profile):
                floats[name] = int8_skip_reason(cin, profile)
    return [n for n in layers if n not in floats], floats


def _consumers(m) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in m.graph.node:
        for x in n.input:
            out.setdefault(x, []).append(n)
    return out


def equalize(m, layers: dict[str, Layer], log) -> int:
    """Cross-layer equalization over Conv -> (ReLU) -> Conv chains; returns pairs equalized."""
    cons = _consumers(m)
    inits = {i.name: i for i in m.graph.initializer}
    outputs = {o.name for o in m.graph.output}
    pairs = 0
    for name, ly in layers.items():
        n = ly.node
        if n.op_type != "Conv" or len(n.input) > 2 and n.input[2] and n.input[2] not in inits:
            continue
        t = n.output[0]
        nxt = cons.get(t, [])
        if len(nxt) != 1 or t in outputs:
            continue
        act = nxt[0]
        if act.op_type in HOMOGENEOUS:
            x2 = act.output[0]
            nxt2 = cons.get(x2, [])
            if len(nxt2) != 1 or x2 in outputs:
                continue
            second = nxt2[0]
        else:
            second, x2 = act, t
        ly2 = layers.get(second.name)
        c = ly.weight.shape[0]
        if ly2 is None or second.op_type != "Conv" or second.input[0] != x2:
            continue
        if ly2.groups not in (1, c) or (ly2.groups == 1 and ly2.weight.shape[1] != c):
            continue
        b1 = _bias_of(inits, ly)
        b1 = np.zeros(c, np.float32) if b1 is None else b1
        w1, b1, w2, _s = equalize_pair(ly.weight, b1, ly2.weight, groups2=ly2.groups)
        _set_weight(m, inits, ly, w1)
        _set_bias(m, inits, ly, b1)
        _set_weight(m, inits, ly2, w2)
        pairs += 1
    if pairs:
        log(f"cross-layer equalization: {pairs} convolution pair(s)")
    return pairs


def _bias_of(inits, ly: Layer) -> np.ndarray | None:
    n = ly.node
    return (numpy_helper.to_array(inits[n.input[2]]).astype(np.float32)
            if len(n.input) > 2 and n.input[2] else None)


def _set_weight(m, inits, ly: Layer, w_cfirst: np.ndarray) -> None:
    ly.weight = w_cfirst.astype(np.float32)
    arr = np.moveaxis(ly.weight, 0, onnx_qdq.weight_axis(ly.node))
    inits[ly.node.input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr),
                                                             ly.node.input[1]))


def _set_bias(m, inits, ly: Layer, b: np.ndarray) -> None:
    n = ly.node
    if len(n.input) > 2 and n.input[2]:
        inits[n.input[2]].CopyFrom(numpy_helper.from_array(b.astype(np.float32), n.input[2]))
        return
    name = f"{n.name}.bias"
    while name in inits:
        name += "_"
    t = numpy_helper.from_array(b.astype(np.float32), name)
    m.graph.initializer.append(t)
    inits[name] = m.graph.initializer[-1]
    while len(n.input) < 3:
        n.input.append("")
    n.input[2] = name


def _can_take_bias(ly: Layer) -> bool:
    n = ly.node
    if n.op_type == "Conv":
        return True
    return n.op_type == "Gemm" and float(_attr(n, "beta", 1.0)) == 1.0


def correct_biases(m, layers: dict[str, Layer], quantized, stats: Statistics, log) -> int:
    """Remove the expected output shift that weight rounding causes (empirical input means)."""
    inits = {i.name: i for i in m.graph.initializer}
    done = 0
    for name in quantized:
        ly = layers[name]
        mean = stats.channel_means.get(ly.node.input[0])
        if mean is None or not _can_take_bias(ly):
            continue
        b = _bias_of(inits, ly)
        if b is not None and (b.ndim != 1 or b.shape[0] != ly.weight.shape[0]):
            continue  # a broadcast Gemm C we cannot shift per channel
        w_fq = nm.fake_quant_weight(ly.weight, nm.weight_scales(ly.weight, 0), 0)
        _set_bias(m, inits, ly, corrected_bias(b, ly.weight, w_fq, mean, groups=ly.groups))
        done += 1
    if done:
        log(f"bias correction: {done} layer(s)")
    return done


def _providers(use_gpu: bool, device_idx: int, log) -> list:
    import onnxruntime as ort
    if use_gpu:
        if "CUDAExecutionProvider" in ort.get_available_providers():
            log(f"device: GPU {device_idx} (ONNX Runtime CUDA)")
            return [("CUDAExecutionProvider", {"device_id": device_idx}),
                    "CPUExecutionProvider"]
        log("device: USE_GPU asked, but ONNX Runtime has no GPU here: calibrating on the CPU")
    else:
        log("device: CPU")
    return ["CPUExecutionProvider"]


def _calibration_model(m, tensors: list[str], *, free_batch: bool):
    c = onnx.ModelProto()
    c.CopyFrom(m)
    types = {vi.name: vi for vi in list(c.graph.value_info) + list(c.graph.input)}
    del c.graph.value_info[:]
    outs = [helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type or 1, None)
            for o in c.graph.output]
    have = {o.name for o in outs}
    for t in tensors:
        if t not in have:
            et = types[t].type.tensor_type.elem_type if t in types else onnx.TensorProto.FLOAT
            outs.append(helper.make_tensor_value_info(t, et or onnx.TensorProto.FLOAT, None))
            have.add(t)
    del c.graph.output[:]
    c.graph.output.extend(outs)
    if free_batch:
        inits = {i.name for i in c.graph.initializer}
        for vi in c.graph.input:
            dims = vi.type.tensor_type.shape.dim
            if vi.name not in inits and dims:
                dims[0].ClearField("dim_value")
                dims[0].dim_param = "N"
    return c


def _fixed_batch(m) -> dict[str, int]:
    inits = {i.name for i in m.graph.initializer}
    out = {}
    for vi in m.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name not in inits and dims and dims[0].HasField("dim_value"):
            out[vi.name] = dims[0].dim_value
    return out


class _Runner:
    """Run calibration batches; fall back from a free batch to the model's fixed one."""

    def __init__(self, m, tensors, providers, log):
        import onnxruntime as ort
        self.m, self.tensors, self.providers, self.log = m, tensors, providers, log
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self._ort, self._so = ort, so
        self.fixed = _fixed_batch(m)
        self.sess = self._session(free_batch=True)
        self.split = False

    def _session(self, free_batch):
        c = _calibration_model(self.m, self.tensors, free_batch=free_batch)
        try:
            return self._ort.InferenceSession(c.SerializeToString(), self._so,
                                              providers=self.providers)
        except Exception as e:  # noqa: BLE001
            raise DoptError(f"ONNX Runtime cannot load the model ({e.__class__.__name__}: "
                            f"{str(e).splitlines()[0][:300]})",
                            hint="check the model with onnx.checker and --input_shape") from None

    def _run(self, feed):
        outs = self.sess.run(self.tensors, feed)
        return dict(zip(self.tensors, outs))

    def __call__(self, feed: dict) -> dict:
        n = len(next(iter(feed.values())))
        if not self.split:
            try:
                return self._run(feed)
            except Exception as e:  # noqa: BLE001
                if not self.fixed or all(v == n for v in self.fixed.values()):
                    raise DoptError(f"ONNX Runtime failed on a calibration batch "
                                    f"({e.__class__.__name__}: {str(e).splitlines()[0][:300]})",
                                    hint="check that the calibration data match --input_shape")\
                        from None
                self.log("the model fixes its batch size: calibrating in batches of "
                         f"{min(self.fixed.values())}")
                self.sess = self._session(free_batch=False)
                self.split = True
        b = min(self.fixed.values())
        parts = [self._run({k: v[i:i + b] for k, v in feed.items()}) for i in range(0, n, b)]
        return {t: np.concatenate([p[t] for p in parts]) for t in self.tensors}


def _keep_free_batch(q, original) -> None:
    """``--input_shape`` fixes n for calibration; a batch the user's model left free stays
    free in the quantized model (shapes inferred for batch n are dropped with it)."""
    free = {}
    for vi in original.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            free[vi.name] = dims[0].dim_param or "batch"
    if not free:
        return
    for vi in q.graph.input:
        if vi.name in free:
            d = vi.type.tensor_type.shape.dim[0]
            d.ClearField("dim_value")
            d.dim_param = free[vi.name]
    del q.graph.value_info[:]
    for o in q.graph.output:
        if o.type.tensor_type.HasField("shape"):
            o.type.tensor_type.ClearField("shape")


def _sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - got) ** 2))
    sig = float(np.sum(ref.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(max(sig, 1e-30) / noise)


def quantize_model(model, feeds: Callable[[], Iterator[dict]], *, algorithm: str = "auto",
                   exclude=(), equalization: bool | None = None,
                   bias_correction: bool | None = None, npu_placement: bool = True,
                   input_shapes=None, out_nodes=None, use_gpu: bool = False,
                   device_idx: int = 0, num_samples: int | None = None,
                   progress: bool = True, log=print, file=None, config_file=None,
                   model_file_name: str = "model_quant.onnx") -> PtqResult:
    """Calibrate ``model`` (ModelProto or path) on ``feeds()``; return QDQ model and params."""
    from dopt.ptq import DEFAULT_BIAS_CORRECTION, DEFAULT_EQUALIZATION
    t0 = time.perf_counter()
    if not isinstance(model, onnx.ModelProto):
        file = file or str(model)
        model = onnx_qdq.load_model(model, purpose="Quantizing ONNX models")
    algorithm = resolve_algorithm(algorithm, file=config_file)
    equalization = DEFAULT_EQUALIZATION if equalization is None else equalization
    bias_correction = DEFAULT_BIAS_CORRECTION if bias_correction is None else bias_correction
    m = prepare_model(model, input_shapes=input_shapes, out_nodes=out_nodes, file=file)
    layers = find_layers(m)
    if not layers:
        raise DoptError("the model has no quantizable layer", file=file,
                        expected="Conv, Gemm or MatMul nodes with constant weights")
    quantized, floats = select_layers(layers, exclude, npu_placement=npu_placement,
                                      file=config_file)
    for name, why in floats.items():
        log(f"float: {name} ({why})")
    if not quantized:
        raise DoptError("no layer is left to quantize", file=config_file, field="exclude_op",
                        hint="exclude fewer layers")
    notes = []
    if equalization and equalize(m, layers, log):
        notes.append("cross-layer equalization")
    tensors = list(dict.fromkeys(layers[n].node.input[0] for n in quantized))
    axes = {layers[n].node.input[0]: layers[n].in_axis for n in quantized} \
        if bias_correction else None
    runner = _Runner(m, tensors, _providers(use_gpu, device_idx, log), log)
    log(f"calibrating {len(quantized)} layer(s) with '{algorithm}'")
    stats = calibrate(runner, feeds(), tensors=tensors, algorithm=algorithm, channel_axes=axes,
                      total=num_samples, progress=progress, log=log)
    if stats.interrupted:
        notes.append(f"interrupted after {stats.samples} samples")
    if stats.empty:
        raise DoptError(f"no finite value reached tensor(s) {', '.join(stats.empty[:5])}",
                        file=file, hint="check the calibration data (NaN/inf?)")
    if bias_correction and correct_biases(m, layers, quantized, stats, log):
        notes.append("bias correction")
    params = _params(m, layers, quantized, stats, algorithm, model_file_name, config_file)
    qdq = onnx_qdq.build_qdq(m, params)
    _keep_free_batch(qdq, model)
    return PtqResult(qdq, m, params, quantized, floats, stats, time.perf_counter() - t0, notes)


def _params(m, layers, quantized, stats, algorithm, model_file_name, config_file) -> dict:
    producer = {"name": "dopt", "version": dopt.__version__, "framework": "onnx",
                "onnx": onnx.__version__, "tool": "dopt_so"}
    if config_file:
        producer["config"] = Path(config_file).name
    doc = P.new_params(producer, model_file_name)
    for name in quantized:
        n = layers[name].node
        lo, hi = stats.ranges[n.input[0]]
        scale, offset = nm.activation_qparams(lo, hi)
        s_w = nm.weight_scales(layers[name].weight, 0)
        doc["layers"][name] = {
            "op_type": n.op_type, "strategy": "Quant_INT8-8", "source_layer": name,
            "input": {"tensor": n.input[0], "bits": 8, "scale": float(scale),
                      "offset": int(offset), "range": [float(lo), float(hi)],
                      "algorithm": algorithm},
            "weight": {"tensor": n.input[1], "bits": 8, "per_channel": True,
                       "symmetric": True, "scales": [float(s) for s in s_w]},
            "bias": ({"tensor": n.input[2], "bits": 32}
                     if len(n.input) > 2 and n.input[2] else None),
            "folded_bn": None}
    graph = onnx_qdq.graph_layers(m)
    doc["float_layers"] = sorted(set(graph) - set(doc["layers"]))
    P.validate_params(doc, graph=graph, expected_layers=quantized)
    return doc


def check_against_float(result: PtqResult, feed: dict, log) -> float:
    """SQNR (dB) of the QDQ model's first output against the float model on one batch."""
    ref = onnx_qdq.ort_session(result.float_model.SerializeToString(), optimize=True)
    got = onnx_qdq.ort_session(result.model.SerializeToString(), optimize=False)
    names = [i.name for i in ref.get_inputs()]
    fd = {k: v for k, v in feed.items() if k in names}
    n = len(next(iter(fd.values())))
    step = min(_fixed_batch(result.float_model).values(), default=n)
    a = np.concatenate([ref.run(None, {k: v[i:i + step] for k, v in fd.items()})[0]
                        for i in range(0, n, step)])
    b = np.concatenate([got.run(None, {k: v[i:i + step] for k, v in fd.items()})[0]
                        for i in range(0, n, step)])
    if not np.all(np.isfinite(b)):
        raise DoptError("the quantized model produces non-finite outputs",
                        hint="report this as a bug in dopt with the model")
    db = _sqnr_db(a, b)
    log(f"check: quantized vs float output SQNR {db:.1f} dB on {len(next(iter(fd.values())))} "
        f"calibration sample(s)")
    return db


def _first_samples(feeds, n: int) -> dict:
    """Up to ``n`` samples from the start of the calibration set, as one feed."""
    parts: list[dict] = []
    got = 0
    for feed in feeds:
        parts.append(feed)
        got += len(next(iter(feed.values())))
        if got >= n:
            break
    return {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]} if parts else {}


def write_outputs(result: PtqResult, output, param_file) -> dict:
    with atomic_paths(output, param_file) as (tmp_model, tmp_params):
        onnx.save(result.model, str(tmp_model))
        P.write_params(tmp_params, result.params)
    return {"model": str(output), "param_file": str(param_file)}


def quantize_onnx(model, feeds, *, output=None, param_file=None, algorithm="auto", exclude=(),
                  equalization=None, bias_correction=None, npu_placement=True,
                  input_shapes=None, out_nodes=None, progress=False, log=None) -> PtqResult:
    """Python API: quantize and (when ``output``/``param_file`` are given) write both."""
    log = log or (lambda s: None)
    name = os.path.basename(str(output)) if output else "model_quant.onnx"
    r = quantize_model(model, feeds, algorithm=algorithm, exclude=exclude,
                       equalization=equalization, bias_correction=bias_correction,
                       npu_placement=npu_placement, input_shapes=input_shapes,
                       out_nodes=out_nodes, progress=progress, log=log, model_file_name=name)
    if output or param_file:
        if not (output and param_file):
            raise DoptError("give both output and param_file, or neither")
        write_outputs(r, output, param_file)
    return r


def quantize_job(job) -> dict:
    """``dopt_so --framework 5 --model x.onnx``."""
    r = quantize_model(job.model, job.feeds, algorithm=job.algorithm, exclude=job.exclude,
                       equalization=job.equalization, bias_correction=job.bias_correction,
                       npu_placement=job.npu_placement, input_shapes=job.input_shapes,
                       out_nodes=job.out_nodes, use_gpu=job.use_gpu, device_idx=job.device_idx,
                       num_samples=job.num_samples, progress=job.progress, log=job.log,
                       file=job.model, config_file=job.config_file,
                       model_file_name=os.path.basename(job.output))
    check = _first_samples(job.feeds(), CHECK_SAMPLES)
    if check:
        check_against_float(r, check, job.log)
    job.log(f"{len(r.quantized)} layer(s) INT8, {len(r.float_layers)} float; "
            f"{r.stats.samples} calibration sample(s); {r.seconds:.1f} s")
    return write_outputs(r, job.output, job.compress_conf)
