"""dopt's NASEA search space: one searchable layer per ``filters``/``strides`` entry.

Each layer picks a block a mobile NPU runs well and an output width around its ``filters``
value. Widths are multiples of the hardware profile's FP16 channel block (16 for the
default profile, ``alignment.fp16_channel_block``) so no convolution pays for channel
padding in FP16; under an INT8 latency budget the cost model prices the 32-channel INT8
block, so the search itself learns to prefer multiples of 32 where that pays. The last
searchable layer keeps exactly its ``filters`` width and every stride is the user's, so the
user's ``PreNet``/``PostNet`` fit every candidate. Framework-free: the adapters build the
blocks named here (``docs/nas.md`` describes each).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

#: block name -> (kind, kernel, expand ratio); "identity" passes its input through
BLOCKS: dict[str, tuple[str, int, int]] = {
    "conv3x3": ("conv", 3, 1),
    "dwsep": ("dwsep", 3, 1),
    "basic": ("basic", 3, 1),
    "bottleneck": ("bottleneck", 3, 1),
    "ir_k3_e3": ("ir", 3, 3),
    "ir_k3_e6": ("ir", 3, 6),
    "ir_k5_e3": ("ir", 5, 3),
    "ir_k5_e6": ("ir", 5, 6),
    "identity": ("identity", 0, 0),
}


def align_up(c: float, block: int) -> int:
    return max(block, int(math.ceil(c / block)) * block)


def align_near(c: float, block: int) -> int:
    return max(block, int(math.floor(c / block + 0.5)) * block)


def hidden_width(block: str, cin: int, cout: int, align: int) -> int:
    """Inner width of a block: expanded for inverted residuals, a quarter for bottlenecks."""
    kind, _, e = BLOCKS[block]
    if kind == "ir":
        return align_up(cin * e, align)
    if kind == "bottleneck":
        return align_up(cout / 4, align)
    return cout


@dataclass(frozen=True)
class LayerChoice:
    index: int
    filters: int
    stride: int
    widths: tuple[int, ...]
    blocks: tuple[str, ...]


class SearchSpace:
    """The choices per layer, and the decoding of a choice into a concrete architecture.

    An architecture is a tuple of ``(block, cin, cout, stride)`` per searchable layer;
    ``identity`` keeps ``cout == cin``.
    """

    def __init__(self, filters, strides, in_channels: int, align: int,
                 width_multipliers=(0.5, 0.75, 1.0, 1.25), fixed=()):
        """``fixed``: layers whose output PostNet reads besides the last (``feature_choose``);
        they keep exactly their ``filters`` width, like the last layer."""
        self.filters, self.strides = list(filters), list(strides)
        self.in_channels, self.align = int(in_channels), int(align)
        self.layers: list[LayerChoice] = []
        last = len(self.filters) - 1
        exact = set(fixed or ()) | {last}
        for i, (f, s) in enumerate(zip(self.filters, self.strides)):
            if i in exact:
                widths = (f,)
            else:
                widths = tuple(sorted({align_near(f * m, align) for m in width_multipliers}))
            blocks = tuple(b for b in BLOCKS if b != "identity" or (s == 1 and i not in exact))
            self.layers.append(LayerChoice(i, f, s, widths, blocks))
        # widest input each layer can see (identity carries its input width on)
        self.cap_in: list[int] = []
        c = self.in_channels
        for lay in self.layers:
            self.cap_in.append(c)
            c = max(max(lay.widths), c) if "identity" in lay.blocks else max(lay.widths)

    def __len__(self) -> int:
        return len(self.layers)

    def size(self) -> int:
        """How many distinct architectures the space holds (identity ignores its width)."""
        n = 1
        for lay in self.layers:
            n *= sum(1 if b == "identity" else len(lay.widths) for b in lay.blocks)
        return n

    def decode(self, choice) -> tuple:
        """``[(block, width), ...]`` -> ``((block, cin, cout, stride), ...)``."""
        if len(choice) != len(self.layers):
            raise ValueError(f"{len(choice)} layer choices for a {len(self.layers)}-layer space")
        out, cin = [], self.in_channels
        for lay, (block, width) in zip(self.layers, choice):
            if block not in lay.blocks:
                raise ValueError(f"layer {lay.index}: block {block!r} not in {lay.blocks}")
            if block == "identity":
                cout = cin
            else:
                if int(width) not in lay.widths:
                    raise ValueError(f"layer {lay.index}: width {width} not in {lay.widths}")
                cout = int(width)
            out.append((block, cin, cout, lay.stride))
            cin = cout
        return tuple(out)

    def from_params(self, params: dict) -> tuple:
        """An Optuna trial's ``{"L0_block": ..., "L0_width": ...}`` -> architecture."""
        return self.decode([(params[f"L{i}_block"], params.get(f"L{i}_width", lay.widths[0]))
                            for i, lay in enumerate(self.layers)])

    def to_params(self, arch) -> dict:
        out = {}
        for i, (block, _cin, cout, _s) in enumerate(arch):
            out[f"L{i}_block"] = block
            out[f"L{i}_width"] = cout if block != "identity" else self.layers[i].widths[0]
        return out

    @staticmethod
    def key(arch) -> str:
        """A stable text form: ``ir_k3_e6:32|identity:32|...``."""
        return "|".join(f"{b}:{cout}" for b, _cin, cout, _s in arch)

    def parse_key(self, key: str) -> tuple:
        parts = key.split("|")
        return self.decode([(p.split(":")[0], int(p.split(":")[1])) for p in parts])

    def uniform(self, block: str, narrow: bool = True) -> tuple:
        """Every layer the same block where allowed (else ``dwsep``), narrowest or widest."""
        choice = []
        for lay in self.layers:
            b = block if block in lay.blocks else "dwsep"
            choice.append((b, lay.widths[0] if narrow else lay.widths[-1]))
        return self.decode(choice)

    def describe(self) -> list[dict]:
        return [{"layer": lay.index, "filters": lay.filters, "stride": lay.stride,
                 "widths": list(lay.widths), "blocks": list(lay.blocks),
                 "max_in": self.cap_in[lay.index]} for lay in self.layers]
