"""The weight-sharing supernet of dopt's NASEA space, and sub-net extraction.

Every layer holds one block of each kind at the widest size it can be asked for; a sub-net
uses the first ``cin`` input and first ``cout`` output channels of each weight (and the
same slice of each BatchNorm), so every width of a block trains the same leading channels
(single-path one-shot with channel slicing). ``extract`` copies those slices into a plain
``nas_blocks.SearchedNet`` whose state-dict keys are the supernet's.
"""
from __future__ import annotations

import copy
import random

import torch
import torch.nn.functional as F
from torch import nn

from dopt.nas.space import BLOCKS, hidden_width

from .nas_blocks import ConvBN, SearchedBackbone, SearchedNet, make_block


class SharedConvBN(ConvBN):
    """A ``ConvBN`` of the widest size that runs on its leading channels."""

    def __init__(self, cin, cout, k, stride=1, depthwise=False, act=True):
        super().__init__(cin, cout, k, stride, depthwise, act)
        self.active_out = cout

    def forward(self, x):
        cin = x.shape[1]
        conv, bn = self.conv, self.bn
        if self.depthwise:
            cout, w, groups = cin, conv.weight[:cin], cin
        else:
            cout, w, groups = self.active_out, conv.weight[:self.active_out, :cin], 1
        y = F.conv2d(x, w, None, conv.stride, conv.padding, 1, groups)
        y = F.batch_norm(y, bn.running_mean[:cout], bn.running_var[:cout], bn.weight[:cout],
                         bn.bias[:cout], self.training or not bn.track_running_stats,
                         bn.momentum if bn.momentum is not None else 0.1, bn.eps)
        return torch.relu(y) if self.act else y


def layer_spec(block: str, cin: int, cout: int, stride: int, align: int) -> tuple:
    """``(kind, cin, hidden, cout, kernel, stride)`` of one searchable layer."""
    kind, k, _e = BLOCKS[block]
    return (kind, cin, hidden_width(block, cin, cout, align), cout, k, stride)


class Supernet(nn.Module):
    """PreNet + one ``ModuleDict`` of shared blocks per searchable layer + PostNet."""

    def __init__(self, space, pre: nn.Module, post: nn.Module, feature_choose=None):
        super().__init__()
        self.space, self.align = space, space.align
        self.pre, self.post = pre, post
        self.feature_choose = list(feature_choose) if feature_choose else None
        self.layers = nn.ModuleList()
        for lay, cap in zip(space.layers, space.cap_in):
            wide = max(lay.widths)
            blocks = nn.ModuleDict()
            for b in lay.blocks:
                # inner widths grow with cin and cout: the widest covers every sub-net
                hid = hidden_width(b, cap, wide, space.align) if b != "identity" else 0
                blocks[b] = make_block(BLOCKS[b][0], cap, hid, wide, BLOCKS[b][1], lay.stride,
                                       unit=SharedConvBN, shared=True)
            self.layers.append(blocks)

    def set_arch(self, arch) -> None:
        self._arch = arch
        for blocks, (b, cin, cout, _s) in zip(self.layers, arch):
            block = blocks[b]
            hid = hidden_width(b, cin, cout, self.align)
            for name, which in block.WIDTHS.items():
                unit = getattr(block, name)
                if unit is not None:
                    unit.active_out = hid if which == "hid" else cout

    def forward(self, x, arch=None):
        if arch is not None:
            self.set_arch(arch)
        x = self.pre(x)
        feats = []
        for i, (blocks, (b, *_)) in enumerate(zip(self.layers, self._arch)):
            x = blocks[b](x)
            if self.feature_choose and i in self.feature_choose:
                feats.append(x)
        return self.post(feats + [x] if self.feature_choose else x)

    def sample(self, rng: random.Random) -> tuple:
        """A uniformly random path: block, then width, per layer."""
        choice = []
        for lay in self.space.layers:
            choice.append((rng.choice(lay.blocks), rng.choice(lay.widths)))
        return self.space.decode(choice)

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
        src = blocks[b].state_dict()
        dst = net.backbone.layers[i]
        new = {}
        for k, v in dst.state_dict().items():
            s = src[k]
            new[k] = s[tuple(slice(0, n) for n in v.shape)].clone() if v.dim() else s.clone()
        dst.load_state_dict(new)
    return net
