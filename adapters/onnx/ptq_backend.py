"""The ONNX backend of the core PTQ algorithm (``dopt.ptq``), and ``dopt_so`` for ``.onnx``.

The model runs in ONNX Runtime with the input of every quantized node exposed as an
extra output; the core algorithm turns those batches into ranges and corrections. What
is written is the float graph the parameter file is keyed against, with
QuantizeLinear/DequantizeLinear applied (``dopt.formats.qdq.build_qdq``): ONNX Runtime runs
it, and ``dopt omg --compress_conf`` compiles it (it strips the QDQ pairs again).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

import dopt
from dopt.quant import numerics as nm
from dopt.formats import qdq as onnx_qdq
from dopt.formats import param_file as P
from dopt.errors import DoptError
from dopt.formats.fileio import atomic_paths
from dopt.npu import prepare as prep
from dopt.ptq import PtqLayer, PtqOptions, PtqOutcome, run_ptq
from dopt.ptq.backend import QuantPlan

QUANT_OPS = ("Conv", "Gemm", "MatMul")
# activations between two convolutions through which equalization is exact: f(x/s) = f(x)/s
HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu", "Identity")


@dataclass
class Layer:
    node: object
    weight: np.ndarray          # output channels first
    groups: int
    in_axis: int                # channel axis of the node's activation input

    @property
    def name(self) -> str:
        return self.node.name


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
    try:   # on the weight-free skeleton: inference on the whole model holds it three times
        inferred = prep.inferred_skeleton(m, data_prop=True)
    except Exception:  # noqa: BLE001 - types are a convenience; ONNX Runtime infers its own
        return m
    del m.graph.value_info[:]
    m.graph.value_info.extend(inferred.graph.value_info)
    for o, io in zip(m.graph.output, inferred.graph.output):
        o.type.CopyFrom(io.type)
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


def _consumers(m) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in m.graph.node:
        for x in n.input:
            out.setdefault(x, []).append(n)
    return out


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


class OnnxPtqBackend:
    """``dopt.ptq.PtqBackend`` over an ONNX model prepared for calibration."""

    def __init__(self, model, *, input_shapes=None, out_nodes=None, file=None,
                 use_gpu: bool = False, device_idx: int = 0, log=print,
                 model_file_name: str = "model_quant.onnx", config_file=None):
        if not isinstance(model, onnx.ModelProto):
            file = file or str(model)
            model = onnx_qdq.load_model(model, purpose="Quantizing ONNX models")
        self.original = model
        self.m = prepare_model(model, input_shapes=input_shapes, out_nodes=out_nodes, file=file)
        self.untouched = self.m.SerializeToString()   # the float model before CLE / correction
        self._layers = find_layers(self.m)
        self.inits = {i.name: i for i in self.m.graph.initializer}
        self.providers = _providers(use_gpu, device_idx, log)
        self.log, self.file = log, file
        self.model_file_name, self.config_file = model_file_name, config_file
        self.qdq = self.params = None

    def layers(self) -> dict[str, PtqLayer]:
        out = {}
        for name, ly in self._layers.items():
            conv = ly.node.op_type == "Conv"
            out[name] = PtqLayer(name, "conv" if conv else "linear", ly.groups,
                                 ly.weight.shape[1] * ly.groups if conv else ly.weight.shape[1],
                                 ly.node.input[0], ly.in_axis, ly.node.input[1])
        return out

    def weight(self, name: str) -> np.ndarray:
        return self._layers[name].weight

    def equalization_pairs(self) -> list[tuple[str, str]]:
        cons = _consumers(self.m)
        outputs = {o.name for o in self.m.graph.output}
        pairs = []
        for name, ly in self._layers.items():
            n = ly.node
            if n.op_type != "Conv" or len(n.input) > 2 and n.input[2] and \
                    n.input[2] not in self.inits:
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
            if second.op_type == "Conv" and second.name in self._layers and \
                    second.input[0] == x2:
                pairs.append((name, second.name))
        return pairs

    def scale_channels(self, name, *, out_scale=None, in_scale=None) -> None:
        ly = self._layers[name]
        w = ly.weight.astype(np.float64)
        if out_scale is not None:
            w = w * out_scale.reshape((-1,) + (1,) * (w.ndim - 1))
            b = _bias_of(self.inits, ly)
            if b is not None:
                _set_bias(self.m, self.inits, ly, (b * out_scale).astype(np.float32))
        if in_scale is not None:
            c, cpg = w.shape[0], w.shape[1]
            g = w.reshape(ly.groups, c // ly.groups, cpg, -1)
            w = (g * in_scale.reshape(ly.groups, 1, cpg, 1)).reshape(w.shape)
        _set_weight(self.m, self.inits, ly, w.astype(np.float32))

    def add_to_bias(self, name, delta) -> bool:
        ly = self._layers[name]
        if not _can_take_bias(ly):
            return False
        b = _bias_of(self.inits, ly)
        if b is not None and (b.ndim != 1 or b.shape[0] != ly.weight.shape[0]):
            return False  # a broadcast Gemm C we cannot shift per channel
        b = np.zeros(ly.weight.shape[0], np.float32) if b is None else b
        _set_bias(self.m, self.inits, ly, (b.astype(np.float64) + delta).astype(b.dtype))
        return True

    def run_batch(self, inputs):
        return _Runner(self.m, inputs, self.providers, self.log)

    def write(self, plan: QuantPlan) -> dict:
        self.params = _params(self.m, self._layers, plan, self.model_file_name,
                              self.config_file)
        self.qdq = onnx_qdq.build_qdq(self.m, self.params)
        _keep_free_batch(self.qdq, self.original)
        return {}

    def outputs(self, feed: dict, *, quantized: bool) -> list[np.ndarray]:
        model = self.qdq.SerializeToString() if quantized else self.untouched
        sess = onnx_qdq.ort_session(model, optimize=not quantized)
        names = [i.name for i in sess.get_inputs()]
        fd = {k: v for k, v in feed.items() if k in names}
        n = len(next(iter(fd.values())))
        step = min(_fixed_batch(self.m).values(), default=n)
        runs = [sess.run(None, {k: v[i:i + step] for k, v in fd.items()})
                for i in range(0, n, step)]
        return [np.concatenate(parts) for parts in zip(*runs)]


def _params(m, layers, plan: QuantPlan, model_file_name, config_file) -> dict:
    producer = {"name": "dopt", "version": dopt.__version__, "framework": "onnx",
                "onnx": onnx.__version__, "tool": "dopt_so"}
    if config_file:
        producer["config"] = Path(config_file).name
    doc = P.new_params(producer, model_file_name)
    for name in plan.quantized:
        n = layers[name].node
        lo, hi = plan.ranges[name]
        scale, offset = nm.activation_qparams(lo, hi)
        s_w = nm.weight_scales(layers[name].weight, 0)
        doc["layers"][name] = {
            "op_type": n.op_type, "strategy": "Quant_INT8-8", "source_layer": name,
            "input": {"tensor": n.input[0], "bits": 8, "scale": float(scale),
                      "offset": int(offset), "range": [float(lo), float(hi)],
                      "algorithm": plan.algorithm},
            "weight": {"tensor": n.input[1], "bits": 8, "per_channel": True,
                       "symmetric": True, "scales": [float(s) for s in s_w]},
            "bias": ({"tensor": n.input[2], "bits": 32}
                     if len(n.input) > 2 and n.input[2] else None),
            "folded_bn": None}
    graph = onnx_qdq.graph_layers(m)
    doc["float_layers"] = sorted(set(graph) - set(doc["layers"]))
    P.validate_params(doc, graph=graph, expected_layers=plan.quantized)
    return doc


@dataclass
class PtqResult:
    model: object               # the QDQ ModelProto
    float_model: object         # the float graph the parameter file is keyed against
    params: dict
    outcome: PtqOutcome

    @property
    def quantized(self) -> list[str]:
        return self.outcome.plan.quantized

    @property
    def float_layers(self) -> dict[str, str]:
        return self.outcome.plan.float_layers

    @property
    def stats(self):
        return self.outcome.stats


def _quantize(model, feeds, opts: PtqOptions, *, check: bool, **backend_args) -> PtqResult:
    backend = OnnxPtqBackend(model, log=opts.log, config_file=opts.config_file,
                             **backend_args)
    out = run_ptq(backend, feeds, opts, check=check, file=backend.file)
    return PtqResult(backend.qdq, backend.m, backend.params, out)


def write_outputs(result: PtqResult, output, param_file) -> dict:
    with atomic_paths(output, param_file) as (tmp_model, tmp_params):
        onnx.save(result.model, str(tmp_model))
        P.write_params(tmp_params, result.params)
    return {"model": str(output), "param_file": str(param_file)}


def quantize_onnx(model, feeds, *, output=None, param_file=None, input_shapes=None,
                  out_nodes=None, check: bool = False, **options) -> PtqResult:
    """Python API: quantize (``options``: the fields of ``dopt.ptq.PtqOptions``) and, when
    ``output``/``param_file`` are given, write both."""
    if (output is None) != (param_file is None):
        raise DoptError("give both output and param_file, or neither")
    options.setdefault("log", lambda s: None)
    options.setdefault("progress", False)
    for k in ("equalization", "bias_correction"):   # None: the measured default
        if options.get(k) is None:
            options.pop(k, None)
    try:
        opts = PtqOptions(**options)
    except TypeError as e:
        raise DoptError(f"quantize_onnx got an unknown option ({e})",
                        expected="fields of dopt.ptq.PtqOptions: " + ", ".join(
                            PtqOptions.__dataclass_fields__)) from None
    name = os.path.basename(str(output)) if output else "model_quant.onnx"
    r = _quantize(model, feeds, opts, check=check, input_shapes=input_shapes,
                  out_nodes=out_nodes, model_file_name=name)
    if output:
        write_outputs(r, output, param_file)
    return r


def quantize_job(job) -> dict:
    """``dopt_so --framework 5 --model x.onnx``."""
    r = _quantize(job.model, job.feeds, job, check=True, input_shapes=job.input_shapes,
                  out_nodes=job.out_nodes, use_gpu=job.use_gpu, device_idx=job.device_idx,
                  file=job.model, model_file_name=os.path.basename(job.output))
    return write_outputs(r, job.output, job.compress_conf)
