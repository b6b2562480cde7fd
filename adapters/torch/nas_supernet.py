"""The weight-sharing supernet of dopt's NASEA space, and sub-net extraction.

Every layer holds one block per *family* at the widest size it can be asked for
(``dopt.nas.sharing``: which block lives in which family's weights); a sub-net uses the
first ``cin`` input and first ``cout`` output channels of each weight (and the same slice
of each BatchNorm), so every width trains the same leading channels. A layer trains three
sets of weights (inverted-residual, basic, bottleneck) instead of eight, and the family
members start from each other's features.
``extract`` copies the slices into a plain ``nas_blocks.SearchedNet``.

Training samples paths with strict fairness (``fair_paths``): each step trains a group of
paths in which every block choice of every layer appears, the first at the widest widths
and the second at the narrowest (the sandwich rule), so no block falls behind.
"""
from __future__ import annotations

import copy
import random

import torch
import torch.nn.functional as F
from torch import nn

from dopt.nas.sharing import (activate, fair_paths, families, group, layer_spec, sample,
                               unit_map)
from dopt.nas.space import BLOCKS

from .nas_blocks import ConvBN, SearchedBackbone, SearchedNet, make_block


class SharedConvBN(ConvBN):
    """A ``ConvBN`` of the widest size that runs on its leading channels."""

    def __init__(self, cin, cout, k, stride=1, depthwise=False, act=True):
        super().__init__(cin, cout, k, stride, depthwise, act)
        self.active_out, self.active_k, self.active_act, self.k_max = cout, k, act, k

    def forward(self, x):
        cin = x.shape[1]
        conv, bn = self.conv, self.bn
        if self.depthwise:
            cout, w, groups = cin, conv.weight[:cin], cin
        else:
            cout, w, groups = self.active_out, conv.weight[:self.active_out, :cin], 1
        k = self.active_k
        if k != w.shape[-1]:  # elastic kernel: the centre of the widest one
            o = (w.shape[-1] - k) // 2
            w = w[:, :, o:o + k, o:o + k]
        y = F.conv2d(x, w, None, conv.stride, k // 2, 1, groups)
        y = F.batch_norm(y, bn.running_mean[:cout], bn.running_var[:cout], bn.weight[:cout],
                         bn.bias[:cout], self.training or not bn.track_running_stats,
                         bn.momentum if bn.momentum is not None else 0.1, bn.eps)
        return torch.relu(y) if self.active_act else y


class Supernet(nn.Module):
    """PreNet + one ``ModuleDict`` of shared blocks per searchable layer + PostNet."""

    def __init__(self, space, pre: nn.Module, post: nn.Module, feature_choose=None):
        super().__init__()
        self.space, self.align = space, space.align
        self.pre, self.post = pre, post
        self.feature_choose = list(feature_choose) if feature_choose else None
        self.layers = nn.ModuleList()
        for fams in families(space):
            blocks = nn.ModuleDict()
            for g, (cin, hid, cout, k, stride) in fams.items():
                blocks[g] = make_block(g, cin, hid, cout, k, stride, unit=SharedConvBN,
                                       shared=True)
            self.layers.append(blocks)

    def set_arch(self, arch) -> None:
        self._arch = arch
        for blocks, (b, cin, cout, _s) in zip(self.layers, arch):
            block = blocks[group(b)]
            activate(block, b, cin, cout, self.align,
                     [u for u in block.modules() if isinstance(u, SharedConvBN)])

    def forward(self, x, arch=None):
        if arch is not None:
            self.set_arch(arch)
        x = self.pre(x)
        feats = []
        for i, (blocks, (b, *_)) in enumerate(zip(self.layers, self._arch)):
            x = self._block(blocks, b, x)
            if self.feature_choose and i in self.feature_choose:
                feats.append(x)
        return self.post(feats + [x] if self.feature_choose else x)

    @staticmethod
    def _block(blocks, b, x):
        kind = BLOCKS[b][0]
        if kind == "dwsep":  # the inverted-residual family at expansion 1
            fam = blocks["ir"]
            return fam.proj(fam.dw(x))
        if kind == "conv":  # the basic family's first convolution alone
            return blocks["basic"].c1(x)
        return blocks[group(b)](x)

    def sample(self, rng: random.Random) -> tuple:
        """A uniformly random path (``dopt.nas.sharing.sample``)."""
        return sample(self.space, rng)

    def fair_paths(self, rng: random.Random) -> list:
        """The paths of one training step (``dopt.nas.sharing.fair_paths``)."""
        return fair_paths(self.space, rng)

    def specs(self, arch) -> list:
        return [layer_spec(b, cin, cout, s, self.align) for b, cin, cout, s in arch]


def build_static(space, arch, pre: nn.Module, post: nn.Module, feature_choose=None) -> SearchedNet:
    """A plain network for ``arch`` (fresh weights)."""
    specs = [layer_spec(b, cin, cout, s, space.align) for b, cin, cout, s in arch]
    return SearchedNet(pre, SearchedBackbone(specs, feature_choose), post)


@torch.no_grad()
def extract(supernet: Supernet, arch) -> SearchedNet:
    """The sub-net ``arch`` as a plain network carrying the supernet's weight slices."""
    net = build_static(supernet.space, arch, copy.deepcopy(supernet.pre),
                       copy.deepcopy(supernet.post), supernet.feature_choose)
    for i, (blocks, (b, *_)) in enumerate(zip(supernet.layers, arch)):
        src = blocks[group(b)].state_dict()
        units = unit_map(b)
        dst = net.backbone.layers[i]
        new = {}
        for k, v in dst.state_dict().items():
            unit, _, rest = k.partition(".")
            s = src[f"{units.get(unit, unit)}.{rest}"]
            if not v.dim():
                new[k] = s.clone()
                continue
            # leading channels; spatial kernel dimensions (conv weights) from the centre
            idx = [slice(0, n) for n in v.shape]
            for d in range(2, v.dim()):
                o = (s.shape[d] - v.shape[d]) // 2
                idx[d] = slice(o, o + v.shape[d])
            new[k] = s[tuple(idx)].clone()
        dst.load_state_dict(new)
    return net
