"""The slow, obviously-correct interpreter of a compiled graph (NumPy).

It is the executable form of the NPU numerics: float ops are computed in float64,
rounded to float32 and then to IEEE half (``fp16()``); INT8 ops are integer
arithmetic in int64 checked against the int32 range. The fast engine is tested
against it. Ops without a NumPy implementation here (rare ones) run as a single
ONNX Runtime node in float32, then get the same FP16 rounding; CPU-partition
kernels always run that way, since the CPU path *is* float32 ONNX Runtime.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..quant import numerics as nm
from .fast import FLOAT_DTYPES, node_model, npu_boundary_inputs, session


def fp16(x) -> np.ndarray:
    """Round to IEEE half (nearest even) and carry the value as float32."""
    return np.asarray(x).astype(np.float32).astype(np.float16).astype(np.float32)


def attr(k: dict, name: str, default=None):
    a = k["attrs"].get(name)
    return default if a is None else a["value"]


# -- sliding windows --------------------------------------------------------------------
def _windows(x, kernel, strides, dilations, pads, fill):
    """x: (N, C, *spatial) -> (N, C, *out_spatial, *kernel) view over the padded input."""
    nd = len(kernel)
    begin, end = pads[:nd], pads[nd:]
    x = np.pad(x, [(0, 0), (0, 0)] + list(zip(begin, end)), constant_values=fill)
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    w = sliding_window_view(x, span, axis=tuple(range(2, 2 + nd)))
    sl = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + \
        tuple(slice(None, None, d) for d in dilations)
    return w[sl]


def _conv_geometry(k, w_shape, rank):
    nd = rank - 2
    kernel = attr(k, "kernel_shape", list(w_shape[2:]))
    return (kernel, attr(k, "strides", [1] * nd), attr(k, "dilations", [1] * nd),
            attr(k, "pads", [0] * (2 * nd)), int(attr(k, "group", 1)))


def conv(x, w, k, fill=0):
    """Grouped N-d convolution without bias, exact in the input's dtype (int64 / float64)."""
    kernel, strides, dil, pads, group = _conv_geometry(k, w.shape, x.ndim)
    win = _windows(x, kernel, strides, dil, pads, fill)  # N C O.. K..
    nd = len(kernel)
    sp = "hwd"[:nd]
    ks = "ijk"[:nd]
    cout = w.shape[0]
    cg = x.shape[1] // group
    og = cout // group
    if cg == 1 and og == 1:  # depthwise: one filter per channel
        return np.einsum(f"nc{sp}{ks},c{ks}->nc{sp}", win, w[:, 0], optimize=True)
    outs = [np.einsum(f"nc{sp}{ks},oc{ks}->no{sp}", win[:, g * cg:(g + 1) * cg],
                      w[g * og:(g + 1) * og], optimize=True) for g in range(group)]
    return np.concatenate(outs, axis=1)


def _pool(x, k, kind):
    nd = x.ndim - 2
    kernel = attr(k, "kernel_shape")
    strides = attr(k, "strides", [1] * nd)
    dil = attr(k, "dilations", [1] * nd)
    pads = list(attr(k, "pads", [0] * (2 * nd)))
    if attr(k, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise NotImplementedError("auto_pad pooling")
    if attr(k, "ceil_mode", 0):
        for i in range(nd):
            size = x.shape[2 + i] + pads[i] + pads[nd + i]
            span = (kernel[i] - 1) * dil[i] + 1
            out = -(-(size - span) // strides[i]) + 1
            if (out - 1) * strides[i] >= x.shape[2 + i] + pads[i]:
                out -= 1
            pads[nd + i] += max((out - 1) * strides[i] + span - size, 0)
    axes = tuple(range(-nd, 0))
    if kind == "max":
        return _windows(x, kernel, strides, dil, pads, -np.inf).max(axis=axes)
    win = _windows(x, kernel, strides, dil, pads, 0.0)
    total = win.sum(axis=axes)
    if attr(k, "count_include_pad", 0):
        return total / float(np.prod(kernel))
    ones = np.ones((1, 1) + x.shape[2:], np.float64)
    cnt = _windows(ones, kernel, strides, dil, pads, 0.0).sum(axis=axes)
    return total / cnt


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _axes_input(k, ins, i, attr_name="axes"):
    if len(ins) > i and ins[i] is not None:
        return [int(a) for a in np.asarray(ins[i]).reshape(-1)]
    return attr(k, attr_name)


def _float_op(k, ins):
    """float64 NumPy versions of the common ops; raises NotImplementedError otherwise."""
    op = k["onnx_op"]
    x = ins[0]
    if op == "Conv":
        y = conv(x.astype(np.float64), ins[1].astype(np.float64), k)
        if len(ins) > 2 and ins[2] is not None:
            y = y + ins[2].astype(np.float64).reshape((1, -1) + (1,) * (x.ndim - 2))
        return [y]
    if op == "FullyConnection":
        return [x.astype(np.float64) @ ins[1].astype(np.float64).T + ins[2].astype(np.float64)]
    if op == "Relu":
        return [np.maximum(x, 0)]
    if op == "Clip":
        lo = ins[1] if len(ins) > 1 and ins[1] is not None else -np.inf
        hi = ins[2] if len(ins) > 2 and ins[2] is not None else np.inf
        return [np.clip(x, lo, hi)]
    if op == "Sigmoid":
        return [1.0 / (1.0 + np.exp(-x.astype(np.float64)))]
    if op == "Tanh":
        return [np.tanh(x.astype(np.float64))]
    if op == "LeakyRelu":
        return [np.where(x >= 0, x, x.astype(np.float64) * attr(k, "alpha", 0.01))]
    if op == "HardSigmoid":
        a, b = attr(k, "alpha", 0.2), attr(k, "beta", 0.5)
        return [np.clip(x.astype(np.float64) * a + b, 0, 1)]
    if op == "HardSwish":
        x64 = x.astype(np.float64)
        return [x64 * np.clip(x64 / 6 + 0.5, 0, 1)]
    if op in ("Add", "Sub", "Mul", "Div", "Max", "Min"):
        a = [v.astype(np.float64) for v in ins]
        f = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
             "Max": np.maximum, "Min": np.minimum}[op]
        y = a[0]
        for v in a[1:]:
            y = f(y, v)
        return [y]
    if op in ("MaxPool", "AveragePool"):
        return [_pool(x.astype(np.float64), k, "max" if op == "MaxPool" else "avg")]
    if op == "GlobalAveragePool":
        return [x.astype(np.float64).mean(axis=tuple(range(2, x.ndim)), keepdims=True)]
    if op == "GlobalMaxPool":
        return [x.max(axis=tuple(range(2, x.ndim)), keepdims=True)]
    if op == "Concat":
        return [np.concatenate(ins, axis=attr(k, "axis"))]
    if op == "Split":
        axis = attr(k, "axis", 0)
        sizes = ins[1] if len(ins) > 1 and ins[1] is not None else None
        n = len(k["outputs"])
        if sizes is None:
            step = -(-x.shape[axis] // n)
            sizes = [min(step, x.shape[axis] - i * step) for i in range(n)]
        return np.split(x, np.cumsum(sizes)[:-1], axis=axis)
    if op in ("Reshape",):
        shape = [int(s) for s in ins[1]]
        if not attr(k, "allowzero", 0):
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return [x.reshape(shape)]
    if op == "Flatten":
        ax = attr(k, "axis", 1)
        ax = ax + x.ndim if ax < 0 else ax
        return [x.reshape(int(np.prod(x.shape[:ax])), -1)]
    if op in ("Identity", "Dropout"):
        return [x] + ([np.ones(x.shape, bool)] if len(k["outputs"]) > 1 else [])
    if op == "Squeeze":
        axes = _axes_input(k, ins, 1)
        return [np.squeeze(x, axis=tuple(axes)) if axes else np.squeeze(x)]
    if op == "Unsqueeze":
        y = x
        axes = _axes_input(k, ins, 1)
        rank = x.ndim + len(axes)
        for a in sorted(a + rank if a < 0 else a for a in axes):
            y = np.expand_dims(y, a)
        return [y]
    if op == "Transpose":
        return [np.transpose(x, attr(k, "perm"))]
    if op == "Softmax":
        return [_softmax(x.astype(np.float64), attr(k, "axis", -1))]
    if op == "BatchNormalization":
        sh = (1, -1) + (1,) * (x.ndim - 2)
        s, b, m, v = (t.astype(np.float64).reshape(sh) for t in ins[1:5])
        return [(x - m) / np.sqrt(v + attr(k, "epsilon", 1e-5)) * s + b]
    if op == "ReduceMean":
        axes = _axes_input(k, ins, 1)
        return [x.astype(np.float64).mean(axis=tuple(axes) if axes else None,
                                           keepdims=bool(attr(k, "keepdims", 1)))]
    if op == "Shape":
        return [np.asarray(x.shape, np.int64)]
    raise NotImplementedError(op)


def _ort_node(k: dict, ins: list, opset: int) -> list:
    """One kernel as a single ONNX Runtime node, float32 (the CPU path)."""
    model = node_model(k, ins, opset)
    feeds = {f"in{i}": v for i, v in enumerate(ins) if v is not None}
    return session(model).run(None, feeds)


def run_kernel(k: dict, ins: list, *, opset: int, npu: bool) -> list:
    """Execute one kernel. ``ins`` are the input arrays (constants included)."""
    op = k["op"]
    if op == "Quantize":
        return [nm.quantize_activation(ins[0], attr(k, "scale"), attr(k, "offset"))]
    if op in ("QuantizedConvolution", "QuantizedConvolutionDepthwise",
              "QuantizedFullyConnection"):
        o = attr(k, "input_offset")
        q = ins[0].astype(np.int64) - o
        w = ins[1].astype(np.int64)
        if op == "QuantizedFullyConnection":
            acc = q @ w.T
            bshape = (-1,)
        else:
            acc = conv(q, w, k, fill=0)
            bshape = (1, -1) + (1,) * (q.ndim - 2)
        if len(ins) > 2:
            acc = acc + ins[2].astype(np.int64).reshape(bshape)
        # the int32 accumulator saturates (numerics.int8_linear)
        return [np.clip(acc, nm.INT32_MIN, nm.INT32_MAX).astype(np.int32)]
    if op == "Dequantize":
        y = ins[0].astype(np.float32) * ins[1].astype(np.float32)
        return [fp16(y) if npu else y.astype(np.float32)]
    if k["device"] == "cpu":
        return [np.asarray(v) for v in _ort_node(k, ins, opset)]
    cast = [v.astype(np.float32) if v is not None and str(v.dtype) in FLOAT_DTYPES else v
            for v in ins]
    try:
        outs = _float_op(k, cast)
    except NotImplementedError:
        outs = _ort_node(k, cast, opset)
    res = []
    for v, dt in zip(outs, k["out_dtypes"]):
        v = np.asarray(v)
        if dt in FLOAT_DTYPES:
            v = v.astype(np.float32)  # float64 -> float32: the op's float32 result
            v = fp16(v) if npu else v
        else:
            v = v.astype(dt)
        res.append(v)
    return res


class ReferenceEngine:
    def __init__(self, om, *, npu: bool = True):
        self.om, self.npu = om, npu
        g = om.graph
        self.boundary = npu_boundary_inputs(g["kernels"], g["inputs"], om.tensors) if npu \
            else set()

    def run(self, feeds: dict, *, keep_all: bool = False) -> dict:
        env = dict(feeds)
        g = self.om.graph
        for k in g["kernels"]:
            ins = []
            for t in k["inputs"]:
                if not t:
                    ins.append(None)
                elif t in self.om.tensors:
                    ins.append(self.om.tensors[t])
                elif k["device"] == "npu" and t in self.boundary:
                    ins.append(fp16(env[t]))
                else:
                    ins.append(env[t])
            outs = run_kernel(k, ins, opset=g["opset"], npu=self.npu)
            env.update((t, v) for t, v in zip(k["outputs"], outs) if t)
        if keep_all:
            return env
        return {o["name"]: env[o["name"]] for o in g["outputs"]}


def first_nonfinite(om, feeds: dict, *, npu: bool = True) -> dict | None:
    """The first kernel (graph order) whose output holds inf/NaN for ``feeds``, or None.

    Runs the reference interpreter kernel by kernel; what it reports is where FP16 (or the
    model) first left the finite range, with the largest finite input magnitude it saw."""
    eng = ReferenceEngine(om, npu=npu)
    env = eng.run(feeds, keep_all=True)
    for k in om.graph["kernels"]:
        for t in k["outputs"]:
            v = env.get(t)
            if isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.floating) \
                    and not np.all(np.isfinite(v)):
                ins = [env[x] for x in k["inputs"] if x in env and x not in om.tensors
                       and isinstance(env[x], np.ndarray)
                       and np.issubdtype(env[x].dtype, np.floating)]
                amax = max((float(np.abs(x[np.isfinite(x)]).max(initial=0)) for x in ins),
                           default=0.0)
                return {"kernel": k["name"], "op": k["op"], "tensor": t,
                        "nonfinite": int(np.size(v) - np.isfinite(v).sum()),
                        "max_abs_input": amax}
    return None
