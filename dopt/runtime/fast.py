"""The fast engine: the whole compiled graph lowered to one ONNX Runtime graph.

NPU numerics are reproduced with standard ONNX ops: every FP16 kernel's float
output passes through ``Cast(float16) -> Cast(float)`` (round to nearest even),
except where ``_plan_rounding`` proves the cast a no-op or moves it past a clamp.
An INT8 layer takes the first of three lowerings that applies, all integer-exact:

* whole: ``q - o`` as float32 (``QuantizeLinear`` + ``DequantizeLinear``) into a
  float32 Conv/MatMul, when every partial sum stays below 2**24 (``exact_in_float``);
* chunked: the same on input-channel chunks, chunk results added in int32
  (``exact_chunks``);
* integer: ``QuantizeLinear`` to uint8 with zero point ``o + 128`` into
  ``ConvInteger`` / ``MatMulInteger`` (padding with the zero point = real 0).

``Dequantize`` is ``float32(acc) * (s_d * s_w)`` then the FP16 rounding. CPU kernels
run as they are, FP32.
"""
from __future__ import annotations

import numpy as np

from ..errors import DoptError
from ..quant import numerics as nm

FLOAT_DTYPES = ("float16", "float32", "float64")
IR_VERSION = 8
# ONNX Runtime fusions that change a value the NPU's numerics fix: folding an INT8
# layer's dequantization multiply into the convolution's weights (or a MatMul's alpha)
# rounds differently from the NPU's float32(acc) * scale.
INEXACT_FUSIONS = ["ConvMulFusion", "MatMulScaleFusion"]


def _options(threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return so


def session(model, threads: int = 0, *, blocked: bool = False):
    """An optimizing CPU session for ``model``, without ``INEXACT_FUSIONS``.

    ``blocked``: keep ONNX Runtime's blocked layout across the FP16 rounding casts
    (``dopt.runtime.blocked``); the graph is then optimized once, rewritten, and loaded
    as it is.
    """
    import onnxruntime as ort
    data = model.SerializeToString()
    if blocked:
        from .blocked import keep_blocked, optimized_model, shapes_of
        try:
            opt = optimized_model(data, _options(threads), INEXACT_FUSIONS)
            if keep_blocked(opt, shapes_of(model)):
                so = _options(threads)
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                return ort.InferenceSession(opt.SerializeToString(), so,
                                            providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - a speed-up only: the plain session below is exact
            pass
    return ort.InferenceSession(data, _options(threads), providers=["CPUExecutionProvider"],
                                disabled_optimizers=INEXACT_FUSIONS)


def onnx_attrs(k: dict, tensors: dict) -> dict:
    from onnx import numpy_helper
    out = {}
    for name, a in k["attrs"].items():
        if name == "input_offset":
            continue
        v = a["value"]
        if a["kind"] == "tensor":
            v = numpy_helper.from_array(tensors[v])
        out[name] = v
    return out


def _elem(dtype: str) -> int:
    from onnx import helper
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _opsets(opset: int, kernels) -> list:
    from onnx import helper
    doms = {k.get("domain") or "" for k in kernels} - {""}
    return [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in sorted(doms)]


def node_model(k: dict, ins: list, opset: int, tensors: dict | None = None):
    """A one-node model whose inputs are ``in0, in1, ...`` (for the reference engine)."""
    from onnx import helper
    names = [f"in{i}" if v is not None else "" for i, v in enumerate(ins)]
    node = helper.make_node(k["onnx_op"], names, [f"out{i}" for i in range(len(k["outputs"]))],
                            domain=k.get("domain") or "", **onnx_attrs(k, tensors or {}))
    g = helper.make_graph([node], k["name"],
                          [helper.make_tensor_value_info(n, _elem(str(v.dtype)), v.shape)
                           for n, v in zip(names, ins) if v is not None],
                          [helper.make_tensor_value_info(f"out{i}", _elem(dt), None)
                           for i, dt in enumerate(k["out_dtypes"])])
    return helper.make_model(g, opset_imports=_opsets(opset, [k]), ir_version=IR_VERSION)


def npu_boundary_inputs(kernels, graph_inputs, tensors) -> set:
    """Float activations that enter an NPU kernel from outside the NPU (rounded to FP16)."""
    dtype = {i["name"]: i["dtype"] for i in graph_inputs}
    on_npu = set()
    for k in kernels:
        for t, dt in zip(k["outputs"], k["out_dtypes"]):
            dtype[t] = dt
            if k["device"] == "npu":
                on_npu.add(t)
    out = set()
    for k in kernels:
        if k["device"] != "npu":
            continue
        for t in k["inputs"]:
            if t and t not in tensors and t not in on_npu and dtype.get(t) in FLOAT_DTYPES:
                out.add(t)
    return out


FLOAT_EXACT_BOUND = 1 << 24  # integers below this add exactly in float32, in any order


def input_range(k: dict) -> tuple[int, int]:
    """The values ``q - o`` an INT8 layer's integer op reads: q in [-128, 127] (the widest
    range, |q - o| <= 255, when the kernel names no offset)."""
    off = (k["attrs"].get("input_offset") or {}).get("value")
    if off is None:
        return -255, 255
    return -128 - int(off), 127 - int(off)


def _partial_bounds(wq: np.ndarray, x_range) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel and input column: the largest positive and negative share of
    ``w * x`` for ``x`` in ``x_range`` (a partial sum, in any order, of any subset of
    the products lies between minus the summed negative and the summed positive shares)."""
    lo, hi = x_range
    w = wq.astype(np.int64).reshape(wq.shape[0], wq.shape[1] if wq.ndim > 1 else 1, -1)
    a, b = w * lo, w * hi
    return (np.maximum(0, np.maximum(a, b)).sum(axis=2),
            -np.minimum(0, np.minimum(a, b)).sum(axis=2))


def acc_bound(wq: np.ndarray, x_range=(-255, 255)) -> np.ndarray:
    """Per output channel, the largest |partial sum| of the integer op without bias."""
    up, down = _partial_bounds(wq, x_range)
    return np.maximum(up.sum(axis=1), down.sum(axis=1))


def split_bias(bq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``bq = lo + hi`` with ``hi`` exactly a float32 and ``|lo| <= 64`` (int32 input).

    ``y + hi`` in float32, with ``y`` the exact integer sum of the products and ``lo``,
    is one correctly rounded addition of the exact accumulator: ``float32(acc)``, the
    value the NPU's Dequantize starts from, even when ``acc`` passes 2**24.
    """
    b = np.asarray(bq).astype(np.int64).reshape(-1)
    hi = b.astype(np.float32).astype(np.int64)
    return b - hi, hi


def exact_in_float(wq: np.ndarray, bq: np.ndarray | None, x_range=(-255, 255)) -> bool:
    """True when a float32 op on ``q - o`` (in ``x_range``) with ``wq`` is provably
    integer-exact: every partial sum, bias included, is an integer below 2**24, exactly
    representable whatever the summation order of the BLAS."""
    bound = acc_bound(wq, x_range)
    if bq is not None:
        bound = bound + np.abs(bq.astype(np.int64).reshape(-1))
    return bool(bound.max(initial=0) < FLOAT_EXACT_BOUND)


def exact_with_split_bias(wq, bq, x_range=(-255, 255)) -> bool:
    """True when only the bias stops ``exact_in_float``: with the small part of the bias
    in the op (``split_bias``) the op is exact, and the large part is added after it."""
    return bq is not None and exact_in_float(wq, split_bias(bq)[0], x_range)


MAX_CHUNKS = 8


def exact_chunks(wq: np.ndarray, x_range=(-255, 255)) -> list[int] | None:
    """Input-channel chunks small enough for an integer-exact float32 op each.

    For a weight too large for ``exact_in_float`` as a whole: contiguous chunks of input
    channels, each with worst-case partial sums below 2**24 for every output channel.
    The chunk results are then added in int32. ``None`` when more than ``MAX_CHUNKS``
    would be needed (the integer ONNX ops are used instead).
    """
    up, down = _partial_bounds(wq, x_range)
    sizes, n = [], 0
    acc_up, acc_down = np.zeros(wq.shape[0], np.int64), np.zeros(wq.shape[0], np.int64)
    for c in range(up.shape[1]):
        if max(up[:, c].max(), down[:, c].max()) >= FLOAT_EXACT_BOUND:
            return None
        if n and max((acc_up + up[:, c]).max(), (acc_down + down[:, c]).max()) \
                >= FLOAT_EXACT_BOUND:
            sizes.append(n)
            acc_up, acc_down, n = np.zeros_like(acc_up), np.zeros_like(acc_down), 0
        acc_up += up[:, c]
        acc_down += down[:, c]
        n += 1
    sizes.append(n)
    return sizes if len(sizes) <= MAX_CHUNKS else None


def layer_of(k: dict) -> str:
    """The quantized layer a Quantize / integer op / Dequantize kernel belongs to."""
    for suffix in ("/quantize", "/dequantize"):
        if k["op"] in ("Quantize", "Dequantize") and k["name"].endswith(suffix):
            return k["name"][: -len(suffix)]
    return k["name"]


# Ops whose output elements are input elements (or constants): FP16 inputs give FP16 outputs.
VALUE_PRESERVING = {"Relu", "MaxPool", "GlobalMaxPool", "Reshape", "Flatten", "Squeeze",
                    "Unsqueeze", "Transpose", "Concat", "Split", "Identity", "Dropout", "Clip",
                    "Slice", "Gather", "DepthToSpace", "SpaceToDepth", "Tile", "Expand"}
# Monotone maps with FP16-representable fixed points commute with FP16 rounding.
MONOTONE_CLAMPS = {"Relu", "Clip"}


def _fp16_exact(v) -> bool:
    a = np.asarray(v, np.float32)
    return bool(np.all(a.astype(np.float16).astype(np.float32) == a) | np.all(np.isinf(a)))


class _GraphBuilder:
    def __init__(self, om, npu: bool):
        from onnx import helper, numpy_helper, TensorProto
        self.h, self.nh, self.TP = helper, numpy_helper, TensorProto
        self.om, self.npu = om, npu
        self.nodes, self.inits, self.done_inits = [], [], set()
        self.no_round: set[str] = set()

    def const(self, name: str, arr=None) -> str:
        if name not in self.done_inits:
            a = self.om.tensors[name] if arr is None else arr
            if a.dtype == np.float16:
                a = a.astype(np.float32)
            self.inits.append(self.nh.from_array(np.asarray(a, order="C"), name))
            self.done_inits.add(name)
        return name

    def node(self, op, ins, outs, **attrs):
        self.nodes.append(self.h.make_node(op, ins, outs, **attrs))

    def _plan_rounding(self, kernels, boundary) -> set:
        """Float outputs whose FP16 rounding is provably a no-op or can move one op later.

        (a) a value-preserving op on FP16 values yields FP16 values; (b) a float op whose
        only reader is ReLU/Clip (FP16-representable bounds) is rounded after the clamp
        instead: fp16(clamp(y)) == clamp(fp16(y)). Bit-identical to rounding every op; it
        removes casts and lets ONNX Runtime fuse Conv + activation.
        """
        t = self.om.tensors
        readers: dict[str, list] = {}
        for k in kernels:
            for x in k["inputs"]:
                readers.setdefault(x, []).append(k)
        outs = {o["name"] for o in self.om.graph["outputs"]}
        half = set(boundary)
        skip = set()

        def clamp_ok(k):
            if k["device"] != "npu" or k["onnx_op"] not in MONOTONE_CLAMPS:
                return False
            return all(x in t and _fp16_exact(t[x]) for x in k["inputs"][1:] if x)

        for k in kernels:
            if k["device"] != "npu":
                continue
            floats = [(o, dt) for o, dt in zip(k["outputs"], k["out_dtypes"])
                      if dt in FLOAT_DTYPES and o]
            if not floats:
                continue
            acts = [x for x in k["inputs"] if x and x not in t]
            consts_half = all(t[x].dtype == np.float16 or t[x].dtype.kind != "f"
                              for x in k["inputs"] if x in t)
            if (k["onnx_op"] in VALUE_PRESERVING and (k["onnx_op"] != "Clip" or clamp_ok(k))
                    and acts and all(x in half for x in acts) and consts_half):
                skip.update(o for o, _ in floats)
                half.update(o for o, _ in floats)
                continue
            if len(floats) == 1:
                o = floats[0][0]
                rd = readers.get(o, [])
                if o not in outs and len(rd) == 1 and clamp_ok(rd[0]) \
                        and rd[0]["inputs"][0] == o:
                    skip.add(o)
                    continue
            half.update(o for o, _ in floats)
        return skip

    def round16(self, src: str, dst: str):
        self.node("Cast", [src], [dst + "/f16"], to=self.TP.FLOAT16)
        self.node("Cast", [dst + "/f16"], [dst], to=self.TP.FLOAT)

    def build(self, debug: bool = False):
        g = self.om.graph
        kernels = g["kernels"]
        boundary = npu_boundary_inputs(kernels, g["inputs"], self.om.tensors) if self.npu \
            else set()
        self.no_round = self._plan_rounding(kernels, boundary) if self.npu and not debug \
            else set()
        t = self.om.tensors
        int8_ops = [k for k in kernels if (k["op"] or "").startswith("Quantized")]

        def bias(k):
            return t[k["inputs"][2]] if len(k["inputs"]) > 2 else None
        self.float_int = {k["name"] for k in int8_ops
                          if exact_in_float(t[k["inputs"][1]], bias(k), input_range(k))}
        # exact as one float32 op once the bias's large part is added after it
        self.split = {k["name"] for k in int8_ops if k["name"] not in self.float_int
                      and exact_with_split_bias(t[k["inputs"][1]], bias(k), input_range(k))}
        self.float_int |= self.split
        self.chunks = {}
        for k in int8_ops:
            if (k["op"] in ("QuantizedConvolution", "QuantizedFullyConnection")
                    and k["name"] not in self.float_int
                    and int((k["attrs"].get("group") or {}).get("value", 1)) == 1):
                sizes = exact_chunks(t[k["inputs"][1]], input_range(k))
                if sizes:
                    self.chunks[k["name"]] = sizes
        self.float_q = self.float_int | set(self.chunks)
        self.conv_weight = {k["name"]: t[k["inputs"][1]] for k in kernels if k["op"] in
                            ("QuantizedConvolution", "QuantizedConvolutionDepthwise")}
        for t in sorted(boundary):
            self.round16(t, t + "/to_npu")
        for k in kernels:
            ins = []
            # these handlers register the constant form they use themselves
            lazy = (k["op"] or "").startswith("Quantized") or k["onnx_op"] == "FullyConnection"
            for t in k["inputs"]:
                if t in self.om.tensors:
                    ins.append(t if lazy else self.const(t))
                elif k["device"] == "npu" and t in boundary:
                    ins.append(t + "/to_npu")
                else:
                    ins.append(t)
            getattr(self, f"_k_{k['op']}", self._k_generic)(k, ins)
        h = self.h
        inputs = [h.make_tensor_value_info(i["name"], _elem(i["dtype"]),
                                           ["N"] + [d if d > 0 else None for d in i["shape"][1:]]
                                           if i["shape"] else None) for i in g["inputs"]]
        out_names = [o["name"] for o in g["outputs"]]
        if debug:
            out_names += [t for k in kernels for t in k["outputs"] if t and t not in out_names]
        types = {t: dt for k in kernels for t, dt in zip(k["outputs"], k["out_dtypes"])}
        for k in kernels:  # what the INT8 lowerings carry (see the module docstring)
            if k["op"] == "Quantize":
                types[k["outputs"][0]] = "float32" if layer_of(k) in self.float_q else "uint8"
            elif k["name"] in self.float_int:
                types[k["outputs"][0]] = "float32"
        outputs = [h.make_tensor_value_info(t, _elem(types.get(t, "float32")), None)
                   for t in out_names]
        graph = h.make_graph(self.nodes, "dopt_om", inputs, outputs, self.inits)
        return h.make_model(graph, opset_imports=_opsets(g["opset"], kernels),
                            ir_version=IR_VERSION)

    # -- kernels ---------------------------------------------------------------------
    def _outputs(self, k):
        """Names the op writes, and the FP16 rounding of float outputs on the NPU."""
        raw = []
        for t, dt in zip(k["outputs"], k["out_dtypes"]):
            if t and self.npu and k["device"] == "npu" and dt in FLOAT_DTYPES \
                    and t not in self.no_round:
                raw.append(t + "/f32")
            else:
                raw.append(t)
        return raw

    def _finish(self, k, raw):
        for t, r in zip(k["outputs"], raw):
            if r != t:
                self.round16(r, t)

    def _k_generic(self, k, ins):
        raw = self._outputs(k)
        self.nodes.append(self.h.make_node(k["onnx_op"], ins, raw, name=k["name"],
                                           domain=k.get("domain") or "",
                                           **onnx_attrs(k, self.om.tensors)))
        self._finish(k, raw)

    def _fc(self, k, ins):
        raw = self._outputs(k)
        wt = self.const(k["inputs"][1] + "/T", self.om.tensors[k["inputs"][1]].T)
        self.node("MatMul", [ins[0], wt], [raw[0] + "/mm"], name=k["name"])
        self.node("Add", [raw[0] + "/mm", self.const(ins[2])], [raw[0]])
        self._finish(k, raw)

    _k_FullyConnection = _fc

    def _k_Quantize(self, k, ins):
        if layer_of(k) in self.float_q:
            # q - o as exact float32: QuantizeLinear (int8, zero point o) then
            # DequantizeLinear with scale 1 and the same zero point
            o = k["attrs"]["offset"]["value"]
            s = self.const(k["name"] + "/scale",
                           np.array(k["attrs"]["scale"]["value"], np.float32))
            zp = self.const(k["name"] + "/zp8", np.array(o, np.int8))
            one = self.const(k["name"] + "/one", np.array(1.0, np.float32))
            out = k["outputs"][0]
            self.node("QuantizeLinear", [ins[0], s, zp], [out + "/q"], name=k["name"])
            self.node("DequantizeLinear", [out + "/q", one, zp], [out])
            return
        s = self.const(k["name"] + "/scale", np.array(k["attrs"]["scale"]["value"], np.float32))
        zp = self.const(k["name"] + "/zp",
                        np.array(k["attrs"]["offset"]["value"] + 128, np.uint8))
        self.node("QuantizeLinear", [ins[0], s, zp], [k["outputs"][0]], name=k["name"])

    def _int_op(self, k, ins, op, **attrs):
        """One INT8 layer; ``op`` is ConvInteger (weight as stored) or MatMulInteger
        (weight used transposed, ``(K, C)``)."""
        w = self.om.tensors[k["inputs"][1]]
        if op == "MatMulInteger":
            w = np.ascontiguousarray(w.T)
        wname = k["inputs"][1] + ("/T" if op == "MatMulInteger" else "")
        b = None
        if len(k["inputs"]) > 2:  # int32 bias, broadcast over the output channels
            b = self.om.tensors[k["inputs"][2]]
            if op == "ConvInteger":
                b = b.reshape((1, -1) + (1,) * (w.ndim - 2))
        out = k["outputs"][0]
        if k["name"] in self.float_int:
            self._int_as_float(k, ins[0], w, wname, b, op, out, **attrs)
            return
        if k["name"] in self.chunks:
            acc = self._int_chunked(k, ins[0], w, op, out, **attrs)
        else:
            zp = self.const(k["name"] + "/x_zp",
                            np.array(k["attrs"]["input_offset"]["value"] + 128, np.uint8))
            wzp = self.const(k["name"] + "/w_zp", np.array(0, np.int8))
            acc = out + "/nobias"
            self.node(op, [ins[0], self.const(wname, w), zp, wzp], [acc], name=k["name"],
                      **attrs)
        if b is None:
            self.node("Identity", [acc], [out])
        else:
            self.node("Add", [acc, self.const(k["inputs"][2] + "/bcast", b)], [out])

    def _int_as_float(self, k, x, w, wname, b, op, out, **attrs):
        """Integer op as one float32 op on exact integers (see ``exact_in_float``); for a
        layer in ``split``, the bias's large part is added after it (``split_bias``)."""
        wf = self.const(wname + "/f", w.astype(np.float32))
        bf = hi = None
        if b is not None:
            lo, hi = split_bias(b) if k["name"] in self.split else (b.reshape(-1), None)
            bf = self.const(k["inputs"][2] + "/f", lo.astype(np.float32))
        y = out if hi is None else out + "/lo"
        if op == "ConvInteger":
            self.node("Conv", [x, wf] + ([bf] if bf else []), [y], name=k["name"], **attrs)
        elif bf:
            self.node("MatMul", [x, wf], [y + "/mm"], name=k["name"])
            self.node("Add", [y + "/mm", bf], [y])
        else:
            self.node("MatMul", [x, wf], [y], name=k["name"])
        if hi is None:
            return
        hf = self.const(k["inputs"][2] + "/hi", hi.astype(np.float32))
        # the accumulator saturates at the int32 bounds (numerics.int8_linear); float32
        # rounding is monotone, so clamping float32(acc) to float32(bounds) is the same
        wx = w if op == "ConvInteger" else w.T
        sat = (acc_bound(wx, input_range(k)) + np.abs(b.astype(np.int64).reshape(-1))).max() \
            > nm.INT32_MAX
        z = out + "/unsat" if sat else out
        if op == "ConvInteger":  # y * 1 + hi per channel, a kernel the blocked layout keeps
            self._channel_affine(y, z, k["name"] + "/one_dw", np.ones(w.shape[0], np.float32),
                                 w.ndim, bias=hf)
        else:
            self.node("Add", [y, hf], [z])
        if sat:
            self.node("Clip", [z, self.const("int32/min", np.array(nm.INT32_MIN, np.float32)),
                               self.const("int32/max", np.array(nm.INT32_MAX, np.float32))],
                      [out])

    def _int_chunked(self, k, x, w, op, out, **attrs) -> str:
        """int32 sum of integer-exact float32 ops on input-channel chunks; returns its name."""
        sizes = self.chunks[k["name"]]
        conv = op == "ConvInteger"
        split = self.const(k["name"] + "/chunks", np.array(sizes, np.int64))
        parts = [f"{out}/x{i}" for i in range(len(sizes))]
        self.node("Split", [x, split], parts, axis=1 if conv else -1, name=k["name"])
        acc, start = None, 0
        for i, (part, n) in enumerate(zip(parts, sizes)):
            wi = (w[:, start:start + n] if conv else w[start:start + n]).astype(np.float32)
            start += n
            self.node("Conv" if conv else "MatMul",
                      [part, self.const(f"{k['name']}/w{i}", wi)], [part + "/y"],
                      **(attrs if conv else {}))
            self.node("Cast", [part + "/y"], [part + "/i"], to=self.TP.INT32)
            if acc is not None:
                self.node("Add", [acc, part + "/i"], [part + "/sum"])
            acc = part + "/i" if acc is None else part + "/sum"
        return acc

    def _channel_affine(self, src, dst, const_name, scale, ndim, bias=None, **attrs):
        """``dst = src * scale[c] (+ bias[c])`` as a 1x1 depthwise convolution: one product
        (and one addition) per element, the value of ``Mul`` (and ``Add``), in a kernel ONNX
        Runtime keeps in its blocked layout, so the convolution before it needs no layout
        conversion. ``ndim``: the rank of the layer's weight."""
        c = scale.shape[0]
        wt = self.const(const_name, np.ascontiguousarray(scale, np.float32)
                        .reshape((c, 1) + (1,) * (ndim - 2)))
        self.node("Conv", [src, wt] + ([bias] if bias else []), [dst], group=c,
                  kernel_shape=[1] * (ndim - 2), **attrs)

    def _k_QuantizedConvolution(self, k, ins):
        self._int_op(k, ins, "ConvInteger", **onnx_attrs(k, self.om.tensors))

    _k_QuantizedConvolutionDepthwise = _k_QuantizedConvolution

    def _k_QuantizedFullyConnection(self, k, ins):
        self._int_op(k, ins, "MatMulInteger")

    def _k_Dequantize(self, k, ins):
        out = k["outputs"][0]
        raw = out + "/f32" if self.npu and out not in self.no_round else out
        acc = ins[0]
        if layer_of(k) not in self.float_int:
            acc = out + "/accf"
            self.node("Cast", [ins[0]], [acc], to=self.TP.FLOAT, name=k["name"])
        w = self.conv_weight.get(layer_of(k))
        if w is None:
            self.node("Mul", [acc, ins[1]], [raw], name=k["name"] + "/scale")
        else:
            s = np.broadcast_to(np.asarray(self.om.tensors[k["inputs"][1]], np.float32)
                                .reshape(-1), (w.shape[0],))
            self._channel_affine(acc, raw, k["inputs"][1] + "/dw", s, w.ndim,
                                 name=k["name"] + "/scale")
        if raw != out:
            self.round16(raw, out)


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    import os
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# A slice's largest activation should stay in a core's L2 cache (about 2 MB here); a model
# whose one sample is bigger runs one sample a slice (its per-run cost is then small next to
# the sample's), a small one at most SLICE_MAX samples a slice.
SLICE_CACHE_BYTES = 2 << 20
SLICE_MIN, SLICE_MAX = 1, 16
WHOLE_BATCH = 1 << 30  # a slice size no batch reaches: every batch in one run


def slice_samples(om) -> int:
    """Samples per slice, from the largest activation in the model's own estimate (the
    NPU's FP16/INT8 bytes of one sample; the emulation holds them as float32)."""
    rows = (om.meta.get("estimate") or {}).get("kernels") or []
    biggest = max((int(r.get("activation_bytes") or 0) * (4 if r.get("int8") else 2)
                   for r in rows), default=0)
    if not biggest:
        return SLICE_MAX
    return max(SLICE_MIN, min(SLICE_MAX, SLICE_CACHE_BYTES // biggest))


# a model is cut into slices when this many samples fill the cache (224x224 networks)
CACHE_SLICE_SAMPLES = 2


def slices_pay(om, target: int) -> bool:
    """Whether batches of this model run faster as slices on parallel workers, from
    measurements on four networks (docs/benchmarks.md): with INT8 depthwise layers (their
    large expanded inputs pass through ``DequantizeLinear``, which runs on one thread: the
    other workers recover that), or when a couple of samples already fill the cache (224x224
    networks). Otherwise (ResNet8 INT8 and FP16, MobileNetV2S FP16 at 28x28) one batch on
    all the threads is as fast or faster: ONNX Runtime's own threading works there, and
    every slice adds a run's fixed cost."""
    if any(k["op"] == "QuantizedConvolutionDepthwise" for k in om.graph["kernels"]):
        return True
    return target <= CACHE_SLICE_SAMPLES


def slice_bounds(n: int, target: int, lanes: int) -> list[int]:
    """Bounds of the slices of a batch of ``n``: about ``target`` samples each, a multiple of
    ``lanes`` slices of equal size (within one sample), so that no worker is left running
    a last slice alone (32 samples at 13 a slice on two workers: 16 + 16, not 13 + 13 + 6)."""
    k = min(n, max(1, round(n / (target * lanes))) * lanes)
    return [n * i // k for i in range(k + 1)]


class FastEngine:
    """The compiled graph as ONNX Runtime sessions.

    A batch runs as slices of about ``slice_samples`` samples (``slice_bounds``: equal
    slices, a multiple of the workers), ``lanes`` slices at once, one ONNX Runtime thread
    each, instead of one batch on that many threads. Two reasons, both
    measured (docs/benchmarks.md): the ``DequantizeLinear`` of every INT8 layer's input
    (its exact ``q - o``) runs on one thread whatever the thread count, and small slices
    keep a layer's activations in the core's cache (EfficientNet-Lite0 at 224x224: 23 ms a
    sample in slices of 4 against 34 ms in one batch of 32, one thread). The samples are
    independent inferences: slicing changes no value (``tests/test_runtime_blocked.py``).
    A batch of one slice or less runs on all the threads, in a second session made when
    first needed. A model for which slices do not pay (``slices_pay``) runs every batch
    whole. ``threads``: 0 takes the CPUs the process may run on; ``lanes``: the number of
    workers, when not ``threads`` (given, the batches are sliced whatever the model).
    """

    def __init__(self, om, *, npu: bool = True, debug: bool = False, threads: int = 0,
                 lanes: int | None = None):
        builder = _GraphBuilder(om, npu)
        self.model = builder.build(debug=debug)
        self.float_int = builder.float_int
        self.split = builder.split
        self.float_q = builder.float_q
        self.chunks = builder.chunks
        self.blocked = npu and not debug
        self.lanes = 1 if debug else (lanes or threads or usable_cores())
        self.slice = WHOLE_BATCH if debug else slice_samples(om)  # debug: every tensor out
        if lanes is None and not slices_pay(om, self.slice):
            self.lanes, self.slice = 1, WHOLE_BATCH  # on ``threads``
        self._pool = None
        self._whole = None
        try:
            self.sess = session(self.model, 1 if self.lanes > 1 else threads,
                                blocked=self.blocked)
        except Exception as e:  # noqa: BLE001 - report which model failed, not ORT internals
            import re
            msg = str(e).splitlines()[0]
            node = re.search(r"Node \(([^)]*)\)", msg)
            raise DoptError("the fast engine (ONNX Runtime) does not take this compiled graph"
                            + (f" at node '{node.group(1)}'" if node else "")
                            + f": {msg.split('FAIL :')[-1].strip()[:300]}",
                            field=node.group(1) if node else None,
                            hint="run it with engine='reference' (the kernel-by-kernel "
                                 "interpreter, same numerics, slower)") from None
        self.names = [o.name for o in self.sess.get_outputs()]

    def _whole_session(self):
        """The session that runs one batch on all the threads (small batches)."""
        if self.lanes < 2:
            return self.sess
        if self._whole is None:
            self._whole = session(self.model, self.lanes, blocked=self.blocked)
        return self._whole

    def run(self, feeds: dict) -> dict:
        sizes = {len(v) for v in feeds.values() if np.ndim(v)}
        n = sizes.pop() if len(sizes) == 1 else 1
        if n <= self.slice:
            return self._run(feeds, self._whole_session())
        bounds = slice_bounds(n, self.slice, self.lanes)
        parts = [{name: (v[a:b] if np.ndim(v) else v) for name, v in feeds.items()}
                 for a, b in zip(bounds[:-1], bounds[1:])]
        try:
            if self.lanes > 1:
                if self._pool is None:
                    from concurrent.futures import ThreadPoolExecutor
                    self._pool = ThreadPoolExecutor(self.lanes, thread_name_prefix="dopt-npu")
                outs = list(self._pool.map(self._run, parts))
            else:
                outs = [self._run(p) for p in parts]
        except DoptError:
            outs = None  # a graph that fixed its batch size: the whole batch, as asked
        if outs is None or not all(np.ndim(o[name]) and len(o[name]) == b - a for o, a, b
                                   in zip(outs, bounds[:-1], bounds[1:])
                                   for name in self.names):
            self.slice = n  # or an output that is not one row per sample
            return self._run(feeds, self._whole_session())
        return {name: np.concatenate([o[name] for o in outs]) for name in self.names}

    def _run(self, feeds: dict, sess=None) -> dict:
        try:
            outs = (sess or self.sess).run(None, feeds)
        except Exception as e:  # noqa: BLE001 - a shape the compiled graph fixed, typically
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
            msg = str(e).split("Status Message:")[-1].strip().splitlines()[0][:300]
            raise DoptError(f"the compiled model cannot run these inputs ({shapes}): {msg}",
                            hint="a model compiled from a graph with a fixed batch size runs "
                                 "only that batch: feed it in batches of that size, or compile "
                                 "from a graph whose batch dimension is free") from None
        return dict(zip(self.names, outs))
