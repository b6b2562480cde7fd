"""FP16 range analysis: which NPU kernels' outputs leave what IEEE half can hold.

The NPU computes FP16 kernels in FP16, so a value beyond 65504 becomes inf (then NaN),
and a layer whose values all sit below the smallest normal half (6.1e-5) loses its signal
- on the phone exactly as on the emulated NPU. Before deployment, the prepared float graph
runs once in float32 (ONNX Runtime) on sample inputs: the calibration data where the caller
has some, otherwise seeded random data shaped like each input. Every kernel's output
(after the nodes fused into it) is measured; the ``fp16_range`` placement rule turns the
measurements into findings that name the layer, the range seen and the fix.

An output's range is not the whole story: a division (``Div``, ``Reciprocal``, ``Log``)
whose float32 divisor holds nonzero values below half the smallest subnormal half (3e-8)
divides by zero in FP16. That is how ``x / max(||x||, 1e-12)`` (``F.normalize``, cosine
attention) turns zero rows, e.g. window padding, into NaN: the quotient is finite in
float32 and its range looks healthy, but 1e-12 is 0 in FP16. So the singular input of each
such NPU kernel is measured too, as FP16 will hold it.

Values that fit can still drift: each NPU kernel rounds its output to FP16 (a relative step
of 2^-11), and over a hundred layers the steps add up. ``measure_drift`` runs the graph a
second time beside itself with every NPU kernel's output (and every graph input) rounded to
FP16 and reports how far each kernel output and each network output moves, relative to its
range; the ``fp16_drift`` rule names the kernel where that first passes the tolerance.
"""
from __future__ import annotations

import numpy as np

from ..quant.numerics import FP16_DRIFT_TOLERANCE, FP16_MAX, FP16_MIN_NORMAL
from .lower import IRGraph
from .prepare import initializer_array, skeleton, weights_as_inputs

_FLOAT = (1, 10, 11)   # TensorProto FLOAT, FLOAT16, DOUBLE


def sample_feeds(model, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded N(0, 1) data for every graph input (static shapes, as compiled)."""
    inits = {i.name for i in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in t.shape.dim]
        if t.elem_type in _FLOAT:
            feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
        else:
            feeds[vi.name] = np.zeros(dims, np.int64 if t.elem_type == 7 else np.int32)
    return feeds


# ONNX ops that are finite in float32 but inf/NaN in FP16 when this input rounds to zero
_SINGULAR_AT_ZERO = {"Div": 1, "Reciprocal": 0, "Log": 0}


def kernel_outputs(graph: IRGraph, cpu_nodes: set[str]) -> dict[str, str]:
    """``{kernel (host) node: the tensor it writes}`` for NPU kernels with a float output."""
    out = {}
    for n in graph.nodes:
        if n.fused_into or n.name in cpu_nodes or not n.outputs or n.op is None:
            continue
        out[n.name] = n.attrs.get("fused_output", n.outputs[0])
    return out


def singular_inputs(graph: IRGraph, cpu_nodes: set[str]) -> dict[str, str]:
    """``{kernel: its input that must not be zero}`` for NPU divisions (see the docstring)."""
    out = {}
    for n in graph.nodes:
        i = _SINGULAR_AT_ZERO.get(n.onnx_op)
        if i is None or n.fused_into or n.name in cpu_nodes or n.op is None \
                or len(n.inputs) <= i or not n.inputs[i]:
            continue
        out[n.name] = n.inputs[i]
    return out


def flushed_to_zero(v: np.ndarray) -> tuple[int, float]:
    """How many finite nonzero values FP16 rounds to zero, and the smallest such magnitude."""
    v = np.abs(np.asarray(v, np.float32))
    v = v[np.isfinite(v) & (v > 0)]
    lost = v[v.astype(np.float16) == 0]
    return int(lost.size), (float(lost.min()) if lost.size else 0.0)


def _session(skel):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.enable_mem_pattern = False   # one run: no block planned for every map at once
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return ort.InferenceSession(skel.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(skel, model, feeds: dict, weights: dict | None = None) -> dict | None:
    """Run ``skel`` (a ``prepare.skeleton`` of ``model``, changed for a measurement) with
    ``model``'s weights fed in place: ``{output name: array}``, or None when ONNX Runtime
    refuses the graph (no measurement is no finding, never a failed compile)."""
    try:
        fed = weights_as_inputs(skel, model, weights)
        sess = _session(skel)
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(None, {**feeds, **fed})))
    except Exception:  # noqa: BLE001 - see the docstring
        return None


def _add_statistics(m, tensors: list[str], types: dict) -> dict[str, tuple[str, str, str]]:
    """Graph outputs with each tensor's largest and smallest finite value (non-finite
    values counted as 0, which the statistics include anyway) and its count of inf/NaN:
    ``{tensor: (max output, min output, count output)}``."""
    from onnx import TensorProto, helper
    if not tensors:
        return {}
    zero = "dopt.stats/zero"
    m.graph.initializer.append(helper.make_tensor(zero, TensorProto.FLOAT, [], [0.0]))
    out, added = {}, {}
    for i, t in enumerate(tensors):
        p = f"dopt.stats/{i}/"
        f = t
        new = added.setdefault(t, [])
        if types.get(t, 1) != TensorProto.FLOAT:
            f = p + "f32"
            new.append(helper.make_node("Cast", [t], [f], to=TensorProto.FLOAT))
        nodes = [("IsNaN", [f], "nan", {}), ("IsInf", [f], "inf", {}),
                 ("Or", [p + "nan", p + "inf"], "bad", {}), ("Not", [p + "bad"], "fin", {}),
                 ("Where", [p + "fin", f, zero], "z", {}),
                 ("ReduceMax", [p + "z"], "max", {"keepdims": 0}),
                 ("ReduceMin", [p + "z"], "min", {"keepdims": 0}),
                 ("Cast", [p + "bad"], "bad64", {"to": TensorProto.INT64}),
                 ("ReduceSum", [p + "bad64"], "count", {"keepdims": 0})]
        for op, ins, o, attrs in nodes:
            new.append(helper.make_node(op, ins, [p + o], name=p + o, **attrs))
        for o, typ in (("max", TensorProto.FLOAT), ("min", TensorProto.FLOAT),
                       ("count", TensorProto.INT64)):
            m.graph.output.append(helper.make_tensor_value_info(p + o, typ, []))
        out[t] = (p + "max", p + "min", p + "count")
    # each reduction right after the node that writes its tensor, so that the map can be
    # freed as soon as its own readers have run
    nodes = list(m.graph.node)
    del m.graph.node[:]
    for n in nodes:
        m.graph.node.append(n)
        for t in n.output:
            m.graph.node.extend(added.pop(t, ()))
    for rest in added.values():   # graph inputs
        m.graph.node.extend(rest)
    return out


def measure(model, graph: IRGraph, cpu_nodes: set[str], feeds: dict | None = None,
            weights: dict | None = None) -> dict:
    """``{kernel: {"tensor", "amax", "min", "max", "nonfinite"}}`` from one float32 run;
    divisions add ``"divisor", "flushed", "flushed_min"`` (``flushed_to_zero``).
    ``weights``: the arrays ``prepare.take_weights`` took out of ``model``."""
    from onnx import helper

    wanted = kernel_outputs(graph, cpu_nodes)
    if not wanted:
        return {}
    feeds = feeds or sample_feeds(model)
    divisors = singular_inputs(graph, cpu_nodes)
    consts = {i.name: i for i in model.graph.initializer if i.name in set(divisors.values())}
    m = skeleton(model)   # the weights go to ONNX Runtime as fed arrays, not copies
    have = {o.name for o in m.graph.output}
    types = {vi.name: vi.type.tensor_type.elem_type for vi in m.graph.value_info}
    tensors = [t for t in dict.fromkeys(wanted.values()) if types.get(t, 1) in _FLOAT]
    extra = [t for t in dict.fromkeys(divisors.values())
             if t not in consts and t not in feeds and t not in tensors
             and types.get(t, 1) in _FLOAT]
    # divisors are read whole (flushed_to_zero); every other kernel output only as its
    # statistics, reduced inside the graph, so ONNX Runtime frees each map after its readers
    whole = [t for t in dict.fromkeys(extra + [t for t in divisors.values() if t in tensors])]
    reduced = [t for t in tensors if t not in set(whole)]
    for t in whole:
        if t not in have:
            m.graph.output.append(helper.make_tensor_value_info(t, types.get(t, 1), None))
    stat_names = _add_statistics(m, reduced, types)
    vals = _run(m, model, feeds, weights)
    if vals is None:
        return {}
    stats = {}
    for t in whole:
        v = vals.get(t)
        if v is None or not np.issubdtype(v.dtype, np.floating) or not v.size:
            continue
        finite = v[np.isfinite(v)].astype(np.float64)
        stats[t] = {"amax": float(np.abs(finite).max(initial=0.0)),
                    "min": float(finite.min(initial=0.0)), "max": float(finite.max(initial=0.0)),
                    "nonfinite": int(v.size - finite.size)}
    for t, (hi_name, lo_name, bad_name) in stat_names.items():
        hi, lo = min(float(vals[lo_name]), 0.0), max(float(vals[hi_name]), 0.0)
        stats[t] = {"amax": max(-hi, lo), "min": hi, "max": lo,
                    "nonfinite": int(vals[bad_name])}
    out = {k: dict(stats[t], tensor=t) for k, t in wanted.items() if t in stats}
    for k, t in divisors.items():
        v = initializer_array(consts[t], weights) if t in consts \
            else feeds.get(t, vals.get(t))
        if k not in out or v is None or not np.issubdtype(np.asarray(v).dtype, np.floating):
            continue
        n, smallest = flushed_to_zero(v)
        out[k].update(divisor=t, flushed=n, flushed_min=smallest)
    return out


def problem(info: dict) -> str | None:
    """``"overflow"``, ``"underflow"`` or None for one measured kernel output."""
    if info["nonfinite"] or info["amax"] > FP16_MAX:
        return "overflow"
    if info.get("flushed") or 0.0 < info["amax"] < FP16_MIN_NORMAL:
        return "underflow"
    return None


def detail(info: dict) -> str:
    """What the rule's message adds for a division whose divisor FP16 flushes to zero."""
    if not info.get("flushed"):
        return ""
    return (f"; its input {info['divisor']} holds {info['flushed']} nonzero value(s) as small "
            f"as {info['flushed_min']:.3g}, which FP16 rounds to 0 (its smallest step is 6e-8), "
            f"so the FP16 result is inf/NaN")


# --- drift: the same graph with FP16 kernel outputs, beside the float32 one -----------------

_TWIN = "dopt.h/"
# weights up to this many elements are rounded to FP16 in the drift run (a transient float32
# and FP16 copy of each, right before its reader); the few larger ones (VGG's and AlexNet's
# first fully connected layers) stay float32, one rounding of 2^-12 left out of the estimate
# to keep the compiler's peak memory where it was
DRIFT_ROUNDED_WEIGHT_MAX = 1 << 24


def _has_subgraph(m) -> bool:
    return any(a.type in (5, 10) for n in m.graph.node for a in n.attribute)   # GRAPH(S)


def _add_twin(m, kernel_tensors: set[str], types: dict, cpu_nodes: set[str]
              ) -> dict[str, tuple[str, str]]:
    """Append, node by node, a copy of ``m``'s graph whose produced tensors carry the
    ``dopt.h/`` prefix and which shares the weights. Its float graph inputs, NPU kernel
    outputs and the float weights its NPU nodes read (up to ``DRIFT_ROUNDED_WEIGHT_MAX``
    elements) are rounded to FP16 by a Cast pair right before the reader, so a rounded copy
    lives no longer than its node. After each float kernel output (and each float graph
    output) the largest |float32 - FP16| and |float32| are reduced in the graph, so both maps
    are freed as soon as their readers have run. Returns ``{tensor: (max difference output,
    max |float32| output)}``."""
    from onnx import TensorProto, helper
    produced = {o for n in m.graph.node for o in n.output if o}
    inits = {t.name: t.data_type for t in m.graph.initializer
             if int(np.prod(t.dims, dtype=np.int64)) <= DRIFT_ROUNDED_WEIGHT_MAX}
    every_init = {t.name for t in m.graph.initializer}
    data_inputs = [i.name for i in m.graph.input
                   if i.type.tensor_type.elem_type == TensorProto.FLOAT
                   and i.name not in every_init]
    watched = [t for t in dict.fromkeys(list(kernel_tensors) + [o.name for o in m.graph.output])
               if types.get(t, 1) == TensorProto.FLOAT]
    watched_set = set(watched)
    twin = {}
    nodes: list = []

    def round_to(src: str, dst: str) -> list:
        return [helper.make_node("Cast", [src], [dst + "#h"], to=TensorProto.FLOAT16),
                helper.make_node("Cast", [dst + "#h"], [dst], to=TensorProto.FLOAT)]

    def diff(t: str) -> list:
        p = f"dopt.drift/{len(outs)}/"
        outs[t] = (p + "diff", p + "amax")
        return [helper.make_node("Sub", [t, twin[t]], [p + "d"]),
                helper.make_node("Abs", [p + "d"], [p + "ad"]),
                helper.make_node("ReduceMax", [p + "ad"], [p + "diff"], keepdims=0),
                helper.make_node("Abs", [t], [p + "a"]),
                helper.make_node("ReduceMax", [p + "a"], [p + "amax"], keepdims=0)]

    outs: dict[str, tuple[str, str]] = {}
    for name in data_inputs:
        twin[name] = _TWIN + name
        nodes += round_to(name, twin[name])
    for n in list(m.graph.node):
        nodes.append(n)
        c = type(n)()
        c.CopyFrom(n)
        if c.name:
            c.name = _TWIN + c.name
        weights = []
        for j, t in enumerate(c.input):
            if t in twin:
                c.input[j] = twin[t]
            elif inits.get(t) == TensorProto.FLOAT and n.name not in cpu_nodes:
                c.input[j] = f"{_TWIN}{t}#w{len(nodes)}"
                weights += round_to(t, c.input[j])
        rounding = []
        for j, t in enumerate(c.output):
            if not t or t not in produced:
                continue
            twin[t] = _TWIN + t
            if t in kernel_tensors and types.get(t, 1) == TensorProto.FLOAT:
                c.output[j] = twin[t] + "#32"
                rounding += round_to(c.output[j], twin[t])
            else:
                c.output[j] = twin[t]
        nodes += weights + [c] + rounding
        for t in n.output:
            if t in watched_set and t in twin:
                nodes += diff(t)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    del m.graph.output[:]
    for a, b in outs.values():
        m.graph.output.extend([helper.make_tensor_value_info(a, TensorProto.FLOAT, []),
                               helper.make_tensor_value_info(b, TensorProto.FLOAT, [])])
    return outs


def measure_drift(model, graph: IRGraph, cpu_nodes: set[str], feeds: dict | None = None,
                  tolerance: float = FP16_DRIFT_TOLERANCE, weights: dict | None = None) -> dict:
    """How far FP16 moves the network on sample inputs (see the module docstring):
    ``{"tolerance", "outputs": {graph output: relative drift}, "kernels": {kernel: relative
    drift} (graph order), "first": the kernel where the drift first passes the tolerance
    (else the one that drifts most), or None when every output is within it}``. The relative
    drift of a tensor is max |FP16 - float32| / max |float32| (inf where FP16 gives
    non-finite values). Empty when the graph cannot be measured
    (control flow, or ONNX Runtime refuses it): no measurement is no finding."""
    wanted = kernel_outputs(graph, cpu_nodes)
    if not wanted:
        return {}
    m = skeleton(model)
    if _has_subgraph(m):
        return {}
    feeds = feeds or sample_feeds(model)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input)}
    graph_outputs = [o.name for o in m.graph.output]
    outs = _add_twin(m, set(wanted.values()), types, cpu_nodes)
    vals = _run(m, model, feeds, weights)
    if vals is None:
        return {}

    def rel(t: str) -> float:
        d, a = float(vals[outs[t][0]]), float(vals[outs[t][1]])
        if not np.isfinite(d) or not np.isfinite(a):
            return float("inf")
        return d / a if a > 0 else (0.0 if d == 0 else float("inf"))

    kernels = {k: rel(t) for k, t in wanted.items() if t in outs}
    outputs = {t: rel(t) for t in graph_outputs if t in outs}
    first = None
    if any(v > tolerance for v in outputs.values()) and kernels:
        first = next((k for k, v in kernels.items() if v > tolerance),
                     max(kernels, key=kernels.get))
    return {"tolerance": tolerance, "outputs": outputs, "kernels": kernels, "first": first}
