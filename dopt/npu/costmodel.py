"""Latency and memory estimate for an NPU graph (what the emulator cannot measure).

A roofline per kernel: time = max(padded MACs / MAC rate, bytes / DDR bandwidth) + a fixed
launch cost. Channels round up to the profile's block (16 FP16, 32 INT8), which is where
badly sized layers lose; CPU-fallback kernels and every CPU<->NPU crossing are priced too.
Every constant comes from the hardware profile's ``cost_model`` section (calibrated on the
reference's measured Kirin 9000 latencies by ``bench/calibrate_cost_model.py``), and every
result says it is an estimate. Standard library only: usable wherever the compiler is.
"""
from __future__ import annotations

import math

from .rules import (CONV_OPS, CPU, FUSED, LOW_STARS, NPU, Device, Outcome, concat_split_in_place,
                    pad_channels)

MAC_OPS = CONV_OPS + ("FullyConnection", "MatMul", "BatchMatMul")
EPILOGUE_OPS = ("Activation", "PRelu", "HardSwish")  # applied on a MAC kernel's output path
FP16_BYTES = 2


def _elems(shape) -> int:
    """Element count of a static shape; 0 when unknown (the kernel is then flagged)."""
    if shape is None or any(d is None or d <= 0 for d in shape):
        return 0
    return math.prod(shape)


def _in_place(node, row) -> bool:
    """ConcatD/SplitD on 4-D channel axis with aligned offsets: no kernel (producers write in)."""
    if node.op not in ("ConcatD", "SplitD"):
        return False
    dims = node.attrs.get("input_dims" if node.op == "ConcatD" else "output_dims") or []
    rank = len(dims[0]) if dims and dims[0] else 0
    axis = node.attrs.get("axis", 1)
    axis = axis + rank if axis < 0 else axis
    return (rank == 4 and axis == 1
            and not any(f["rule"] == concat_split_in_place.__name__ for f in row["findings"]))


def _macs(node, shapes, block: int) -> tuple[int, int]:
    """(MACs, MACs with channels padded to ``block``) of one MAC kernel."""
    out = shapes.get(node.outputs[0])
    w = shapes.get(node.inputs[1]) if len(node.inputs) > 1 else None
    if not out or _elems(out) == 0 or not w:
        return 0, 0
    if node.op in ("Convolution", "ConvolutionDepthwise"):
        k = math.prod(w[2:])
        pix = out[0] * math.prod(out[2:])
        cout, g = out[1], node.attrs.get("groups", 1)
        cin_g = w[1]
        if node.op == "ConvolutionDepthwise":
            return pix * cout * k, pix * pad_channels(cout, block) * k
        return (pix * cout * cin_g * k,
                pix * g * pad_channels(cout // g, block) * pad_channels(cin_g, block) * k)
    if node.op == "ConvTranspose":
        # weight (Cin, Cout/g, k...). The NPU runs it as a convolution over the input with
        # stride-1 zeros inserted, so it executes every output pixel x the whole kernel.
        src = shapes.get(node.inputs[0])
        if not src or _elems(src) == 0:
            return 0, 0
        k, cin, cout_g = math.prod(w[2:]), w[0], w[1]
        g = max(1, out[1] // cout_g)
        return (src[0] * math.prod(src[2:]) * cin * cout_g * k,
                out[0] * math.prod(out[2:]) * g * pad_channels(cin // g, block)
                * pad_channels(cout_g, block) * k)
    # FullyConnection / MatMul: rows x K x N
    n_out = out[-1]
    kdim = shapes.get(node.inputs[0], (0,))[-1]
    if node.op == "FullyConnection":
        kdim, n_out = node.attrs.get("cin", kdim), node.attrs.get("cout", n_out)
    rows = _elems(out) // max(n_out, 1)
    if kdim <= 0:
        return 0, 0
    return rows * kdim * n_out, rows * pad_channels(kdim, block) * pad_channels(n_out, block)


class _Plan:
    """Which nodes are kernels, which fold into a host, which only alias a buffer."""

    def __init__(self, graph, report, cm):
        self.rows = {x["node"]: x for x in report["nodes"]}
        self.consts = set(graph.initializers) | {
            t for n in graph.nodes if n.onnx_op == "Constant" for t in n.outputs}
        self.consumers: dict[str, list] = {}
        for n in graph.nodes:
            for t in n.inputs:
                self.consumers.setdefault(t, []).append(n)
        self.role: dict[str, str] = {}     # kernel | folded | alias | in_place | const
        self.host: dict[str, str] = {}     # folded node -> kernel it adds to
        self.final: dict[str, str] = {}    # kernel -> tensor it finally writes
        self.writer: dict[str, str] = {}   # that tensor -> kernel
        self.ops = {n.name: n.op for n in graph.nodes}
        with_epilogue: set[str] = set()
        for n in graph.nodes:
            row = self.rows.get(n.name, {"outcome": NPU, "findings": []})
            if n.onnx_op == "Constant":
                self.role[n.name] = "const"
            elif row["outcome"] == FUSED and n.fused_into:
                self.role[n.name], self.host[n.name] = "folded", n.fused_into
            elif row["outcome"] == FUSED:
                self.role[n.name] = "alias"
            elif row["outcome"] != CPU and _in_place(n, row):
                self.role[n.name] = "in_place"
            elif (cm["fuse_activation_into_conv"] and n.op in EPILOGUE_OPS
                  and row["outcome"] != CPU
                  and (host := self._epilogue_host(graph, n)) not in (None, *with_epilogue)):
                self.role[n.name], self.host[n.name] = "folded", host
                self._writes(host, n.outputs[0])
                with_epilogue.add(host)
            else:
                self.role[n.name] = "kernel"
                self._writes(n.name, n.attrs.get("fused_output", n.outputs[0]))

    def _writes(self, kernel: str, tensor: str) -> None:
        self.final[kernel] = tensor
        self.writer[tensor] = kernel

    def _epilogue_host(self, graph, n) -> str | None:
        """The NPU MAC kernel whose sole output feeds only ``n`` (Conv+ReLU is one kernel)."""
        t = n.inputs[0] if n.inputs else None
        if t is None or t in graph.outputs or len(self.consumers.get(t, [])) != 1:
            return None
        host = self.writer.get(t)
        if host is None or self.rows.get(host, {}).get("outcome") == CPU:
            return None
        return host if self.ops[host] in MAC_OPS else None


def estimate(graph, report: dict, profile) -> dict:
    """Per-kernel and whole-network latency/memory estimate of ``graph`` as placed by ``report``."""
    plan = _Plan(graph, report, profile.cost_model)
    kernels, by_name = [], {}
    for n in graph.nodes:
        if plan.role[n.name] == "kernel":
            row = plan.rows.get(n.name, {"outcome": NPU, "int8": False, "findings": []})
            kernels.append(_kernel(n, row, plan, graph.shapes, profile))
            by_name[n.name] = kernels[-1]
    for name, host in plan.host.items():
        if host in by_name:
            by_name[host]["fused"].append(name)
    transfers = _transfers(graph, plan, by_name, profile.cost_model)
    return _summary(graph, plan, kernels, transfers, profile)


def _kernel(n, row, plan, shapes, profile) -> dict:
    """Roofline of one kernel: max(padded MACs / rate, DDR bytes / bandwidth) + launch."""
    cm = profile.cost_model
    dev = Outcome(row["outcome"]).device
    int8 = bool(row.get("int8")) and dev is Device.NPU
    macs, padded = (_macs(n, shapes, profile.channel_block(int8)) if n.op in MAC_OPS
                    else (0, 0))
    acts_in = [t for t in n.inputs if t and t not in plan.consts]
    consts = [t for t in n.inputs if t and t in plan.consts]
    out_elems = sum(_elems(shapes.get(t)) for t in n.outputs)
    w_bytes = sum(_elems(shapes.get(t)) for t in consts) * (1 if int8 else FP16_BYTES)
    # per feature map: INT8 kernels read INT8, every kernel writes FP16
    tensors = ([_elems(shapes.get(t)) * (1 if int8 else FP16_BYTES) for t in acts_in]
               + [_elems(shapes.get(t)) * FP16_BYTES for t in n.outputs])
    onchip = cm["onchip_buffer_kb"] * 1024
    k = {"node": n.name, "op": n.op or f"(ONNX {n.onnx_op})", "device": dev.value, "int8": int8,
         "macs": macs, "padded_macs": padded,
         "padding_waste": round(1 - macs / padded, 4) if padded else 0.0,
         "weight_bytes": w_bytes, "activation_bytes": sum(tensors), "tensor_bytes": tensors,
         "ddr_bytes": w_bytes + sum(max(0, b - onchip) for b in tensors), "fused": [],
         "shape_known": bool(out_elems) and all(shapes.get(t) for t in acts_in)}
    if dev is Device.CPU:
        k["compute_us"] = max(2 * macs, out_elems) / (cm["cpu_gflops"] * 1e3)
        k["memory_us"] = 0.0
        k["time_us"] = k["compute_us"] + cm["cpu_op_us"]
    else:
        rate = cm["int8_tops" if int8 else "fp16_tops"] * 1e6 / 2  # MACs per microsecond
        if n.op == "ConvolutionDepthwise":
            rate *= cm["depthwise_efficiency"]
        low = (profile.stars(n.op) or 5) <= LOW_STARS  # the rule ``low_recommendation``
        slow = cm["low_recommendation_slowdown"] if low else 1.0
        k["compute_us"] = padded / rate
        k["memory_us"] = k["ddr_bytes"] / (cm["ddr_gbps"] * 1e3) * slow
        k["time_us"] = max(k["compute_us"], k["memory_us"]) + cm["kernel_launch_us"]
    k["bound"] = ("compute" if k["compute_us"] > k["memory_us"] else
                  "memory" if k["memory_us"] > 0 else "launch")  # launch: all on chip
    return k


def _device_of_tensors(graph, plan, by_name) -> dict:
    dev = {t: "input" for t in graph.inputs}
    for n in graph.nodes:
        role = plan.role[n.name]
        if role == "kernel":
            d = by_name[n.name]["device"]
        elif role == "folded":
            d = (by_name[plan.host[n.name]]["device"] if plan.host[n.name] in by_name
                 else Device.NPU.value)
        elif role == "const":
            continue
        else:  # aliases and in-place concat/split live where their data lives
            d = next((dev[t] for t in n.inputs if t in dev and dev[t] != "input"),
                     Device.NPU.value)
        for t in n.outputs:
            dev[t] = d
    return dev


def _transfers(graph, plan, by_name, cm) -> list[dict]:
    """One copy per tensor per destination device at every partition edge."""
    dev = _device_of_tensors(graph, plan, by_name)
    seen, out = set(), []
    for n in graph.nodes:
        if plan.role[n.name] not in ("kernel", "folded"):
            continue
        dst = dev[n.outputs[0]] if n.outputs else Device.NPU.value
        for t in n.inputs:
            src = dev.get(t)
            if src in (None, "input", dst) or t in plan.consts or (t, dst) in seen:
                continue
            seen.add((t, dst))
            nbytes = _elems(graph.shapes.get(t)) * FP16_BYTES
            out.append({"tensor": t, "from": src, "to": dst, "bytes": nbytes,
                        "time_us": nbytes / (cm["cpu_npu_transfer_gbps"] * 1e3)
                        + cm["cpu_npu_transfer_latency_us"]})
    return out


def _peak_activation_bytes(graph, plan) -> int:
    """Largest set of live FP16 buffers over graph order; views share their base buffer."""
    base: dict[str, str] = {}

    def root(t):
        for _ in range(len(base) + 1):   # a chain visits each alias once: bounded walk
            if t not in base:
                return t
            t = base[t]
        raise AssertionError("alias cycle in the peak-memory walk")

    def alias(t, target):
        r, rt = root(t), root(target)
        if r != rt and r not in graph.inputs:   # a tensor two concats share joins one buffer
            base[r] = rt

    for n in graph.nodes:
        role = plan.role[n.name]
        if role in ("folded", "alias") and n.inputs:
            for t in n.outputs:
                alias(t, n.inputs[0])
        elif role == "in_place":
            for t in (n.inputs if n.op == "ConcatD" else n.outputs):
                alias(t, n.outputs[0] if n.op == "ConcatD" else n.inputs[0])
    first, last = {}, {}
    for t in graph.inputs:
        first[root(t)] = -1
    for i, n in enumerate(graph.nodes):
        if plan.role[n.name] == "const":
            continue
        for t in n.outputs:
            first.setdefault(root(t), i)
        for t in n.inputs:
            if t and t not in plan.consts:
                last[root(t)] = i
    for t in graph.outputs:
        last[root(t)] = len(graph.nodes)
    delta = [0] * (len(graph.nodes) + 3)  # steps -1 .. len(nodes), shifted by one
    for b, start in first.items():
        size = _elems(graph.shapes.get(b)) * FP16_BYTES
        delta[start + 1] += size
        delta[max(last.get(b, start), start) + 2] -= size
    peak = cur = 0
    for d in delta:
        cur += d
        peak = max(peak, cur)
    return peak


def _summary(graph, plan, kernels, transfers, profile) -> dict:
    cm = profile.cost_model
    npu_us = sum(k["time_us"] for k in kernels if k["device"] == Device.NPU)
    cpu_us = sum(k["time_us"] for k in kernels if k["device"] == Device.CPU)
    xfer_us = sum(x["time_us"] for x in transfers)
    total = npu_us + cpu_us + xfer_us
    macs = sum(k["macs"] for k in kernels)
    padded = sum(k["padded_macs"] for k in kernels)
    weights = sum(k["weight_bytes"] for k in kernels)
    peak_act = _peak_activation_bytes(graph, plan)
    stamp = profile.stamp()
    calibrated = bool(cm.get("calibrated"))
    cal = cm.get("calibration") if isinstance(cm.get("calibration"), dict) else {}
    how = ("calibrated" + (f" on {cal['data']} ({cal.get('date', 'undated')})"
                           if cal.get("data") else "")) if calibrated else "uncalibrated constants"
    label = (f"ESTIMATE, not a measurement: {stamp['name']} cost model, profile version "
             f"{stamp['version']}, {how}")
    for k in kernels:
        k["share"] = round(k["time_us"] / total, 4) if total else 0.0
    waste = sorted((k for k in kernels if k["padded_macs"] > k["macs"]),
                   key=lambda k: k["padded_macs"] - k["macs"], reverse=True)
    return {
        "estimate": True, "label": label, "profile": stamp, "calibrated": calibrated,
        "kernels": kernels, "transfers": transfers,
        "summary": {
            "total_ms": total / 1e3, "npu_ms": npu_us / 1e3, "cpu_ms": cpu_us / 1e3,
            "transfer_ms": xfer_us / 1e3, "kernels": len(kernels),
            "npu_kernels": sum(k["device"] == Device.NPU for k in kernels),
            "cpu_kernels": sum(k["device"] == Device.CPU for k in kernels),
            "int8_kernels": sum(k["int8"] for k in kernels),
            "compute_bound": sum(k["bound"] == "compute" and k["device"] == Device.NPU
                                 for k in kernels),
            "memory_bound": sum(k["bound"] == "memory" and k["device"] == Device.NPU
                                for k in kernels),
            "gmacs": macs / 1e9, "padded_gmacs": padded / 1e9,
            "padding_waste": round(1 - macs / padded, 4) if padded else 0.0,
            "weight_bytes": weights, "peak_activation_bytes": peak_act,
            "peak_memory_bytes": weights + peak_act,
            "shape_unknown": [k["node"] for k in kernels if not k["shape_known"]],
        },
        "top_time": [{"node": k["node"], "op": k["op"], "time_us": k["time_us"],
                      "share": k["share"], "bound": k["bound"]}
                     for k in sorted(kernels, key=lambda k: k["time_us"], reverse=True)[:5]],
        "top_padding": [{"node": k["node"], "op": k["op"], "padding_waste": k["padding_waste"],
                         "wasted_gmacs": (k["padded_macs"] - k["macs"]) / 1e9}
                        for k in waste[:5]],
    }


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f}"


def render_text(est: dict) -> str:
    """Per-kernel table and summary, headed and footed by the estimate label."""
    s = est["summary"]
    lines = [est["label"], "",
             "| # | layer | op | device | precision | GMACs | padding | MiB moved | bound | "
             "est. us |", "|---|---|---|---|---|---|---|---|---|---|"]
    for i, k in enumerate(est["kernels"]):
        name = k["node"] + (f" (+{', '.join(k['fused'])})" if k["fused"] else "")
        precision = "int8" if k["int8"] else "fp16" if k["device"] == Device.NPU else "fp32"
        lines.append(f"| {i} | {name} | {k['op']} | {k['device']} | {precision} | "
                     f"{k['macs'] / 1e9:.4f} | {k['padding_waste']:.0%} | "
                     f"{_mb(k['weight_bytes'] + k['activation_bytes'])} | {k['bound']} | "
                     f"{k['time_us']:.1f} |")
    for x in est["transfers"]:
        lines.append(f"| - | transfer {x['tensor']} | copy | {x['from']}->{x['to']} | - | - | - "
                     f"| {_mb(x['bytes'])} | transfer | {x['time_us']:.1f} |")
    lines += ["", f"estimated total: {s['total_ms']:.3f} ms (NPU {s['npu_ms']:.3f}, CPU "
              f"{s['cpu_ms']:.3f}, CPU<->NPU transfers {s['transfer_ms']:.3f}); "
              f"{s['kernels']} kernels ({s['int8_kernels']} INT8, {s['cpu_kernels']} on CPU; "
              f"{s['compute_bound']} compute-bound, {s['memory_bound']} memory-bound on NPU)",
              f"work: {s['gmacs']:.3f} GMACs, {s['padded_gmacs']:.3f} after channel padding "
              f"({s['padding_waste']:.1%} padding waste)",
              f"memory estimate: weights {_mb(s['weight_bytes'])} MiB + peak live activations "
              f"{_mb(s['peak_activation_bytes'])} MiB = {_mb(s['peak_memory_bytes'])} MiB",
              "slowest: " + ", ".join(f"{t['node']} {t['time_us']:.0f} us ({t['share']:.0%}, "
                                      f"{t['bound']})" for t in est["top_time"])]
    if est["top_padding"]:
        lines.append("most padding: " + ", ".join(
            f"{t['node']} {t['padding_waste']:.0%} ({t['wasted_gmacs']:.3f} GMACs)"
            for t in est["top_padding"]))
    if s["shape_unknown"]:
        lines.append(f"shapes unknown for {len(s['shape_unknown'])} kernels (costed as 0): "
                     + ", ".join(s["shape_unknown"][:6]) + " ... pass --input_shape")
    lines += ["", est["label"]]
    return "\n".join(lines)
