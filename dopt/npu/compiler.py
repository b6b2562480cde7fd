"""ONNX (+ parameter file) -> ``.om``: the emulated offline compiler's build step.

Pipeline: ``prepare`` (opset, shapes, out_nodes, constant folding) -> ``lower_onnx``
(IR ops, fusion marks) -> ``precheck`` (the rule registry decides placement and
INT8) -> kernels. A kernel is one executable step of the compiled graph and keeps
the original node name; a quantized layer becomes three kernels
``<name>/quantize`` -> ``<name>`` (integer op, int32 out) -> ``<name>/dequantize``
(FP16 out). Conv + BN/Scale/BiasAdd are folded here, in float32, before the
weights are cast (FP16) or quantized (INT8).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..quant import numerics as nm
from ..formats import param_file as P
from ..errors import DoptError
from ..formats.fileio import existing_file
from .costmodel import estimate, fusion_groups
from .fp16range import measure, measure_drift
from .lower import IRGraph, IRNode, lower_onnx
from .omfile import OmModel
from .precheck import precheck
from .prepare import TARGET_OPSET, initializer_array, prepare, take_weights
from .profile import HardwareProfile
from .rules import CPU, FUSED, Device, concat_split_in_place

_ATTR_KINDS = {1: "float", 2: "int", 3: "str", 4: "tensor", 6: "floats", 7: "ints", 8: "strs"}


def _np_dtype(elem_type: int) -> str:
    from onnx import helper
    return str(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)))


class _Initializers(Mapping):
    """The model's initializers as NumPy arrays, converted when read and not kept: the
    builder casts each weight once (to FP16 or INT8), so holding a float32 copy of every
    weight beside the model would double the compiler's peak memory for nothing."""

    def __init__(self, model, weights: dict | None = None):
        self._protos = {i.name: i for i in model.graph.initializer}
        self._weights = weights

    def __getitem__(self, name: str) -> np.ndarray:
        return initializer_array(self._protos[name], self._weights)

    def __contains__(self, name) -> bool:
        return name in self._protos

    def __iter__(self):
        return iter(self._protos)

    def __len__(self) -> int:
        return len(self._protos)


class _Builder:
    def __init__(self, model, g: IRGraph, report: dict, profile: HardwareProfile,
                 params: dict | None, weight_dtype: str, weights: dict | None = None):
        self.g, self.profile = g, profile
        self.params = params or {}
        self.wdt = np.float16 if weight_dtype == "FP16" else np.float32
        self.outcome = {x["node"]: x for x in report["nodes"]}
        self.inits = _Initializers(model, weights)
        self.onnx_nodes = {n.name: n for n in model.graph.node}
        self.dtypes = {}
        for vi in list(model.graph.value_info) + list(model.graph.input) + \
                list(model.graph.output):
            if vi.type.tensor_type.elem_type:
                self.dtypes[vi.name] = _np_dtype(vi.type.tensor_type.elem_type)
        self.tensors: dict[str, np.ndarray] = {}
        self.kernels: list[dict] = []
        self.device_of: dict[str, str] = {t: "input" for t in g.inputs}

    # -- helpers -----------------------------------------------------------------------
    def _const(self, name: str, device: str) -> str:
        """Register an initializer for a kernel; float weights take the device's dtype.

        A constant read on both devices is stored once per dtype (NPU FP16, CPU FP32).
        """
        a = self.inits[name]
        if a.dtype in (np.float32, np.float64, np.float16):
            a = a.astype(self.wdt if device == Device.NPU else np.float32)
        have = self.tensors.get(name)
        if have is None:
            self.tensors[name] = a
            return name
        if have.dtype == a.dtype:
            return name
        return self._new_tensor(f"{name}.{a.dtype}", a)

    def _new_tensor(self, name: str, arr: np.ndarray) -> str:
        base, k = name, 1
        while name in self.tensors or name in self.inits:
            name, k = f"{base}_{k}", k + 1
        self.tensors[name] = arr
        return name

    def _attrs(self, node) -> dict:
        from onnx import helper, numpy_helper
        out = {}
        for a in node.attribute:
            kind = _ATTR_KINDS.get(a.type)
            if kind is None:
                raise DoptError(f"node '{node.name}' ({node.op_type}) has attribute '{a.name}' of "
                                f"a kind the emulated NPU cannot hold", field=node.name)
            v = helper.get_attribute_value(a)
            if kind == "str":
                v = v.decode("utf-8", "replace")
            elif kind == "strs":
                v = [s.decode("utf-8", "replace") for s in v]
            elif kind == "tensor":
                v = self._new_tensor(f"{node.name}.{a.name}", numpy_helper.to_array(v))
            elif kind in ("floats", "ints"):
                v = list(v)
            out[a.name] = {"kind": kind, "value": v}
        return out

    def _out_dtypes(self, outputs) -> list[str]:
        return [self.dtypes.get(t, "float32") for t in outputs]

    def _emit(self, **k) -> dict:
        k["device"] = Device(k["device"]).value  # the .om holds plain strings
        k.setdefault("fused", [])
        k.setdefault("removed", False)
        k.setdefault("attrs", {})
        self.kernels.append(k)
        for t in k["outputs"]:
            self.device_of[t] = k["device"]
        return k

    # -- per-node ----------------------------------------------------------------------
    def build(self):
        for n in self.g.nodes:
            row = self.outcome[n.name]
            if n.fused_into:
                continue
            if row["outcome"] == CPU:
                self._generic(n, Device.CPU)
            elif n.op in ("Convolution", "ConvolutionDepthwise") and n.attrs.get("weight"):
                self._conv(n, row)
            elif n.op == "FullyConnection" and n.attrs.get("weight") and self._fc_ok(n):
                self._fc(n, row)
            else:
                dev = Device.NPU
                if row["outcome"] == FUSED:  # shape-only: runs where its data lives
                    srcs = [self.device_of.get(t) for t in n.inputs if t and t not in self.inits]
                    dev = Device.CPU if srcs and all(s == Device.CPU for s in srcs) else dev
                self._generic(n, dev, removed=row["outcome"] == FUSED)
        self._mark_in_place()
        return self.kernels, self.tensors

    def _generic(self, n: IRNode, device: str, removed: bool = False):
        node = self.onnx_nodes[n.name]
        attrs = self._attrs(node)
        if (node.op_type == "BatchNormalization" and device == Device.NPU
                and len(node.input) >= 5 and all(x in self.inits for x in node.input[1:5])):
            inputs, attrs = self._bn_scale_shift(n, node, attrs)
        else:
            inputs = [self._const(x, device) if x in self.inits else x for x in node.input]
        self._emit(name=n.name, op=n.op, onnx_op=n.onnx_op, domain=node.domain,
                   device=device, precision="fp32" if device == Device.CPU else "fp16",
                   inputs=inputs, outputs=list(node.output),
                   out_dtypes=self._out_dtypes(node.output), attrs=attrs,
                   removed=removed)

    def _bn_scale_shift(self, n: IRNode, node, attrs: dict):
        """A BatchNormalization the NPU runs on its own holds a scale and a shift folded in
        float32 (``k = gamma / sqrt(var + eps)``, ``shift = beta - mean * k``), not the
        running statistics: a variance of 1e7 is inf in FP16. Written as BN with mean 0,
        variance 1 and epsilon 0, so the kernel computes ``x * k + shift``."""
        k, shift = nm.bn_scale_shift(*(self.inits[x] for x in node.input[1:5]),
                                     attrs.get("epsilon", {}).get("value", 1e-5))
        ins = [node.input[0],
               self._new_tensor(f"{n.name}.scale", k.astype(self.wdt)),
               self._new_tensor(f"{n.name}.shift", shift.astype(self.wdt)),
               self._new_tensor(f"{n.name}.mean", np.zeros_like(k, dtype=self.wdt)),
               self._new_tensor(f"{n.name}.var", np.ones_like(k, dtype=self.wdt))]
        attrs = dict(attrs)
        attrs["epsilon"] = {"kind": "float", "value": 0.0}
        return ins, attrs

    def _fold(self, n: IRNode, w: np.ndarray, b: np.ndarray, axis_len: int):
        """Conv + BN / Scale / BiasAdd in float32: returns (w, b, |k| per channel, fused)."""
        k_all = np.ones(axis_len, np.float32)
        fused = []
        for u in (x for x in self.g.nodes if x.fused_into == n.name):
            if u.onnx_op == "BatchNormalization":
                node = self.onnx_nodes[u.name]
                gamma, beta, mean, var = (self.inits[x].astype(np.float32, copy=False)
                                          for x in u.inputs[1:5])
                k = nm.bn_scale(gamma, var, next((a.f for a in node.attribute
                                                  if a.name == "epsilon"), 1e-5))
                b = ((b - mean) * k + beta).astype(np.float32)
            else:
                c = self.inits[u.attrs["const_inputs"][0]].astype(np.float32, copy=False).reshape(-1)
                c = np.broadcast_to(c, (axis_len,)).astype(np.float32)
                if u.onnx_op == "Mul":
                    k, b = c, (b * c).astype(np.float32)
                elif u.onnx_op == "Add":
                    k, b = np.ones(axis_len, np.float32), (b + c).astype(np.float32)
                else:  # Sub with a constant second input
                    k, b = np.ones(axis_len, np.float32), (b - c).astype(np.float32)
            w = (w * k.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
            k_all = (k_all * np.abs(k)).astype(np.float32)
            fused.append(u.name)
        return w, b, k_all, fused

    def _conv(self, n: IRNode, row: dict):
        node = self.onnx_nodes[n.name]
        attrs = self._attrs(node)
        if attrs.get("auto_pad", {}).get("value", "NOTSET") not in ("NOTSET", "VALID"):
            attrs = self._explicit_pads(n, attrs)
        w = self.inits[node.input[1]].astype(np.float32, copy=False)
        cout = w.shape[0]
        b = (self.inits[node.input[2]].astype(np.float32, copy=False) if len(node.input) > 2 and node.input[2]
             else np.zeros(cout, np.float32))
        w, b, k, fused = self._fold(n, w, b, cout)
        out = n.attrs.get("fused_output", node.output[0])
        common = dict(onnx_op="Conv", domain="", device=Device.NPU, fused=fused)
        if row["int8"]:
            axis = [1, cout, 1, 1][: w.ndim]
            self._int8(n, node.input[0], w, b, k, out, attrs, axis, common)
        else:
            self._float_layer(n, node.input[0], w, b, out, attrs, common)

    def _float_layer(self, n: IRNode, x: str, w, b, out: str, attrs: dict, common: dict):
        """A weighted layer the NPU runs in FP16: folded weights in the build's dtype."""
        wn = self._new_tensor(f"{n.name}.weight", w.astype(self.wdt))
        bn = self._new_tensor(f"{n.name}.bias", b.astype(self.wdt))
        self._emit(name=n.name, op=n.op, precision="fp16", inputs=[x, wn, bn], outputs=[out],
                   out_dtypes=["float32"], attrs=attrs, **common)

    def _explicit_pads(self, n: IRNode, attrs: dict) -> dict:
        shape = self.g.shapes.get(n.inputs[0])
        k = n.attrs["kernel"]
        s = attrs.get("strides", {}).get("value", [1] * len(k))
        d = attrs.get("dilations", {}).get("value", [1] * len(k))
        if not shape or any(x <= 0 for x in shape[2:]):
            raise DoptError(f"node '{n.name}' uses auto_pad with an unknown input size",
                            field=n.name, hint="give --input_shape")
        begin, end = [], []
        for i, size in enumerate(shape[2:]):
            out = -(-size // s[i])
            total = max((out - 1) * s[i] + (k[i] - 1) * d[i] + 1 - size, 0)
            lo = total // 2 if attrs["auto_pad"]["value"] == "SAME_UPPER" else total - total // 2
            begin.append(lo)
            end.append(total - lo)
        attrs = dict(attrs)
        attrs.pop("auto_pad")
        attrs["pads"] = {"kind": "ints", "value": begin + end}
        return attrs

    def _fc_ok(self, n: IRNode) -> bool:
        node = self.onnx_nodes[n.name]
        if node.op_type == "MatMul":
            return self.inits[node.input[1]].ndim == 2
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        c = node.input[2] if len(node.input) > 2 and node.input[2] else None
        return not trans_a and (c is None or (c in self.inits and
                                              self.inits[c].size in (1, n.attrs["cout"])))

    def _fc(self, n: IRNode, row: dict):
        node = self.onnx_nodes[n.name]
        w = self.inits[node.input[1]].astype(np.float32, copy=False)
        get = {a.name: a for a in node.attribute}
        if node.op_type == "Gemm":
            if not (get.get("transB") and get["transB"].i):
                w = w.T
            alpha = np.float32(get["alpha"].f) if "alpha" in get else np.float32(1)
            beta = np.float32(get["beta"].f) if "beta" in get else np.float32(1)
            if alpha != 1:   # w * 1 is w: no full-size copy for the usual Gemm
                w = (w * alpha).astype(np.float32, copy=False)
            c = node.input[2] if len(node.input) > 2 and node.input[2] else None
            b = (np.broadcast_to(self.inits[c].astype(np.float32, copy=False).reshape(-1),
                                 (w.shape[0],)) * beta).astype(np.float32) \
                if c else np.zeros(w.shape[0], np.float32)
        else:
            w = np.ascontiguousarray(w.T)
            b = np.zeros(w.shape[0], np.float32)
        out = node.output[0]
        common = dict(onnx_op="FullyConnection", domain="", device=Device.NPU, fused=[])
        if row["int8"]:
            self._int8(n, node.input[0], w, b, np.ones(w.shape[0], np.float32), out, {},
                       [w.shape[0]], common)
        else:
            self._float_layer(n, node.input[0], w, b, out, {}, common)

    def _int8(self, n, x, w, b, k, out, attrs, scale_shape, common):
        rec = self.params[n.name]
        s_d, o_d = np.float32(rec["input"]["scale"]), int(rec["input"]["offset"])
        s_w = (np.asarray(rec["weight"]["scales"], np.float32) * k).astype(np.float32)
        wq = nm.quantize_weight(w, s_w, axis=0)
        # the graph's bias counts whatever the record says: dropping it would change the layer
        has_bias = rec.get("bias") is not None or bool(common["fused"]) or bool(np.any(b))
        ins = [f"{n.name}/x_q", self._new_tensor(f"{n.name}.weight_q", wq)]
        if has_bias:
            ins.append(self._new_tensor(f"{n.name}.bias_q", nm.quantize_bias(b, s_d, s_w)))
        deq = self._new_tensor(f"{n.name}.deq_scale",
                               nm.bias_scales(s_d, s_w).reshape(scale_shape))
        self._emit(name=f"{n.name}/quantize", op="Quantize", onnx_op="Quantize", domain="",
                   device=Device.NPU, precision="int8", inputs=[x], outputs=[ins[0]],
                   out_dtypes=["int8"],
                   attrs={"scale": {"kind": "float", "value": float(s_d)},
                          "offset": {"kind": "int", "value": o_d}})
        attrs = dict(attrs)
        attrs["input_offset"] = {"kind": "int", "value": o_d}
        self._emit(name=n.name, op=self.profile.int8_form(n.op), precision="int8", inputs=ins,
                   outputs=[f"{n.name}/acc"], out_dtypes=["int32"], attrs=attrs, **common)
        self._emit(name=f"{n.name}/dequantize", op="Dequantize", onnx_op="Dequantize", domain="",
                   device=Device.NPU, precision="int8", inputs=[f"{n.name}/acc", deq],
                   outputs=[out], out_dtypes=["float32"])

    def _mark_in_place(self):
        """Aligned ConcatD/SplitD cost nothing: producers write into the shared buffer."""
        for k in self.kernels:
            if k["op"] in ("ConcatD", "SplitD") and k["device"] == Device.NPU:
                row = self.outcome.get(k["name"], {})
                k["in_place"] = not any(f["rule"] == concat_split_in_place.__name__
                                        for f in row.get("findings", []))


def _partitions(kernels: list[dict]) -> list[dict]:
    parts: list[dict] = []
    for k in kernels:
        if not parts or parts[-1]["device"] != k["device"]:
            parts.append({"id": len(parts), "device": k["device"], "kernels": []})
        parts[-1]["kernels"].append(k["name"])
    return parts


def parse_op_name_map(path: str, profile: HardwareProfile) -> dict:
    """``--op_name_map``: lines ``SourceOp:IrOp`` (the reference's format)."""
    p = existing_file(path, field="--op_name_map", max_bytes=1 << 20, what="op name map file")
    out = {}
    for i, line in enumerate(p.read_text("utf-8", "replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        src, sep, dst = (s.strip() for s in line.partition(":"))
        if not sep or not src or not dst:
            raise DoptError("malformed line in the op name map", file=path, field=f"line {i}",
                            expected="'SourceOp:TargetOp', e.g. DetectionOutput:SSDDetectionOutput",
                            found=repr(line))
        if profile.op(dst) is None:
            raise DoptError(f"the op name map maps {src} to {dst}, which the hardware profile "
                            f"does not have", file=path, field=f"line {i}",
                            hint="see docs/npu_operators.md for the operator names")
        out[src] = dst
    return out


def check_params_against_model(doc: dict, model, file: str) -> None:
    """Both directions: records for absent layers, and quantizable layers left unaccounted."""
    from ..formats.qdq import graph_layers
    layers = graph_layers(model)
    P.validate_params(doc, file=file, graph=layers)
    for node, rec in doc["layers"].items():
        if rec["weight"]["tensor"] != layers[node]["weight"]:
            raise DoptError(f"the record for '{node}' names weight '{rec['weight']['tensor']}', "
                            f"but the model's node uses '{layers[node]['weight']}'", file=file,
                            field=f"layers.{node}.weight.tensor",
                            hint="use the parameter file produced together with this model")
    declared = doc.get("float_layers")
    if declared is not None:
        missing = sorted(set(layers) - set(doc["layers"]) - set(declared))
        if missing:
            raise DoptError(f"the model has layer(s) {', '.join(missing)} that the parameter file "
                            f"neither quantizes nor lists under float_layers", file=file,
                            field="layers",
                            hint="use the parameter file produced together with this model")


def _return_freed_memory() -> None:
    """Give the pages of the freed model back to the system: glibc keeps freed heap memory
    for reuse, and ONNX Runtime, which runs next, allocates its own (a no-op elsewhere)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Handover:
    """A model handed to the compiler with no other reference to it: once its weights are
    taken out (``prepare.take_weights``) the protobuf that held them is freed, and the
    compiler holds the weights once instead of twice (``dopt omg`` on a 100 MB model)."""

    def __init__(self, model):
        self._model = model

    def peek(self):
        """The model, still handed over (for a build that is not the last)."""
        return self._model

    def take(self):
        model, self._model = self._model, None
        return model


def analyze(model, profile: HardwareProfile, *, params: dict | None = None,
            params_file: str | None = None, input_shapes=None, out_nodes=None,
            op_name_map: dict | None = None, source: str | None = None,
            fp16_check: bool = True, samples: dict | None = None, consume: bool = False):
    m, g, report, _ = _analyze(model, profile, params=params, params_file=params_file,
                               input_shapes=input_shapes, out_nodes=out_nodes,
                               op_name_map=op_name_map, source=source, fp16_check=fp16_check,
                               samples=samples, consume=consume, take=False)
    return m, g, report


def _analyze(model, profile: HardwareProfile, *, params, params_file, input_shapes,
             out_nodes, op_name_map, source, fp16_check, samples, consume, take):
    """Prepare, lower and pre-check ``model`` as the compiler sees it: ``(prepared ONNX,
    IR graph, report)``. ``dopt omg --mode 3`` and ``--mode 0`` share it, so the report
    describes the graph that is compiled (constants folded, shape arithmetic gone).
    ``fp16_check``: measure kernel outputs on ``samples`` (or seeded random inputs) for the
    FP16 range rule. ``consume=True``: ``model`` is handed over and prepared in place (no
    copy of the weights); a ``Handover`` is handed over for good. ``take=True`` (the
    compiler): the large weights are taken out into arrays (``prepare.take_weights``),
    returned fourth, and every later stage reads them there; the returned model is then a
    skeleton (names, types and dims of those weights, no data)."""
    if isinstance(model, Handover):
        model, consume = model.take(), True
    changes: dict = {}
    m = prepare(model, input_shapes=input_shapes, out_nodes=out_nodes, file=source,
                consume=consume, changes=changes)
    del model
    if params is not None:
        check_params_against_model(params, m, params_file)
    weights = None
    if take:
        m, weights = take_weights(m)   # the prepared model (and its weights) freed here
        _return_freed_memory()
    layers = set(params["layers"]) if params else set()
    g = lower_onnx(m)
    for n in g.nodes:
        if op_name_map and n.onnx_op in op_name_map:
            n.op = op_name_map[n.onnx_op]
    report = precheck(g, profile, layers)
    if fp16_check:
        cpu = {x["node"] for x in report["nodes"] if x["outcome"] == CPU}
        ranges = measure(m, g, cpu, samples, weights=weights)
        drift = measure_drift(m, g, cpu, samples, weights=weights)
        if ranges or drift:
            report = precheck(g, profile, layers, fp16_ranges=ranges, fp16_drift=drift)
    report["fusions"] = fusion_groups(g, report, profile)
    report["prepared"] = {k: v for k, v in changes.items() if v}
    return m, g, report, weights


def compile_onnx(model, profile: HardwareProfile, *, params: dict | None = None,
                 params_file: str | None = None, input_shapes=None, out_nodes=None,
                 weight_data_type: str = "FP16", op_name_map: dict | None = None,
                 source: str | None = None, aipp: list | None = None,
                 aipp_file: str | None = None, consume: bool = False) -> tuple[OmModel, dict]:
    """Returns the compiled model and the pre-check report it was built from.
    ``aipp``: checked ``aipp_op`` specs (``aipp_config.parse_file``), put first on their
    inputs by ``aipp_graph.insert``. ``consume=True``: ``model`` is handed over (see
    ``analyze``)."""
    m, g, report, weights = _analyze(model, profile, params=params, params_file=params_file,
                                     input_shapes=input_shapes, out_nodes=out_nodes,
                                     op_name_map=op_name_map, source=source, fp16_check=True,
                                     samples=None, consume=consume, take=True)
    del model
    layers = params["layers"] if params else {}
    kernels, tensors = _Builder(m, g, report, profile, layers, weight_data_type,
                                weights).build()
    del weights
    inits = {i.name for i in m.graph.initializer}
    graph = {
        "opset": TARGET_OPSET,
        "inputs": [{"name": i.name, "shape": list(g.shapes.get(i.name, ())),
                    "dtype": _np_dtype(i.type.tensor_type.elem_type)}
                   for i in m.graph.input if i.name not in inits],
        "outputs": [{"name": o.name, "shape": list(g.shapes.get(o.name, ())),
                     "dtype": _np_dtype(o.type.tensor_type.elem_type)
                     if o.type.tensor_type.elem_type else "float32"}
                    for o in m.graph.output],
        "kernels": kernels,
        "partitions": _partitions(kernels),
    }
    meta = {"source": source, "weight_data_type": weight_data_type,
            "summary": report["summary"]}
    meta["estimate"] = estimate(g, report, profile)  # travels inside the .om
    # Scales and offsets live in the kernels and tensors; this records where they came from.
    quant = {"params_file": params_file, "strategy": "Quant_INT8-8",
             "int8_layers": sorted(x["node"] for x in report["nodes"] if x["int8"])} \
        if params else {"int8_layers": []}
    om = OmModel(graph=graph, tensors=tensors, profile=profile.stamp(), quant=quant, meta=meta)
    if aipp:
        from .aipp_graph import insert
        insert(om, aipp, report, profile, file=aipp_file)
    return om, report
