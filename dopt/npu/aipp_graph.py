"""AIPP in the compiled graph: one ``Aipp`` kernel per ``aipp_op``, first on its input.

The model's input becomes the raw UINT8 frame (``aipp.raw_shape`` of the configured format
and size; ``-1`` where a dynamic AIPP leaves them open); the kernel writes
``<input>/aipp<i>``, which every reader of the input (or only the branch named by
``node_after_aipp`` / ``input_edge_idx``) reads instead. The checked spec travels in the
kernel's ``spec`` attribute, so the runtime runs exactly what was compiled. The pre-check
report gets an NPU row and the estimate a vector-unit kernel per AIPP.
"""
from __future__ import annotations

import json

from ..errors import DoptError
from . import aipp
from .rules import NPU

AIPP_OP = "Aipp"
ALLOWED_DTYPES = ("float32", "float16", "uint8")   # the reference's AIPP input-type table


def _err(spec, file, what, field, **k):
    return DoptError(what, file=file, field=f"line {spec['line']}: aipp_op.{field}", **k)


def _layout(shape) -> str | None:
    if len(shape) != 4:
        return None
    if shape[1] in (1, 3, 4):
        return "NCHW"
    if shape[3] in (1, 3, 4):
        return "NHWC"
    return None


def _target(spec, inputs, file) -> int:
    names = [i["name"] for i in inputs]
    name, rank = spec["input_name"], spec["related_input_rank"]
    idx = None
    if name is not None:
        if name not in names:
            raise _err(spec, file, f"input_name '{name}' is not an input of the model",
                       "input_name", expected="one of " + ", ".join(names))
        idx = names.index(name)
    if rank is not None:
        if rank >= len(names):
            raise _err(spec, file, f"related_input_rank {rank} is past the model's "
                       f"{len(names)} input(s)", "related_input_rank",
                       expected=f"0 to {len(names) - 1}")
        if idx is not None and idx != rank:
            raise _err(spec, file, f"input_name '{name}' is input {idx}, but "
                       f"related_input_rank says {rank}", "related_input_rank",
                       hint="the two name the same input when both are given; drop one")
        idx = rank
    return idx or 0


def _branch(spec, readers, file) -> list[int] | None:
    """Indexes (into ``readers``) of the branch this op feeds; None = every reader."""
    node, edge = spec["node_after_aipp"], spec["input_edge_idx"]
    if node is None and edge is None:
        return None
    by_name = [i for i, k in enumerate(readers)
               if node is not None and (k["name"] == node or k["name"] == f"{node}/quantize")]
    if node is not None and not by_name:
        raise _err(spec, file, f"node_after_aipp '{node}' does not read this input",
                   "node_after_aipp", expected="one of " + ", ".join(
                       k["name"].removesuffix("/quantize") for k in readers))
    if edge is not None:
        if edge >= len(readers):
            raise _err(spec, file, f"input_edge_idx {edge} is past the input's "
                       f"{len(readers)} branch(es)", "input_edge_idx",
                       expected=f"0 to {len(readers) - 1}")
        if by_name and edge not in by_name:
            raise _err(spec, file, f"input_edge_idx {edge} is not the branch of "
                       f"node_after_aipp '{node}'", "input_edge_idx",
                       hint="the two name the same branch when both are given; drop one")
        return [edge]
    return by_name


def insert(om, specs: list[dict], report: dict, profile, *, file: str | None = None) -> None:
    """Put the AIPP kernels into ``om.graph`` (in place); update report and estimate."""
    g = om.graph
    inputs = g["inputs"]
    groups: dict[int, list] = {}
    for spec in specs:
        groups.setdefault(_target(spec, inputs, file), []).append(spec)
    new_kernels, rows = [], []
    for idx, group in sorted(groups.items()):
        inp = inputs[idx]
        name, shape, dtype = inp["name"], inp["shape"], inp["dtype"]
        readers = [k for k in g["kernels"] if name in k["inputs"]]
        branched = [s["node_after_aipp"] is not None or s["input_edge_idx"] is not None
                    for s in group]
        if len(group) > 1 and not all(branched):
            raise _err(group[1], file, f"input '{name}' has {len(group)} aipp_op blocks; "
                       "several blocks on one input must each name their branch",
                       "node_after_aipp", hint="give every block node_after_aipp (or "
                       "input_edge_idx), or merge them")
        if any(branched) and not all(branched):
            raise _err(group[0], file, "node_after_aipp/input_edge_idx must be given in "
                       "every aipp_op of an input or in none", "node_after_aipp")
        layout = _layout(shape)
        if layout is None:
            raise _err(group[0], file, f"AIPP needs an image input, and '{name}' has shape "
                       f"{shape}", "input_name", expected="a 4-D NCHW or NHWC input with 1, 3 "
                       "or 4 channels")
        if dtype not in ALLOWED_DTYPES:
            raise _err(group[0], file, f"AIPP cannot feed input '{name}' of type {dtype}",
                       "input_name", expected="an FP32, FP16 or UINT8 model input (the "
                       "reference's AIPP input-type table)")
        c, h, w = (shape[1], shape[2], shape[3]) if layout == "NCHW" else \
            (shape[3], shape[1], shape[2])
        taken: set[int] = set()
        raws = []
        for i, spec in enumerate(group):
            oh, ow = aipp.output_hw(spec)
            fmt = spec["format"]
            have = aipp.channels_of(spec)
            if (h, w) != (oh, ow):
                raise _err(spec, file, f"the AIPP output is {oh}x{ow} (h x w) but input "
                           f"'{name}' is {h}x{w}", "crop_func", expected=f"crop/resize/"
                           f"padding that give {h}x{w}", hint="fix the sizes in the config or "
                           "--input_shape")
            if have != c and not (have == 4 and c == 3):
                src = fmt or "the csc output_format"
                raise _err(spec, file, f"the AIPP output has {have} channel(s) ({src}) but "
                           f"input '{name}' has {c}", "input_para.format",
                           hint="choose a format or csc output that gives the model's channels")
            sel = _branch(spec, readers, file)
            sel = list(range(len(readers))) if sel is None else sel
            if taken & set(sel):
                raise _err(spec, file, "two aipp_op blocks feed the same branch",
                           "node_after_aipp")
            taken |= set(sel)
            out = f"{name}/aipp{i}"
            for j in sel:
                readers[j]["inputs"] = [out if t == name else t for t in readers[j]["inputs"]]
            kspec = {k: v for k, v in spec.items() if k != "lines"}
            new_kernels.append({
                "name": out, "op": AIPP_OP, "onnx_op": AIPP_OP, "domain": "dopt.aipp",
                "device": "npu", "precision": "fp16", "inputs": [name], "outputs": [out],
                "out_dtypes": ["uint8" if dtype == "uint8" else "float32"],
                "attrs": {"spec": {"kind": "str", "value": json.dumps(kspec, sort_keys=True)},
                          "channels": {"kind": "int", "value": c},
                          "layout": {"kind": "str", "value": layout}},
                "fused": [], "removed": False})
            sw, sh = spec["src_image_size_w"], spec["src_image_size_h"]
            raws.append(aipp.raw_shape(fmt, sw, sh) if fmt and sw and sh else [-1, -1, -1])
            rows.append((out, spec, c * h * w))
        if any(r != raws[0] for r in raws):
            raise _err(group[1], file, f"the aipp_op blocks of input '{name}' describe "
                       "different raw frames", "input_para", hint="one input takes one frame "
                       "format and size")
        inp.update({"shape": [shape[0]] + raws[0], "dtype": "uint8",
                    "aipp": [k["name"] for k in new_kernels if k["inputs"] == [name]],
                    "model_shape": list(shape), "model_dtype": dtype})
    g["kernels"] = new_kernels + g["kernels"]
    from .compiler import _partitions
    g["partitions"] = _partitions(g["kernels"])
    _report(report, rows)
    if om.meta.get("estimate"):
        _estimate(om.meta["estimate"], rows, profile)
    om.meta["summary"] = report["summary"]
    om.meta["aipp"] = [{"kernel": out, "mode": spec["mode"], "format": spec["format"]}
                       for out, spec, _ in rows]


def _report(report: dict, rows) -> None:
    nodes = [{"node": out, "onnx_op": AIPP_OP, "ir_op": AIPP_OP, "int8": False,
              "outcome": NPU, "findings": []} for out, _, _ in rows]
    report["nodes"] = nodes + report["nodes"]
    report["op_types"] = [{"op": AIPP_OP, "count": len(nodes), "outcome": NPU, "reason": "-",
                           "nodes": [x["node"] for x in nodes]}] + report["op_types"]
    report["summary"][NPU] = report["summary"].get(NPU, 0) + len(nodes)
    parts = report.get("partitions") or []
    if parts and parts[0]["device"] == "npu":
        parts[0]["nodes"] = [x["node"] for x in nodes] + parts[0]["nodes"]
    else:
        parts.insert(0, {"id": 0, "device": "npu", "nodes": [x["node"] for x in nodes],
                         "transfers_in": 0})
        for i, p in enumerate(parts):
            p["id"] = i
    report["partitions"] = parts
    report["aipp"] = [{"kernel": out, "mode": spec["mode"], "format": spec["format"],
                       "output_hw": list(aipp.output_hw(spec))} for out, spec, _ in rows]


def _estimate(est: dict, rows, profile) -> None:
    """An AIPP kernel on the vector unit: reads the frame once, writes the FP16 map."""
    from .costmodel import band, format_ms
    cm = profile.cost_model
    added = []
    for out, spec, elems in rows:
        fmt = spec["format"] or "ARGB8888_U8"
        w = spec["src_image_size_w"] or 0
        h = spec["src_image_size_h"] or 0
        frame = aipp.frame_bytes(fmt, w, h) if w and h else spec["max_src_image_size"]
        work = max(frame, elems)
        ddr = frame + 2 * elems
        compute = work / (cm["vector_gops"] * 1e3)
        memory = ddr / (cm["ddr_gbps"] * 1e3)
        added.append({"node": out, "op": AIPP_OP, "device": "npu", "int8": False, "macs": 0,
                      "padded_macs": 0, "padding_waste": 0.0, "weight_bytes": 0,
                      "activation_bytes": ddr, "ddr_bytes": ddr, "feature_ddr_bytes": ddr,
                      "fused": [], "shape_known": True, "slowdown": 1.0,
                      "vector_elems": work, "compute_us": compute, "memory_us": memory,
                      "time_us": max(compute, memory) + cm["kernel_launch_us"],
                      "bound": "compute" if compute > memory else "memory"})
    est["kernels"] = added + est["kernels"]
    s = est["summary"]
    extra = sum(k["time_us"] for k in added) / 1e3
    s["total_ms"] += extra
    s["npu_ms"] += extra
    s["kernels"] += len(added)
    s["npu_kernels"] += len(added)
    s["compute_bound" if added[0]["bound"] == "compute" else "memory_bound"] += len(added)
    macs = [k for k in est["kernels"] if k["macs"] and k["device"] == "npu"]
    share = (sum(k["time_us"] for k in macs if k["int8"])
             / max(sum(k["time_us"] for k in macs), 1e-12)) if macs else 0.0
    lo, hi = band(s["total_ms"], share, cm)
    s["band_ms"] = [lo, hi]
    s["total_text"] = format_ms(s["total_ms"], (lo, hi))
    for k in est["kernels"]:
        k["share"] = round(k["time_us"] / (s["total_ms"] * 1e3), 4) if s["total_ms"] else 0.0
