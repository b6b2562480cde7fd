"""Blocks of dopt's NASEA search space in plain PyTorch.

This file imports torch only: its text is copied into every ``model_arch_result_N.py`` the
search writes, so a result rebuilds without dopt installed. Each layer is described by
``(kind, cin, hidden, cout, kernel, stride)``; ``unit`` builds a conv + BN (+ ReLU), so
the supernet can reuse the same block code with weight-sharing units of the widest size.
"""
import torch
from torch import nn


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm (+ ReLU): one NPU kernel once BN folds and ReLU fuses."""

    def __init__(self, cin, cout, k, stride=1, depthwise=False, act=True):
        super().__init__()
        self.depthwise, self.act = depthwise, act
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=cin if depthwise else 1,
                              bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return torch.relu(y) if self.act else y


def _same(block, x, y):
    """Whether the shortcut is the input itself: fixed when the block is built for one
    shape (so torch.fx traces it and BatchNorm folds), checked per call in the supernet."""
    if block.same is not None:
        return block.same
    return block.stride == 1 and x.shape[1] == y.shape[1]


class PlainConv(nn.Module):
    """kxk convolution."""
    WIDTHS = {"c": "cout"}

    def __init__(self, cin, hid, cout, k, stride, unit=ConvBN, shared=False):
        super().__init__()
        self.c = unit(cin, cout, k, stride)

    def forward(self, x):
        return self.c(x)


class DepthwiseSeparable(nn.Module):
    """Depthwise kxk + pointwise 1x1 (MobileNetV1)."""
    WIDTHS = {"pw": "cout"}

    def __init__(self, cin, hid, cout, k, stride, unit=ConvBN, shared=False):
        super().__init__()
        self.dw = unit(cin, cin, k, stride, depthwise=True)
        self.pw = unit(cin, cout, 1, 1)

    def forward(self, x):
        return self.pw(self.dw(x))


class BasicResidual(nn.Module):
    """Two kxk convolutions with a shortcut (ResNet basic block)."""
    WIDTHS = {"c1": "cout", "c2": "cout", "shortcut": "cout"}

    def __init__(self, cin, hid, cout, k, stride, unit=ConvBN, shared=False):
        super().__init__()
        self.stride = stride
        self.same = None if shared else stride == 1 and cin == cout
        self.c1 = unit(cin, cout, k, stride)
        self.c2 = unit(cout, cout, k, 1, act=False)
        self.shortcut = unit(cin, cout, 1, stride, act=False) \
            if shared or stride != 1 or cin != cout else None

    def forward(self, x):
        y = self.c2(self.c1(x))
        return torch.relu(y + (x if _same(self, x, y) else self.shortcut(x)))


class Bottleneck(nn.Module):
    """1x1 reduce, kxk, 1x1 expand, with a shortcut (ResNet bottleneck)."""
    WIDTHS = {"a": "hid", "b": "hid", "c": "cout", "shortcut": "cout"}

    def __init__(self, cin, hid, cout, k, stride, unit=ConvBN, shared=False):
        super().__init__()
        self.stride = stride
        self.same = None if shared else stride == 1 and cin == cout
        self.a = unit(cin, hid, 1, 1)
        self.b = unit(hid, hid, k, stride)
        self.c = unit(hid, cout, 1, 1, act=False)
        self.shortcut = unit(cin, cout, 1, stride, act=False) \
            if shared or stride != 1 or cin != cout else None

    def forward(self, x):
        y = self.c(self.b(self.a(x)))
        return torch.relu(y + (x if _same(self, x, y) else self.shortcut(x)))


class InvertedResidual(nn.Module):
    """1x1 expand, depthwise kxk, 1x1 project; residual where shapes allow (MobileNetV2)."""
    WIDTHS = {"exp": "hid", "proj": "cout"}

    def __init__(self, cin, hid, cout, k, stride, unit=ConvBN, shared=False):
        super().__init__()
        self.stride = stride
        self.same = None if shared else stride == 1 and cin == cout
        self.exp = unit(cin, hid, 1, 1)
        self.dw = unit(hid, hid, k, stride, depthwise=True)
        self.proj = unit(hid, cout, 1, 1, act=False)

    def forward(self, x):
        y = self.proj(self.dw(self.exp(x)))
        return x + y if _same(self, x, y) else y


class Identity(nn.Module):
    """No layer (stride 1 only); the width stays the input's."""
    WIDTHS: dict = {}

    def __init__(self, cin=0, hid=0, cout=0, k=0, stride=1, unit=ConvBN, shared=False):
        super().__init__()

    def forward(self, x):
        return x


KINDS = {"conv": PlainConv, "dwsep": DepthwiseSeparable, "basic": BasicResidual,
         "bottleneck": Bottleneck, "ir": InvertedResidual, "identity": Identity}


def make_block(kind, cin, hid, cout, k, stride, unit=ConvBN, shared=False):
    return KINDS[kind](cin, hid, cout, k, stride, unit=unit, shared=shared)


class SearchedBackbone(nn.Module):
    """The searched layers; with ``feature_choose`` the output is the chosen layers' outputs
    followed by the last layer's (the reference's PostNet contract)."""

    def __init__(self, layers, feature_choose=None):
        super().__init__()
        self.layers = nn.ModuleList(make_block(*spec) for spec in layers)
        self.feature_choose = list(feature_choose) if feature_choose else None

    def forward(self, x):
        feats = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.feature_choose and i in self.feature_choose:
                feats.append(x)
        return feats + [x] if self.feature_choose else x


class SearchedNet(nn.Module):
    """The user's PreNet, the searched backbone, the user's PostNet."""

    def __init__(self, pre, backbone, post):
        super().__init__()
        self.pre, self.backbone, self.post = pre, backbone, post

    def forward(self, x):
        return self.post(self.backbone(self.pre(x)))
