"""Weight sharing and path sampling of the NASEA supernet, written once for every framework.

A supernet layer holds one block per *family* at the widest size it can be asked for.
Blocks that are sub-structures of another share its weights (elastic kernel, expansion and
depth, as Once-for-All): the four inverted residuals and the depthwise-separable block are
one family (a 3x3 depthwise kernel is the centre of the 5x5 one, expansion 3 the leading
hidden channels of expansion 6, ``dwsep`` the expansion-1 member: depthwise on the input,
then the projection), and the plain 3x3 convolution is the first convolution of the basic
residual block. The adapters build the blocks; this module says which family holds a
block, which family unit each of its units reads, how wide each unit is, how every unit is
priced, and which paths a training step trains.
"""
from __future__ import annotations

import math
import random

from .space import BLOCKS, SearchSpace, hidden_width

#: block kind -> (family block kind, {static unit: family unit}) for blocks that live inside
#: another block's weights; every other kind is its own family with the same unit names
MEMBER_OF = {"dwsep": ("ir", {"dw": "dw", "pw": "proj"}),
             "conv": ("basic", {"c": "c1"})}


def group(block: str) -> str:
    """The supernet block (family) that holds ``block``'s weights."""
    kind = BLOCKS[block][0]
    return MEMBER_OF.get(kind, (kind,))[0]


def unit_map(block: str) -> dict:
    """Static unit name -> the family unit whose weights it slices (same name if absent)."""
    kind = BLOCKS[block][0]
    return MEMBER_OF[kind][1] if kind in MEMBER_OF else {}


def layer_spec(block: str, cin: int, cout: int, stride: int, align: int) -> tuple:
    """``(kind, cin, hidden, cout, kernel, stride)`` of one searchable layer."""
    kind, k, _e = BLOCKS[block]
    return (kind, cin, hidden_width(block, cin, cout, align), cout, k, stride)


def families(space: SearchSpace) -> list[dict[str, tuple]]:
    """Per searchable layer, the shared block of each family at the size that covers every
    member and width: ``{family: (cin, hidden, cout, kernel, stride)}``."""
    out = []
    for lay, cap in zip(space.layers, space.cap_in):
        wide = max(lay.widths)
        fams = {}
        for g in dict.fromkeys(group(b) for b in lay.blocks):
            members = [b for b in lay.blocks if group(b) == g]
            # inner widths grow with cin and cout: the widest covers every sub-net
            hid = max(hidden_width(b, cap, wide, space.align) for b in members) \
                if g != "identity" else 0
            hid = max(hid, cap)  # dwsep runs the family's depthwise on the input
            fams[g] = (cap, hid, wide, max(BLOCKS[b][1] for b in members), lay.stride)
        out.append(fams)
    return out


def activate(block, member: str, cin: int, cout: int, align: int, shared_units) -> None:
    """Set the shared family ``block`` to run ``member`` from ``cin`` to ``cout`` channels.

    Every unit of the family has ``act``, ``active_out``, ``active_k``, ``active_act`` and
    ``k_max`` (its widest kernel); ``shared_units`` lists them. A ``dwsep`` member runs the
    family's depthwise and projection (the projection then with its ReLU), a ``conv``
    member the basic family's first convolution alone."""
    hid = hidden_width(member, cin, cout, align)
    for name, which in block.WIDTHS.items():
        unit = getattr(block, name)
        if unit is not None:
            unit.active_out = hid if which == "hid" else cout
    for unit in shared_units:
        unit.active_act = unit.act
        if unit.k_max > 1:
            unit.active_k = BLOCKS[member][1]
    kind = BLOCKS[member][0]
    if kind == "dwsep":
        block.proj.active_out, block.proj.active_act = cout, True
    elif kind == "conv":
        block.c1.active_out = cout


def units(spec) -> list[tuple]:
    """The conv + BN units of one layer spec, in order:
    ``(name, cin, cout, kernel, stride, depthwise)``."""
    kind, cin, hid, cout, k, s = spec
    short = [("shortcut", cin, cout, 1, s, False)] if s != 1 or cin != cout else []
    return {
        "conv": [("c", cin, cout, k, s, False)],
        "dwsep": [("dw", cin, cin, k, s, True), ("pw", cin, cout, 1, 1, False)],
        "basic": [("c1", cin, cout, k, s, False), ("c2", cout, cout, k, 1, False)] + short,
        "bottleneck": [("a", cin, hid, 1, 1, False), ("b", hid, hid, k, s, False),
                       ("c", hid, cout, 1, 1, False)] + short,
        "ir": [("exp", cin, hid, 1, 1, False), ("dw", hid, hid, k, s, True),
               ("proj", hid, cout, 1, 1, False)],
        "identity": [],
    }[kind]


def backbone_cost(specs, height: int, width: int) -> dict:
    """``{"params", "macs"}`` of the searched layers on a ``height x width`` input map:
    convolution weights (no bias) and BatchNorm scale and shift, the way both frameworks
    count trainable parameters; "same" padding, so a stride-s layer outputs ceil(size / s)."""
    params = macs = 0
    for spec in specs:
        size = (height, width)                    # the running map through the block
        for name, cin, cout, k, s, dw in units(spec):
            h, w = (height, width) if name == "shortcut" else size
            out = (math.ceil(h / s), math.ceil(w / s))
            weights = k * k * cin * (1 if dw else cout)
            params += weights + 2 * cout
            macs += out[0] * out[1] * weights
            if name != "shortcut":
                size = out
        height, width = size
    return {"params": int(params), "macs": int(macs)}


def fair_paths(space: SearchSpace, rng: random.Random) -> list:
    """Strict fairness (FairNAS) with the sandwich rule for widths: as many paths as the
    largest layer has blocks, each layer's blocks shuffled over them (layers with fewer
    blocks draw the rest at random), so every block of every layer is trained every step;
    the first path takes every layer's widest width, the second the narrowest, the others
    uniform widths (BigNAS / Once-for-All)."""
    m = max(len(lay.blocks) for lay in space.layers)
    columns = []
    for lay in space.layers:
        seq = list(lay.blocks)
        rng.shuffle(seq)
        columns.append(seq + [rng.choice(lay.blocks) for _ in range(m - len(seq))])
    paths = []
    for j in range(m):
        choice = []
        for lay, seq in zip(space.layers, columns):
            w = lay.widths[-1] if j == 0 else lay.widths[0] if j == 1 \
                else rng.choice(lay.widths)
            choice.append((seq[j], w))
        paths.append(space.decode(choice))
    return paths


def sample(space: SearchSpace, rng: random.Random) -> tuple:
    """A uniformly random path: block, then width, per layer."""
    return space.decode([(rng.choice(lay.blocks), rng.choice(lay.widths))
                         for lay in space.layers])
