"""Placement rules: each a small function, registered once, that a node passes or fails.

The function's name is the rule id and its docstring is the rule text, a template filled
from the hardware profile (``rule_text``), so the report, the docs and the code cannot
disagree. A rule returns ``None`` when the node passes (or the rule does not apply) and
``fail(message, **values)`` with the offending values when it does not; the registry turns
that into a ``Finding`` carrying the rule's outcome and fix hint. One registry drives the
pre-check report, the partitioner and the tests; ``python -m dopt.npu.rules --list``
prints it and ``--write-doc`` writes it into ``docs/npu_precheck.md``.
"""
from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from ..errors import DoptError, run_cli
from ..formats.fileio import existing_file
from ..quant.numerics import FP16_DRIFT_TOLERANCE, FP16_MAX, FP16_MIN_NORMAL
from .fp16range import detail as fp16_detail
from .fp16range import problem as fp16_problem
from .lower import IRGraph, IRNode
from .profile import DEFAULT_PROFILE, HardwareProfile, load_profile

CONV_OPS = ("Convolution", "ConvolutionDepthwise", "ConvTranspose")
LOW_STARS = 2  # operators the guide rates this many stars or fewer are reported as degraded
DOC_BEGIN, DOC_END = "<!-- rules:begin -->", "<!-- rules:end -->"


class Device(str, Enum):
    """Where a kernel runs; the values are what reports and ``.om`` kernels hold."""

    CPU = "cpu"
    NPU = "npu"

    __str__ = str.__str__
    __format__ = str.__format__


class Outcome(str, Enum):
    """A node's placement, strongest first; the values are what reports and ``.om`` files hold.

    A ``str`` enum, so report and file values read back as plain strings compare equal.
    """

    CPU = "cpu"                 # falls back to the CPU
    FUSED = "fused"             # folded away at build time
    DEGRADED = "npu_degraded"   # runs on the NPU, below its best
    NPU = "npu"                 # runs on the NPU at its best

    __str__ = str.__str__
    __format__ = str.__format__

    @property
    def device(self) -> Device:
        """The device the node's kernel runs on; a fused node's host decides where it lives."""
        return Device.CPU if self is Outcome.CPU else Device.NPU


CPU, FUSED, DEGRADED, NPU = Outcome


def strongest(outcomes: Iterable[Outcome]) -> Outcome:
    """The outcome that decides a node's placement: the first in ``Outcome`` order, else NPU."""
    order = list(Outcome)
    return min(outcomes, key=order.index, default=NPU)


@dataclass
class Finding:
    rule: str
    outcome: Outcome
    message: str
    values: dict = field(default_factory=dict)
    hint: str = ""

    def as_dict(self) -> dict:
        """The report's JSON form (plain strings: consumers read the keys, not the enum)."""
        return {"rule": self.rule, "outcome": self.outcome.value, "message": self.message,
                "values": self.values, "hint": self.hint}


@dataclass(frozen=True)
class Failed:
    """What a rule returns when a node breaks it: its own message and the offending values."""

    message: str
    values: dict = field(default_factory=dict)


def fail(message: str, **values) -> Failed:
    return Failed(message, values)


@dataclass
class Context:
    graph: IRGraph
    profile: HardwareProfile
    int8_nodes: frozenset = frozenset()
    fp16_ranges: dict = field(default_factory=dict)   # kernel -> measured output (fp16range)
    fp16_drift: dict = field(default_factory=dict)    # fp16range.measure_drift's result


class _Unfilled(dict):
    """Leaves a node-specific placeholder visible when a template is rendered without a node."""

    def __missing__(self, key):
        return f"`{key}`"


def profile_facts(profile: HardwareProfile) -> dict:
    """The values rule texts and hints may name: the profile's alignment and what derives."""
    facts = {k: v for k, v in profile.alignment.items() if k != "notes"}
    facts["low_stars"] = LOW_STARS
    facts["shape_only_ops"] = ", ".join(n for n in profile.operators if profile.is_shape_only(n))
    facts["fp16_max"] = f"{FP16_MAX:g}"
    facts["fp16_min_normal"] = f"{FP16_MIN_NORMAL:.2g}"
    facts["fp16_drift_tolerance"] = f"{FP16_DRIFT_TOLERANCE:g}"
    return facts


def _render(template: str, facts: dict) -> str:
    """A template on one line (docstrings wrap), its placeholders filled from ``facts``."""
    return " ".join(inspect.cleandoc(template).split()).format_map(_Unfilled(facts))


@dataclass(frozen=True)
class Rule:
    """A registered rule; its id and text come from the function, never a second copy."""

    check: Callable[[IRNode, Context], Failed | None]
    outcome: Outcome
    hint: str

    @property
    def id(self) -> str:
        return self.check.__name__

    def text(self, profile: HardwareProfile) -> str:
        """The rule in words, numbers from ``profile`` (empty under ``python -OO``)."""
        return _render(self.check.__doc__ or "", profile_facts(profile))

    def fix(self, profile: HardwareProfile, values: dict | None = None) -> str:
        """The fix hint; without a node's ``values`` their placeholders stay named."""
        return _render(self.hint, {**profile_facts(profile), **(values or {})})

    def __call__(self, n: IRNode, ctx: Context) -> Finding | None:
        failed = self.check(n, ctx)
        if failed is None:
            return None
        return Finding(self.id, self.outcome, failed.message, failed.values,
                       self.fix(ctx.profile, failed.values))


RULES: dict[str, Rule] = {}


def rule(outcome: Outcome, hint: str):
    """Register a rule under its function's name, in evaluation (and report) order."""
    def register(fn):
        if fn.__name__ in RULES:
            raise ValueError(f"placement rule '{fn.__name__}' is registered twice")
        RULES[fn.__name__] = Rule(fn, outcome, hint)
        return fn
    return register


def rule_text(rule_id: str, profile: HardwareProfile) -> str:
    return RULES[rule_id].text(profile)


def int8_skipped(cin: int, groups: int, profile: HardwareProfile) -> bool:
    """The NPU runs this convolution in FP16 even when INT8 is asked: Cin too small to pay.

    Depthwise convolutions (groups == Cin > 1) are exempt. Framework adapters call this
    too, so that their simulation skips the same layers.
    """
    depthwise = groups > 1 and groups == cin
    return not depthwise and 0 < cin < profile.alignment["int8_min_cin"]


def int8_skip_reason(cin: int, profile: HardwareProfile) -> str:
    """Why a layer ``int8_skipped`` stays float, in the words adapters log and reports show."""
    return f"Cin={cin} <= {profile.alignment['int8_min_cin'] - 1}: the NPU runs it in FP16"


def int8_requested_but_too_narrow(n: IRNode, ctx: Context) -> bool:
    """INT8 asked for a convolution the NPU will run in FP16 (see ``int8_skipped``)."""
    return (n.name in ctx.int8_nodes and n.op in CONV_OPS
            and int8_skipped(n.attrs.get("cin", 0), n.attrs.get("groups", 1), ctx.profile))


def runs_int8(n: IRNode, ctx: Context) -> bool:
    return n.name in ctx.int8_nodes and not int8_requested_but_too_narrow(n, ctx)


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


@rule(CPU, hint="express it with supported operators (see docs/npu_operators.md) or accept "
               "the CPU partition")
def unsupported_op(n: IRNode, ctx: Context) -> Failed | None:
    """The hardware profile must have an NPU operator for the node's ONNX operator; a node
    without one falls back to the CPU."""
    if n.op is None or ctx.profile.op(n.op) is None:
        return fail(f"no NPU operator for ONNX {n.onnx_op}", onnx_op=n.onnx_op)


@rule(FUSED, hint="none needed: folded into the convolution's weights and bias at build time, "
                 "at no run-time cost")
def fused_into_conv(n: IRNode, ctx: Context) -> Failed | None:
    """BatchNormalization, a per-channel Mul (Scale) or a per-channel Add (BiasAdd) right
    after a convolution (or after one already folded into it) is folded into that
    convolution."""
    if n.fused_into:
        return fail(f"{n.attrs.get('fused_as', n.op)} folded into {n.fused_into}",
                    into=n.fused_into)


@rule(FUSED, hint="none needed: the data is reinterpreted in place")
def shape_only(n: IRNode, ctx: Context) -> Failed | None:
    """Operators that only change the shape ({shape_only_ops}; Identity, Dropout and a Flatten
    of a 1×1 map lower to Reshape) are removed at build time."""
    if n.op and ctx.profile.is_shape_only(n.op):
        return fail(f"{n.op} only changes the shape: removed at build")


@rule(DEGRADED, hint="leave this layer float in the config: the NPU runs it in FP16 either way")
def int8_min_cin(n: IRNode, ctx: Context) -> Failed | None:
    """INT8 only pays when Cin >= {int8_min_cin}; smaller layers stay FP16."""
    if int8_requested_but_too_narrow(n, ctx):
        cin = n.attrs["cin"]
        return fail(f"INT8 skipped ({int8_skip_reason(cin, ctx.profile)})", cin=cin)


@rule(DEGRADED, hint="use channel counts that are multiples of {block}")
def conv_channel_alignment(n: IRNode, ctx: Context) -> Failed | None:
    """Convolution channels (Cin and Cout; Cout alone for depthwise) should be multiples of
    {fp16_channel_block} in FP16 and {int8_channel_block} in INT8; other sizes are padded,
    and the padding costs MACs."""
    if n.op not in CONV_OPS or n.attrs.get("cin", -1) <= 0:
        return None
    int8 = runs_int8(n, ctx)
    block = ctx.profile.channel_block(int8)
    cin, cout = n.attrs["cin"], n.attrs["cout"]
    dw = n.op == "ConvolutionDepthwise"
    if any(c % block for c in ((cout,) if dw else (cin, cout))):
        waste = padding_waste(cin, cout, block, dw)
        return fail(f"{'INT8' if int8 else 'FP16'} convolution channels not a multiple of "
                    f"{block}: {waste:.0%} of MACs are padding",
                    cin=cin, cout=cout, block=block, padding_waste=round(waste, 4))


def _channel_sizes(dims_list, axis):
    sizes = []
    for d in dims_list:
        if not d or len(d) <= axis or d[axis] <= 0:
            return None
        sizes.append(d[axis])
    return sizes


@rule(DEGRADED, hint="make every branch's channel count a multiple of {block}")
def concat_split_in_place(n: IRNode, ctx: Context) -> Failed | None:
    """ConcatD/SplitD on the channel axis of a 4-D tensor runs in place (no kernel) only when
    every channel offset is a multiple of {concat_split_inplace_block}."""
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
    if any(o % block for o in offsets + [sum(sizes)]):
        return fail(f"{n.op} not in place: channel offsets {offsets} are not multiples of "
                    f"{block}", channels=sizes, offsets=offsets, block=block)


@rule(DEGRADED, hint="avoid it on the hot path or replace it with a better-rated operator")
def low_recommendation(n: IRNode, ctx: Context) -> Failed | None:
    """Operators the operator guide rates {low_stars} stars or fewer run on the NPU, but
    slowly."""
    entry = n.op and ctx.profile.op(n.op)
    if entry and entry["stars"] <= LOW_STARS:
        return fail(f"{n.op} is rated {'☆' * entry['stars']} by the operator guide: "
                    f"{entry['guide_en']}", stars=entry["stars"])


@rule(DEGRADED, hint="scale this layer down (and the next one up), keep it on the CPU in FP32 "
                    "(exclude it from the NPU), or quantize it to INT8")
def fp16_range(n: IRNode, ctx: Context) -> Failed | None:
    """An NPU kernel's FP16 output must fit IEEE half: |x| <= {fp16_max} (beyond, inf and NaN)
    and not all below {fp16_min_normal} (the smallest normal half; below, the signal drains
    away), and a division's divisor must not hold values FP16 rounds to zero (an epsilon
    such as 1e-12 is 0 in FP16). Measured by one float32 run on sample inputs before
    compiling."""
    info = ctx.fp16_ranges.get(n.name)
    kind = info and fp16_problem(info)
    if kind:
        extra = {"divisor": info["divisor"], "flushed": info["flushed"]} \
            if info.get("flushed") else {}
        return fail(f"FP16 {kind}: output {info['tensor']} ranges over [{info['min']:.3g}, "
                    f"{info['max']:.3g}]" + (f" with {info['nonfinite']} non-finite value(s)"
                                            if info["nonfinite"] else "")
                    + " on the sample inputs" + fp16_detail(info), kind=kind,
                    tensor=info["tensor"], range=[info["min"], info["max"]], amax=info["amax"],
                    **extra)


@rule(DEGRADED, hint="check the accuracy on real data before deploying in FP16 (the accuracy gate of "
                    "dopt deploy measures it), or keep this layer and the ones after it on "
                    "the CPU in FP32 (exclude them from the NPU)")
def fp16_drift(n: IRNode, ctx: Context) -> Failed | None:
    """The network's outputs must stay within {fp16_drift_tolerance} of their range (max
    |FP16 - FP32| / max |FP32|) when every NPU kernel rounds its output to FP16; where they do
    not, the kernel at which the drift first passes that bound is named. Measured by running
    the graph on sample inputs in float32 and, beside it, with FP16 kernel outputs."""
    d = ctx.fp16_drift
    if not d or d.get("first") != n.name:
        return None
    out, worst = max(d["outputs"].items(), key=lambda kv: kv[1])
    here = d["kernels"].get(n.name, 0.0)
    return fail(f"FP16 drift: with every NPU kernel's output in FP16, the network output {out} "
                f"moves by {worst:.2g} of its range on the sample inputs (bound "
                f"{d['tolerance']:g}); the drift first passes the bound here ({here:.2g})",
                output=out, drift=worst, drift_here=here, tolerance=d["tolerance"])


def evaluate(n: IRNode, ctx: Context) -> tuple[Outcome, list[Finding]]:
    findings = [f for r in RULES.values() if (f := r(n, ctx)) is not None]
    return strongest(f.outcome for f in findings), findings


# -- the registry as a document ------------------------------------------------------------
def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(profile: HardwareProfile) -> str:
    """The registry as a markdown table, rule texts and hints filled from ``profile``."""
    lines = ["| rule | outcome | rule text | fix hint |", "|---|---|---|---|"]
    for r in RULES.values():
        lines.append(f"| `{r.id}` | `{r.outcome.value}` | {_cell(r.text(profile))} | "
                     f"{_cell(r.fix(profile))} |")
    return "\n".join(lines) + "\n"


def render_text(profile: HardwareProfile) -> str:
    lines = []
    for r in RULES.values():
        lines += [f"{r.id} ({r.outcome.value}): {r.text(profile)}", f"  fix: {r.fix(profile)}"]
    return "\n".join(lines) + "\n"


def _split_doc(doc: str, path: str | None = None) -> tuple[str, str, str]:
    """(text up to the begin marker's line, the table, the end marker onwards)."""
    head, begin, rest = doc.partition(DOC_BEGIN + "\n")
    table, end, tail = rest.partition(DOC_END)
    if not begin or not end:
        raise DoptError("the doc has no rule table markers", file=path,
                        expected=f"a line {DOC_BEGIN} and, below it, {DOC_END}",
                        hint="add both marker lines where the table belongs")
    return head + begin, table, end + tail


def doc_table(doc: str) -> str:
    """The text between the rule-table markers of a doc."""
    return _split_doc(doc)[1]


def write_doc(path: str, profile: HardwareProfile) -> None:
    """Replace the table between the markers of ``path`` with the registry's."""
    p = existing_file(path, field="--write-doc", max_bytes=1 << 20, what="doc")
    head, _, tail = _split_doc(p.read_text(encoding="utf-8"), path)
    p.write_text(head + render_markdown(profile) + tail, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dopt.npu.rules",
                                 description="The NPU placement rule registry.")
    ap.add_argument("--list", action="store_true", help="print the registry (the default)")
    ap.add_argument("--profile", default=DEFAULT_PROFILE, help="hardware profile name or path")
    ap.add_argument("--format", choices=("markdown", "text"), default="markdown")
    ap.add_argument("--write-doc", metavar="PATH",
                    help=f"rewrite the table between {DOC_BEGIN} and {DOC_END} in PATH")
    a = ap.parse_args(argv)

    def body() -> int:
        profile = load_profile(a.profile)
        if a.write_doc:
            write_doc(a.write_doc, profile)
            return 0
        text = (render_markdown if a.format == "markdown" else render_text)(profile)
        sys.stdout.buffer.write(text.encode("utf-8"))
        sys.stdout.flush()
        return 0

    return run_cli(ap.prog, body)


if __name__ == "__main__":
    sys.exit(main())
