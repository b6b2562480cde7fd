"""Latency and memory estimate for an NPU graph (what the emulator cannot measure).

The structure follows how the NPU executes a graph, so that its few constants can stay
physically plausible (``docs/cost_model.md``):

1. **Kernels as the NPU's graph compiler forms them.** Build-time folds (Conv + BN / Scale /
   BiasAdd) come from the lowering; execution-time fusions come from the hardware profile's
   ``fusions`` entries of ``"kind": "kernel"``: activations, residual adds and the Swish
   pair ride in a MAC kernel's output stage (epilogue), a zero ``Pad`` is absorbed by the
   convolution or pooling that reads it (prologue). Each fusion is recorded by rule id.
2. **Compute** per kernel: MACs with channels rounded up to the MAC array's block (C0 = 16
   lanes FP16, 32 INT8) over the peak rate; a depthwise convolution uses one lane of each
   C0 block (``depthwise_block_utilization`` of 1/C0 of the peak); element-wise kernels run
   on the vector unit.
3. **Memory**: weights stream from DDR on every run; a feature map stays in an on-chip
   buffer of ``onchip_buffer_kb`` (least recently used first out; an evicted map that is
   still needed is written back and read again) and crosses DDR only when it does not fit,
   when it leaves the NPU, or when it is a network input or output. A feature map between
   two INT8 kernels is stored in INT8 (requantized in the producer's output stage).
4. A kernel takes ``max(compute, memory) + kernel_launch_us``; CPU-fallback kernels and
   every CPU<->NPU crossing are priced from the profile's CPU constants.

Every constant comes from the profile's ``cost_model`` section (fitted with priors by
``bench/calibrate_cost_model.py``; sources in ``cost_model.sources``), and every result
says it is an estimate and carries an uncertainty band measured by leave-one-family-out
validation (``cost_model.band``). Standard library only; linear in the graph's size.
"""
from __future__ import annotations

import math
from collections import OrderedDict

from .rules import (CONV_OPS, CPU, FUSED, LOW_STARS, NPU, Device, Outcome, concat_split_in_place,
                    pad_channels)

MAC_OPS = CONV_OPS + ("FullyConnection", "MatMul", "BatchMatMul")
FP16_BYTES = 2
KERNEL = "kernel"   # the profile's fusions[].kind of execution-time (kernel) fusions


def _elems(shape) -> int:
    """Element count of a static shape; 0 when unknown (the kernel is then flagged)."""
    if shape is None or any(d is None or d <= 0 for d in shape):
        return 0
    return math.prod(shape)


def kernel_fusions(profile) -> dict[str, dict]:
    """The profile's execution-time fusion rules by id (``fusions`` entries of kind kernel)."""
    return {f["id"]: f for f in profile.fusions
            if f.get("kind") == KERNEL and f.get("enabled", True)}


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
    """(useful MACs, MACs issued on the MAC array with channels padded to ``block``)."""
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
            # one input channel per output channel: padding is on the channel count only;
            # the lane utilisation (1/C0) is priced in the rate (``_rate``)
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
    """Which nodes are kernels, which fuse into one (and by which rule), which only alias."""

    def __init__(self, graph, report, profile):
        self.graph = graph
        self.rows = {x["node"]: x for x in report["nodes"]}
        self.consts = set(graph.initializers) | {
            t for n in graph.nodes if n.onnx_op == "Constant" for t in n.outputs}
        self.consumers: dict[str, list] = {}
        for n in graph.nodes:
            for t in n.inputs:
                self.consumers.setdefault(t, []).append(n)
        self.rules = kernel_fusions(profile) if profile.cost_model.get(
            "fuse_activation_into_conv", True) else {}
        self.max_epilogue = int(profile.cost_model.get("epilogue_max_ops", 2))
        self.role: dict[str, str] = {}     # kernel | folded | alias | in_place | const
        self.host: dict[str, str] = {}     # folded node -> kernel it belongs to
        self.rule: dict[str, str] = {}     # folded node -> fusion rule id (or "fold")
        self.final: dict[str, str] = {}    # kernel -> tensor it finally writes
        self.writer: dict[str, str] = {}   # that tensor -> kernel
        self.extra_in: dict[str, list[str]] = {}   # kernel -> operands its epilogue reads
        self.read_as: dict[str, str] = {}  # tensor a prologue absorbed -> tensor really read
        self.ops = {n.name: n.op for n in graph.nodes}
        self.order = {n.name: i for i, n in enumerate(graph.nodes)}
        self._reads: dict[str, list[str]] = {}
        epilogues: dict[str, int] = {}
        for n in graph.nodes:
            row = self.rows.get(n.name, {"outcome": NPU, "findings": []})
            if self.role.get(n.name):          # taken by a look-ahead fusion (Swish's Mul)
                continue
            if n.onnx_op == "Constant":
                self.role[n.name] = "const"
            elif row["outcome"] == FUSED and n.fused_into:
                self.role[n.name], self.host[n.name] = "folded", n.fused_into
                self.rule[n.name] = "fold"
            elif row["outcome"] == FUSED:
                self.role[n.name] = "alias"
            elif row["outcome"] != CPU and _in_place(n, row):
                self.role[n.name] = "in_place"
            elif row["outcome"] != CPU and self._epilogue(n, epilogues):
                pass
            elif row["outcome"] != CPU and self._prologue(n):
                pass
            else:
                self.role[n.name] = KERNEL
                self._writes(n.name, n.attrs.get("fused_output", n.outputs[0]))

    # -- fusion rules (the profile's fusions[] of kind "kernel") ---------------------------

    def _writes(self, kernel: str, tensor: str) -> None:
        self.final[kernel] = tensor
        self.writer[tensor] = kernel

    def _npu(self, name: str) -> bool:
        return self.rows.get(name, {}).get("outcome") not in (CPU, None) or name not in self.rows

    def _sole_use(self, t: str, user) -> bool:
        return (t not in self.graph.outputs and t not in self.consts
                and [c.name for c in self.consumers.get(t, [])] == [user.name])

    def _mac_host(self, t: str, epilogues: dict) -> str | None:
        """The NPU MAC kernel that writes ``t`` and has room for one more epilogue op."""
        host = self.writer.get(t)
        if host is None or self.ops.get(host) not in MAC_OPS or not self._npu(host):
            return None
        return host if epilogues.get(host, 0) < self.max_epilogue else None

    def _fold(self, n, host: str, rule: str, epilogues: dict) -> None:
        self.role[n.name], self.host[n.name], self.rule[n.name] = "folded", host, rule
        self._writes(host, n.outputs[0])
        epilogues[host] = epilogues.get(host, 0) + 1

    def _epilogue(self, n, epilogues: dict) -> bool:
        """Activation / residual add / Swish pair in the output stage of a MAC kernel."""
        act = self.rules.get("activation_epilogue")
        if act and n.op in act["ops"] and n.inputs and self._sole_use(n.inputs[0], n):
            host = self._mac_host(n.inputs[0], epilogues)
            if host:
                self._fold(n, host, "activation_epilogue", epilogues)
                return True
        swish = self.rules.get("swish_epilogue")
        if swish and n.op in swish["ops"] and n.onnx_op in swish.get("onnx_ops", [n.onnx_op]) \
                and n.inputs:
            t = n.inputs[0]
            users = self.consumers.get(t, [])
            mul = next((u for u in users if u is not n and u.op == "Eltwise"
                        and u.onnx_op == "Mul" and set(u.inputs) == {t, n.outputs[0]}), None)
            host = self._mac_host(t, epilogues)
            if mul is not None and len(users) == 2 and host and t not in self.graph.outputs \
                    and self.consumers.get(n.outputs[0], []) == [mul] and self._npu(mul.name):
                self._fold(n, host, "swish_epilogue", epilogues)
                self._fold(mul, host, "swish_epilogue", epilogues)
                epilogues[host] -= 1        # the pair is one epilogue op (x * sigmoid(x))
                return True
        add = self.rules.get("eltwise_epilogue")
        if add and n.op in add["ops"] and n.onnx_op in add.get("onnx_ops", [n.onnx_op]) \
                and len(n.inputs) == 2 and not n.attrs.get("const_inputs") \
                and _elems(self.graph.shapes.get(n.inputs[0])) \
                == _elems(self.graph.shapes.get(n.inputs[1])) \
                == _elems(self.graph.shapes.get(n.outputs[0])):
            # the operand computed last is in the kernel's output stage; the other is read
            cands = sorted(((self.order.get(self.writer.get(t), -1), i, t)
                            for i, t in enumerate(n.inputs)), reverse=True)
            for _, i, t in cands:
                host = self._mac_host(t, epilogues) if self._sole_use(t, n) else None
                if host:
                    self._fold(n, host, "eltwise_epilogue", epilogues)
                    self.extra_in.setdefault(host, []).append(n.inputs[1 - i])
                    return True
        return False

    def _prologue(self, n) -> bool:
        """A zero Pad of H/W absorbed by the convolution or pooling that alone reads it."""
        rule = self.rules.get("pad_prologue")
        if not rule or n.op not in rule["ops"] or not n.inputs or not n.outputs:
            return False
        users = self.consumers.get(n.outputs[0], [])
        if len(users) != 1 or users[0].op not in rule["into"] or not self._npu(users[0].name) \
                or n.outputs[0] in self.graph.outputs or users[0].inputs[0] != n.outputs[0]:
            return False
        if not _zero_spatial_pad(n, self.graph):
            return False
        self.role[n.name], self.host[n.name] = "folded", users[0].name
        self.rule[n.name] = "pad_prologue"
        self.read_as[n.outputs[0]] = self.read_as.get(n.inputs[0], n.inputs[0])
        return True

    def reads(self, n) -> list[str]:
        """Feature maps kernel ``n`` reads (a prologue's input instead of its output); the
        plan is complete when this is first asked, so the answer is kept."""
        if n.name in self._reads:
            return self._reads[n.name]
        out = []
        for t in list(n.inputs) + self.extra_in.get(n.name, []):
            if t and t not in self.consts:
                t = self.read_as.get(t, t)
                if t not in out:
                    out.append(t)
        self._reads[n.name] = out
        return out

    def fusions(self) -> list[dict]:
        """Each kernel with the nodes fused into it and the rules that fused them."""
        groups: dict[str, dict] = {}
        for name, host in self.host.items():
            g = groups.setdefault(host, {"kernel": host, "nodes": [], "rules": []})
            g["nodes"].append(name)
            if self.rule[name] not in g["rules"]:
                g["rules"].append(self.rule[name])
        return [g for g in groups.values() if set(g["rules"]) - {"fold"}]


def _zero_spatial_pad(n, graph) -> bool:
    """Constant-mode Pad with value 0 that pads only the last two axes of a 4-D tensor."""
    if n.attrs.get("mode", "constant") != "constant" or not n.attrs.get("zero_value", True):
        return False
    src, dst = graph.shapes.get(n.inputs[0]), graph.shapes.get(n.outputs[0])
    return (bool(src) and bool(dst) and len(src) == 4 and len(dst) == 4
            and tuple(src[:2]) == tuple(dst[:2]))


def fusion_groups(graph, report: dict, profile) -> list[dict]:
    """The kernels that absorb other nodes by an execution-time fusion rule, for the
    pre-check report: ``[{"kernel", "nodes", "rules"}]`` (build-time folds listed as
    ``fold`` beside them)."""
    return _Plan(graph, report, profile).fusions()


def estimate(graph, report: dict, profile) -> dict:
    """Per-kernel and whole-network latency/memory estimate of ``graph`` as placed by ``report``."""
    plan = _Plan(graph, report, profile)
    kernels = [n for n in graph.nodes if plan.role[n.name] == KERNEL]
    rows = {n.name: plan.rows.get(n.name, {"outcome": NPU, "int8": False, "findings": []})
            for n in kernels}
    dev = {n.name: Outcome(rows[n.name]["outcome"]).device for n in kernels}
    int8 = {n.name: bool(rows[n.name].get("int8")) and dev[n.name] is Device.NPU
            for n in kernels}
    traffic = _memory_traffic(graph, plan, kernels, dev, int8, profile.cost_model)
    out, by_name = [], {}
    for n in kernels:
        k = _kernel(n, dev[n.name], int8[n.name], traffic[n.name], plan, graph.shapes, profile)
        out.append(k)
        by_name[n.name] = k
    for name, host in plan.host.items():
        if host in by_name:
            by_name[host]["fused"].append(name)
    transfers = _transfers(graph, plan, by_name, profile.cost_model)
    return _summary(graph, plan, out, transfers, profile)


def _storage_bytes(plan, kernels, dev, int8, passthrough=()) -> dict[str, int]:
    """Bytes per element of each kernel output: 1 where the map is INT8 from end to end,
    else 2 (FP16).

    A map is INT8 when its writer is an INT8 kernel (requantized in its output stage) or a
    pass-through kernel (pooling, concat, ...: ``cost_model.int8_passthrough_ops``) whose
    inputs are all INT8, and every reader is an INT8 kernel or such a pass-through kernel.
    Solved as a fixed point, at most one round per kernel."""
    readers: dict[str, list[str]] = {}
    for n in kernels:
        for t in plan.reads(n):
            readers.setdefault(t, []).append(n.name)
    by_name = {n.name: n for n in kernels}
    ops = {n.name: n.op for n in kernels}
    npu_pass = {n.name for n in kernels if ops[n.name] in passthrough
                and dev[n.name] is Device.NPU}
    mode = {n.name: int8[n.name] or n.name in npu_pass for n in kernels}   # optimistic
    per: dict[str, int] = {}
    for _ in range(len(kernels) + 1):
        per = {}
        for n in kernels:
            t = plan.final.get(n.name)
            rs = readers.get(t, [])
            per[t] = 1 if (mode[n.name] and rs and t not in plan.graph.outputs
                           and all(mode[r] for r in rs)) else FP16_BYTES
        changed = False
        for name in npu_pass:
            ok = all(per.get(t) == 1 for t in plan.reads(by_name[name]))
            if mode[name] and not ok and not int8[name]:
                mode[name], changed = False, True
        if not changed:
            break
    return per


def _memory_traffic(graph, plan, kernels, dev, int8, cm) -> dict[str, dict]:
    """DDR bytes each kernel reads and writes for feature maps, with the on-chip buffer.

    Kernels run in graph order. A feature map no larger than the buffer stays on chip until
    its last reader runs, unless evicted (least recently used) to make room, in which case
    it is written to DDR then and read back by later readers. Network inputs are read from
    DDR; network outputs and maps read by the CPU are written to DDR."""
    per_elem = _storage_bytes(plan, kernels, dev, int8, cm.get("int8_passthrough_ops", ()))
    cap = cm["onchip_buffer_kb"] * 1024
    remaining: dict[str, int] = {}
    for n in kernels:
        for t in plan.reads(n):
            remaining[t] = remaining.get(t, 0) + 1
    size = {}
    for n in kernels:
        for t in plan.reads(n):
            size.setdefault(t, _elems(graph.shapes.get(t)) * per_elem.get(t, FP16_BYTES))
        t = plan.final.get(n.name)
        size.setdefault(t, _elems(graph.shapes.get(t)) * per_elem.get(t, FP16_BYTES))
    on_chip: OrderedDict[str, int] = OrderedDict()
    in_ddr: set[str] = set(graph.inputs)
    used = 0
    out: dict[str, dict] = {}
    for n in kernels:
        rd = wr = 0
        npu = dev[n.name] is Device.NPU
        for t in plan.reads(n):
            if not npu:
                continue                      # the CPU reads its own copy (a transfer)
            if t in on_chip:
                on_chip.move_to_end(t)
            else:
                rd += size[t]
        for t in plan.reads(n):
            remaining[t] -= 1
            if remaining[t] == 0 and t in on_chip:
                used -= on_chip.pop(t)
        t = plan.final.get(n.name)
        if npu and t is not None:
            s = size[t]
            cpu_reads = any(dev.get(r.name) is Device.CPU
                            for r in plan.consumers.get(t, []) if r.name in dev)
            if t in graph.outputs or cpu_reads or s > cap:
                wr += s
                in_ddr.add(t)
            elif remaining.get(t, 0) > 0:
                while on_chip and used + s > cap:
                    old, b = on_chip.popitem(last=False)
                    used -= b
                    if old not in in_ddr:      # still needed: written back once
                        wr += b
                        in_ddr.add(old)
                on_chip[t] = s
                used += s
        out[n.name] = {"read": rd, "write": wr}
    return out


def _rate(n, int8: bool, profile) -> float:
    """MACs per microsecond the MAC array sustains for this kernel."""
    cm = profile.cost_model
    rate = cm["int8_tops" if int8 else "fp16_tops"] * 1e6 / 2
    if n.op == "ConvolutionDepthwise":
        # one lane of each C0-wide block carries a depthwise channel's products
        rate *= cm["depthwise_block_utilization"] / profile.channel_block(int8)
    return rate


def _kernel(n, dev, int8, traffic, plan, shapes, profile) -> dict:
    """Roofline of one kernel: max(compute, DDR traffic / bandwidth) + launch."""
    cm = profile.cost_model
    macs, padded = (_macs(n, shapes, profile.channel_block(int8)) if n.op in MAC_OPS
                    else (0, 0))
    reads = plan.reads(n)
    consts = [t for t in n.inputs if t and t in plan.consts]
    final = plan.final.get(n.name, n.outputs[0] if n.outputs else None)
    out_elems = _elems(shapes.get(final))
    w_bytes = sum(_elems(shapes.get(t)) for t in consts) * (1 if int8 else FP16_BYTES)
    in_elems = sum(_elems(shapes.get(t)) for t in reads)
    k = {"node": n.name, "op": n.op or f"(ONNX {n.onnx_op})", "device": dev.value, "int8": int8,
         "macs": macs, "padded_macs": padded,
         "padding_waste": round(1 - macs / padded, 4) if padded else 0.0,
         "weight_bytes": w_bytes,
         "activation_bytes": (in_elems + out_elems) * FP16_BYTES,
         "ddr_bytes": w_bytes + traffic["read"] + traffic["write"],
         "feature_ddr_bytes": traffic["read"] + traffic["write"], "fused": [],
         "shape_known": bool(out_elems) and all(shapes.get(t) for t in reads)}
    if dev is Device.CPU:
        k["compute_us"] = max(2 * macs, out_elems) / (cm["cpu_gflops"] * 1e3)
        k["memory_us"] = 0.0
        k["time_us"] = k["compute_us"] + cm["cpu_op_us"]
    else:
        low = (profile.stars(n.op) or 5) <= LOW_STARS  # the rule ``low_recommendation``
        slow = cm["low_recommendation_slowdown"] if low else 1.0
        k["slowdown"] = slow
        if n.op in MAC_OPS:
            k["compute_us"] = padded / _rate(n, int8, profile)
        else:   # element-wise work on the vector unit
            k["vector_elems"] = max(in_elems, out_elems)
            k["compute_us"] = k["vector_elems"] / (cm["vector_gops"] * 1e3) * slow
        k["memory_us"] = k["ddr_bytes"] / (cm["ddr_gbps"] * 1e3) * slow
        k["time_us"] = max(k["compute_us"], k["memory_us"]) + cm["kernel_launch_us"]
    k["bound"] = ("compute" if k["compute_us"] > k["memory_us"] else
                  "memory" if k["memory_us"] > 0 else "launch")  # launch: all on chip
    return k


def _device_of_tensors(graph, plan, by_name) -> dict:
    dev = {t: "input" for t in graph.inputs}
    for n in graph.nodes:
        role = plan.role[n.name]
        if role == KERNEL:
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
        if plan.role[n.name] not in (KERNEL, "folded"):
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


def band(total_ms: float, int8_share: float, cm: dict) -> tuple[float, float]:
    """The uncertainty band of a total: the profile's validated error factors (10th-90th
    percentile of estimate/measurement, leave-one-family-out), FP16 and INT8 blended by the
    share of INT8 kernels."""
    b = cm.get("band") or {}
    lo16, hi16 = b.get("fp16", (0.5, 2.0))
    lo8, hi8 = b.get("int8", (0.5, 2.0))
    w = min(max(int8_share, 0.0), 1.0)
    lo = (1 - w) * lo16 + w * lo8
    hi = (1 - w) * hi16 + w * hi8
    # estimate / measurement in [lo, hi]  =>  measurement in [total / hi, total / lo]
    return total_ms / hi, total_ms / lo


def format_ms(total_ms: float, band_ms) -> str:
    """``2.40 ms (1.80-3.10 ms, estimate)``: how every printed estimate reads."""
    return f"{total_ms:.3f} ms ({band_ms[0]:.3f}-{band_ms[1]:.3f} ms, estimate)"


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
    mac_npu = [k for k in kernels if k["macs"] and k["device"] == Device.NPU]
    int8_share = (sum(k["time_us"] for k in mac_npu if k["int8"])
                  / max(sum(k["time_us"] for k in mac_npu), 1e-12)) if mac_npu else 0.0
    band_ms = band(total / 1e3, int8_share, cm)
    waste = sorted((k for k in kernels if k["padded_macs"] > k["macs"]),
                   key=lambda k: k["padded_macs"] - k["macs"], reverse=True)
    return {
        "estimate": True, "label": label, "profile": stamp, "calibrated": calibrated,
        "kernels": kernels, "transfers": transfers, "fusions": plan.fusions(),
        "summary": {
            "total_ms": total / 1e3, "band_ms": [band_ms[0], band_ms[1]],
            "total_text": format_ms(total / 1e3, band_ms),
            "npu_ms": npu_us / 1e3, "cpu_ms": cpu_us / 1e3,
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
            "ddr_feature_bytes": sum(k.get("feature_ddr_bytes", 0) for k in kernels),
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


def render_fusions(fusions: list[dict], limit: int = 12) -> list[str]:
    """One line per fused kernel: ``conv (+bn, add, relu): fold, eltwise_epilogue, ...``."""
    lines = [f"- {g['kernel']} (+{', '.join(g['nodes'])}): {', '.join(g['rules'])}"
             for g in fusions[:limit]]
    if len(fusions) > limit:
        lines.append(f"- ... {len(fusions) - limit} more (see the JSON report)")
    return lines


def render_text(est: dict) -> str:
    """Per-kernel table and summary, headed and footed by the estimate label."""
    s = est["summary"]
    lines = [est["label"], "",
             "| # | layer | op | device | precision | GMACs | padding | MiB from DDR | bound | "
             "est. us |", "|---|---|---|---|---|---|---|---|---|---|"]
    for i, k in enumerate(est["kernels"]):
        name = k["node"] + (f" (+{', '.join(k['fused'])})" if k["fused"] else "")
        precision = "int8" if k["int8"] else "fp16" if k["device"] == Device.NPU else "fp32"
        lines.append(f"| {i} | {name} | {k['op']} | {k['device']} | {precision} | "
                     f"{k['macs'] / 1e9:.4f} | {k['padding_waste']:.0%} | "
                     f"{_mb(k['ddr_bytes'])} | {k['bound']} | {k['time_us']:.1f} |")
    for x in est["transfers"]:
        lines.append(f"| - | transfer {x['tensor']} | copy | {x['from']}->{x['to']} | - | - | - "
                     f"| {_mb(x['bytes'])} | transfer | {x['time_us']:.1f} |")
    band_ms = s.get("band_ms") or (s["total_ms"], s["total_ms"])
    lines += ["", f"estimated total: {format_ms(s['total_ms'], band_ms)} (NPU "
              f"{s['npu_ms']:.3f}, CPU {s['cpu_ms']:.3f}, CPU<->NPU transfers "
              f"{s['transfer_ms']:.3f}); "
              f"{s['kernels']} kernels ({s['int8_kernels']} INT8, {s['cpu_kernels']} on CPU; "
              f"{s['compute_bound']} compute-bound, {s['memory_bound']} memory-bound on NPU)",
              f"work: {s['gmacs']:.3f} GMACs, {s['padded_gmacs']:.3f} after channel padding "
              f"({s['padding_waste']:.1%} padding waste)",
              f"memory estimate: weights {_mb(s['weight_bytes'])} MiB + peak live activations "
              f"{_mb(s['peak_activation_bytes'])} MiB = {_mb(s['peak_memory_bytes'])} MiB",
              "slowest: " + ", ".join(f"{t['node']} {t['time_us']:.0f} us ({t['share']:.0%}, "
                                      f"{t['bound']})" for t in est["top_time"])]
    if est.get("fusions"):
        lines += [f"fused kernels ({len(est['fusions'])}; rules in the profile's fusions):"]
        lines += render_fusions(est["fusions"])
    if est["top_padding"]:
        lines.append("most padding: " + ", ".join(
            f"{t['node']} {t['padding_waste']:.0%} ({t['wasted_gmacs']:.3f} GMACs)"
            for t in est["top_padding"]))
    if s["shape_unknown"]:
        lines.append(f"shapes unknown for {len(s['shape_unknown'])} kernels (costed as 0): "
                     + ", ".join(s["shape_unknown"][:6]) + " ... pass --input_shape")
    lines += ["", est["label"]]
    return "\n".join(lines)
