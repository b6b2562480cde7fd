"""Placement rules: each a small function returning a finding (or None when it passes).

One registry drives the pre-check report, the partitioner and the tests. A finding
carries the outcome it implies, the offending values and a fix hint. Outcomes, from
strongest to weakest: ``cpu`` (falls back), ``fused`` (folded away at build time),
``npu_degraded`` (runs on the NPU, below its best), else ``npu``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .lower import IRGraph, IRNode
from .profile import HardwareProfile

CPU, FUSED, DEGRADED, NPU = "cpu", "fused", "npu_degraded", "npu"
PRECEDENCE = {CPU: 3, FUSED: 2, DEGRADED: 1, NPU: 0}
CONV_OPS = ("Convolution", "ConvolutionDepthwise", "ConvTranspose")


@dataclass
class Finding:
    rule: str
    outcome: str
    message: str
    values: dict = field(default_factory=dict)
    hint: str = ""


@dataclass
class Context:
    graph: IRGraph
    profile: HardwareProfile
    int8_nodes: frozenset = frozenset()


RULES: list[tuple[str, Callable[[IRNode, Context], Finding | None]]] = []


def int8_skipped(cin: int, groups: int, profile: HardwareProfile) -> bool:
    """The NPU runs this convolution in FP16 even when INT8 is asked: Cin too small to pay.

    Depthwise convolutions (groups == Cin > 1) are exempt. Framework adapters call this
    too, so that their simulation skips the same layers.
    """
    depthwise = groups > 1 and groups == cin
    return not depthwise and 0 < cin < profile.alignment["int8_min_cin"]


def int8_skip_reason(cin: int, profile: HardwareProfile) -> str:
    """Why a layer ``int8_skipped`` stays float, in the words adapters log."""
    return f"Cin={cin} <= {profile.alignment['int8_min_cin'] - 1}: the NPU runs it in FP16"


def int8_requested_but_too_narrow(n: IRNode, ctx: Context) -> bool:
    """INT8 asked for a convolution the NPU will run in FP16 (see ``int8_skipped``)."""
    return (n.name in ctx.int8_nodes and n.op in CONV_OPS
            and int8_skipped(n.attrs.get("cin", 0), n.attrs.get("groups", 1), ctx.profile))


def runs_int8(n: IRNode, ctx: Context) -> bool:
    return n.name in ctx.int8_nodes and not int8_requested_but_too_narrow(n, ctx)


def rule(name: str):
    def register(fn):
        RULES.append((name, fn))
        return fn
    return register


def pad_channels(c: int, block: int) -> int:
    """``c`` rounded up to the hardware's channel block."""
    return -(-c // block) * block


def padding_waste(cin: int, cout: int, block: int, depthwise: bool = False) -> float:
    """Share of MACs spent on channel padding when channels round up to ``block``."""
    if cin <= 0 or cout <= 0:
        return 0.0
    if depthwise:
        return 1.0 - cout / pad_channels(cout, block)
    return 1.0 - (cin * cout) / (pad_channels(cin, block) * pad_channels(cout, block))


@rule("unsupported_op")
def unsupported_op(n: IRNode, ctx: Context):
    if n.op is None or ctx.profile.op(n.op) is None:
        return Finding("unsupported_op", CPU, f"no NPU operator for ONNX {n.onnx_op}",
                       {"onnx_op": n.onnx_op},
                       "express it with supported operators (see docs/npu_operators.md) or "
                       "accept the CPU partition")


@rule("fused_into_conv")
def fused_into_conv(n: IRNode, ctx: Context):
    if n.fused_into:
        return Finding("fused_into_conv", FUSED,
                       f"{n.attrs.get('fused_as', n.op)} folded into {n.fused_into}",
                       {"into": n.fused_into}, "none needed: folded into the convolution's "
                       "weights and bias at build time, at no run-time cost")


@rule("shape_only")
def shape_only(n: IRNode, ctx: Context):
    if n.op and ctx.profile.is_shape_only(n.op):
        return Finding("shape_only", FUSED, f"{n.op} only changes the shape: removed at build",
                       {}, "none needed: the data is reinterpreted in place")


@rule("int8_min_cin")
def int8_min_cin(n: IRNode, ctx: Context):
    min_cin = ctx.profile.alignment["int8_min_cin"]
    if int8_requested_but_too_narrow(n, ctx):
        return Finding("int8_min_cin", DEGRADED,
                       f"INT8 skipped: Cin {n.attrs['cin']} <= {min_cin - 1}, the layer runs "
                       f"in FP16",
                       {"cin": n.attrs["cin"]},
                       "INT8 pays from Cin > 16; leave this layer float in the config")


@rule("conv_channel_alignment")
def conv_channel_alignment(n: IRNode, ctx: Context):
    if n.op not in CONV_OPS or n.attrs.get("cin", -1) <= 0:
        return None
    int8 = runs_int8(n, ctx)
    block = ctx.profile.channel_block(int8)
    cin, cout = n.attrs["cin"], n.attrs["cout"]
    dw = n.op == "ConvolutionDepthwise"
    bad = [c for c in ((cout,) if dw else (cin, cout)) if c % block]
    if bad:
        waste = padding_waste(cin, cout, block, dw)
        return Finding("conv_channel_alignment", DEGRADED,
                       f"{'INT8' if int8 else 'FP16'} convolution channels not a multiple of "
                       f"{block}: {waste:.0%} of MACs are padding",
                       {"cin": cin, "cout": cout, "block": block,
                        "padding_waste": round(waste, 4)},
                       f"use channel counts that are multiples of {block}")


def _channel_sizes(dims_list, axis):
    sizes = []
    for d in dims_list:
        if not d or len(d) <= axis or d[axis] <= 0:
            return None
        sizes.append(d[axis])
    return sizes


@rule("concat_split_in_place")
def concat_split_in_place(n: IRNode, ctx: Context):
    if n.op not in ("ConcatD", "SplitD"):
        return None
    block = ctx.profile.alignment["concat_split_inplace_block"]
    dims = n.attrs.get("input_dims" if n.op == "ConcatD" else "output_dims") or []
    axis = n.attrs.get("axis", 1)
    rank = len(dims[0]) if dims and dims[0] else 0
    axis = axis + rank if axis < 0 else axis
    if rank != 4 or axis != 1:
        return None
    sizes = _channel_sizes(dims, axis)
    if sizes is None:
        return None
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    bad = [o for o in offsets + [sum(sizes)] if o % block]
    if bad:
        return Finding("concat_split_in_place", DEGRADED,
                       f"{n.op} not in place: channel offsets {offsets} are not multiples of "
                       f"{block}", {"channels": sizes, "offsets": offsets, "block": block},
                       f"make every branch's channel count a multiple of {block}")


@rule("low_recommendation")
def low_recommendation(n: IRNode, ctx: Context):
    entry = n.op and ctx.profile.op(n.op)
    if entry and entry["stars"] <= 2:
        return Finding("low_recommendation", DEGRADED,
                       f"{n.op} is rated {'☆' * entry['stars']} by the operator guide: "
                       f"{entry['guide_en']}", {"stars": entry["stars"]},
                       "avoid it on the hot path or replace it with a better-rated operator")


def evaluate(n: IRNode, ctx: Context) -> tuple[str, list[Finding]]:
    findings = [f for _, fn in RULES if (f := fn(n, ctx)) is not None]
    outcome = max((f.outcome for f in findings), key=PRECEDENCE.get, default=NPU)
    return outcome, findings
