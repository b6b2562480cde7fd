"""Render the user manual's supported-operator table from a hardware profile.

The doc is generated, never hand-edited, so it cannot drift from what the compiler checks;
a test compares ``docs/npu_operators.md`` with this output.
Usage: ``python -m dopt.npu.optable > docs/npu_operators.md``.
"""
from __future__ import annotations

import sys

from .profile import DEFAULT_PROFILE, HardwareProfile, load_profile
from .rules import LOW_STARS, rule_text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("*", "\\*").replace("\n", " ")


def render_markdown(profile: HardwareProfile) -> str:
    a = profile.alignment
    lines = [
        "# NPU supported operators",
        "",
        f"_Generated from hardware profile `{profile.name}` version {profile.version} by "
        "`python -m dopt.npu.optable > docs/npu_operators.md`; do not edit by hand._",
        "",
        "## Alignment",
        "",
        f"- FP16 convolutions are fastest when Cin and Cout are multiples of "
        f"{a['fp16_channel_block']} (channel block C0); other sizes are padded.",
        f"- INT8 convolutions (QuantizedConvolution) are fastest when Cin and Cout are multiples "
        f"of {a['int8_channel_block']}.",
        f"- {rule_text('int8_min_cin', profile)}",
        f"- ConcatD/SplitD are eliminated (done in place) when channel offsets are multiples of "
        f"{a['concat_split_inplace_block']}.",
        "- Convolution/ConvolutionDepthwise followed by BNInference, Scale or BiasAdd is fused "
        "into one convolution; shape-only operators are removed at build time.",
        f"- Recommendation is the reference performance guide's 1-5 stars; operators with "
        f"{LOW_STARS} stars or fewer run but are reported as degraded.",
        "",
        "## Operators",
        "",
        "| Operator | Category | Recommendation | INT8 form | Notes |",
        "|:--|:--|:--|:--|:--|",
    ]
    for name, op in profile.operators.items():
        form = op["int8_form"] or ("(is INT8)" if op.get("int8") else "—")
        lines.append(f"| {_cell(name)} | {op['category']} | {'★' * op['stars']} | "
                     f"{_cell(form)} | {_cell(op['guide_en'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render_markdown(load_profile(argv[0] if argv else DEFAULT_PROFILE))
    sys.stdout.buffer.write(text.encode("utf-8"))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
