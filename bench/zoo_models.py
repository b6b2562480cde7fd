"""The eleven model-zoo architectures, rebuilt in torch and exported to ONNX for the cost model
(and, in ``VALIDATION``, the networks of the validation-only data, never fitted).

The reference measured these networks on a Kirin 9000 NPU but ships neither the models nor
their input sizes ("adjusted for NPU affinity"), so each is rebuilt from its paper with a
standard input size (``ZOO`` below; YOLOv5 at 320x320, docs/cost_model.md says why).
Weights are random: latency depends on shapes only.
Detection post-processing (anchor decoding, NMS) runs on the CPU in practice and is left out;
detectors end at their raw head convolutions.

    python -m bench.zoo_models [--out bench/out/zoo] [--models AlexNet,VDSR]
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

OUT = Path(__file__).resolve().parent / "out" / "zoo"


def cbr(cin, cout, k=3, s=1, p=None, bn=True, act="relu", g=1, d=1):
    """Conv (+BN) (+activation): the building block of every network below."""
    if p is None:
        p = tuple(d * (x // 2) for x in k) if isinstance(k, tuple) else d * (k // 2)
    layers = [nn.Conv2d(cin, cout, k, s, p, dilation=d, groups=g, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers += {"relu": [nn.ReLU()], "relu6": [nn.ReLU6()], "silu": [nn.SiLU()],
               None: []}[act]
    return nn.Sequential(*layers)


class Concat(nn.Module):
    def __init__(self, *branches):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], 1)


# --- classification -------------------------------------------------------------------------

def alexnet():
    """Single-tower AlexNet of arXiv:1404.5997 (channels 64-192-384-256-256), 224x224."""
    return nn.Sequential(
        cbr(3, 64, 11, 4, 2, bn=False), nn.MaxPool2d(3, 2),
        cbr(64, 192, 5, bn=False), nn.MaxPool2d(3, 2),
        cbr(192, 384, bn=False), cbr(384, 256, bn=False), cbr(256, 256, bn=False),
        nn.MaxPool2d(3, 2), nn.Flatten(),
        nn.Linear(256 * 6 * 6, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
        nn.Linear(4096, 1000))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, s):
        super().__init__()
        self.body = nn.Sequential(cbr(cin, cout, 3, s), cbr(cout, cout, act=None))
        self.short = cbr(cin, cout, 1, s, act=None) if s != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.body(x) + self.short(x))


def resnet18():
    layers = [cbr(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, s in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, s), BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000))


def _pool_proj(cin, cout):
    return nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), cbr(cin, cout, 1))


def _seq(cin, *specs):
    """Chain of conv-BN-ReLU given (cout, kernel, stride, padding) tuples."""
    layers = []
    for cout, k, s, p in specs:
        layers.append(cbr(cin, cout, k, s, p))
        cin = cout
    return nn.Sequential(*layers)


class _IncC(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool, self.b1 = _pool_proj(1536, 256), cbr(1536, 256, 1)
        self.b3 = cbr(1536, 384, 1)
        self.b3a, self.b3b = cbr(384, 256, (1, 3)), cbr(384, 256, (3, 1))
        self.b5 = _seq(1536, (384, 1, 1, 0), (448, (3, 1), 1, (1, 0)), (512, (1, 3), 1, (0, 1)))
        self.b5a, self.b5b = cbr(512, 256, (1, 3)), cbr(512, 256, (3, 1))

    def forward(self, x):
        y3, y5 = self.b3(x), self.b5(x)
        return torch.cat([self.pool(x), self.b1(x), self.b3a(y3), self.b3b(y3),
                          self.b5a(y5), self.b5b(y5)], 1)


def inception_v4():
    """Inception-v4 of arXiv:1602.07261 (4xA, 7xB, 3xC), 299x299."""
    stem = [_seq(3, (32, 3, 2, 0), (32, 3, 1, 0), (64, 3, 1, 1)),
            Concat(nn.MaxPool2d(3, 2), cbr(64, 96, 3, 2, 0)),
            Concat(_seq(160, (64, 1, 1, 0), (96, 3, 1, 0)),
                   _seq(160, (64, 1, 1, 0), (64, (7, 1), 1, (3, 0)), (64, (1, 7), 1, (0, 3)),
                        (96, 3, 1, 0))),
            Concat(cbr(192, 192, 3, 2, 0), nn.MaxPool2d(3, 2))]
    inc_a = [Concat(_pool_proj(384, 96), cbr(384, 96, 1), _seq(384, (64, 1, 1, 0), (96, 3, 1, 1)),
                    _seq(384, (64, 1, 1, 0), (96, 3, 1, 1), (96, 3, 1, 1))) for _ in range(4)]
    red_a = Concat(nn.MaxPool2d(3, 2), cbr(384, 384, 3, 2, 0),
                   _seq(384, (192, 1, 1, 0), (224, 3, 1, 1), (256, 3, 2, 0)))
    s17 = ((1, 7), 1, (0, 3))
    s71 = ((7, 1), 1, (3, 0))
    inc_b = [Concat(_pool_proj(1024, 128), cbr(1024, 384, 1),
                    _seq(1024, (192, 1, 1, 0), (224, *s17), (256, *s71)),
                    _seq(1024, (192, 1, 1, 0), (192, *s71), (224, *s17), (224, *s71),
                         (256, *s17))) for _ in range(7)]
    red_b = Concat(nn.MaxPool2d(3, 2), _seq(1024, (192, 1, 1, 0), (192, 3, 2, 0)),
                   _seq(1024, (256, 1, 1, 0), (256, *s17), (320, *s71), (320, 3, 2, 0)))
    return nn.Sequential(*stem, *inc_a, red_a, *inc_b, red_b, *[_IncC() for _ in range(3)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1536, 1000))


class _LRN(torch.autograd.Function):
    """Exports as the single ONNX LRN operator (torch would spell it out in ten ops)."""

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):
        return F.local_response_norm(x, size, alpha, beta, k)

    @staticmethod
    def symbolic(g, x, size, alpha, beta, k):
        return g.op("LRN", x, size_i=size, alpha_f=alpha, beta_f=beta, bias_f=k)


class LRN(nn.Module):
    def __init__(self, size=5, alpha=1e-4, beta=0.75, k=1.0):
        super().__init__()
        self.args = (size, alpha, beta, k)

    def forward(self, x):
        return _LRN.apply(x, *self.args)


def _inc_v1(cin, c1, c3r, c3, c5r, c5, cp):
    return Concat(cbr(cin, c1, 1, bn=False), _seq_nobn(cin, (c3r, 1), (c3, 3)),
                  _seq_nobn(cin, (c5r, 1), (c5, 5)),
                  nn.Sequential(nn.MaxPool2d(3, 1, 1), cbr(cin, cp, 1, bn=False)))


def _seq_nobn(cin, *specs):
    layers = []
    for cout, k in specs:
        layers.append(cbr(cin, cout, k, bn=False))
        cin = cout
    return nn.Sequential(*layers)


def googlenet():
    """GoogLeNet (Inception v1) of arXiv:1409.4842 with its LRN layers, no BN, 224x224."""
    pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
    return nn.Sequential(
        cbr(3, 64, 7, 2, bn=False), pool(), LRN(), cbr(64, 64, 1, bn=False),
        cbr(64, 192, 3, bn=False), LRN(), pool(),
        _inc_v1(192, 64, 96, 128, 16, 32, 32), _inc_v1(256, 128, 128, 192, 32, 96, 64), pool(),
        _inc_v1(480, 192, 96, 208, 16, 48, 64), _inc_v1(512, 160, 112, 224, 24, 64, 64),
        _inc_v1(512, 128, 128, 256, 24, 64, 64), _inc_v1(512, 112, 144, 288, 32, 64, 64),
        _inc_v1(528, 256, 160, 320, 32, 128, 128), pool(),
        _inc_v1(832, 256, 160, 320, 32, 128, 128), _inc_v1(832, 384, 192, 384, 48, 128, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1024, 1000))


def _fire(cin, s, e):
    return nn.Sequential(cbr(cin, s, 1, bn=False),
                         Concat(cbr(s, e, 1, bn=False), cbr(s, e, 3, bn=False)))


def squeezenet():
    """SqueezeNet v1.0 of arXiv:1602.07360, 224x224."""
    pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
    return nn.Sequential(
        cbr(3, 96, 7, 2, 0, bn=False), pool(), _fire(96, 16, 64), _fire(128, 16, 64),
        _fire(128, 32, 128), pool(), _fire(256, 32, 128), _fire(256, 48, 192),
        _fire(384, 48, 192), _fire(384, 64, 256), pool(), _fire(512, 64, 256),
        cbr(512, 1000, 1, bn=False), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def squeezenet_v1_1():
    """SqueezeNet v1.1 (the authors' repository): 3x3/64 stem, pools moved earlier; 2.4x
    fewer multiply-adds than v1.0 at the same accuracy."""
    pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
    return nn.Sequential(
        cbr(3, 64, 3, 2, 0, bn=False), pool(), _fire(64, 16, 64), _fire(128, 16, 64), pool(),
        _fire(128, 32, 128), _fire(256, 32, 128), pool(), _fire(256, 48, 192),
        _fire(384, 48, 192), _fire(384, 64, 256), _fire(512, 64, 256),
        cbr(512, 1000, 1, bn=False), nn.AdaptiveAvgPool2d(1), nn.Flatten())


# --- MobileNetV2 (SSD and DeepLab backbone) -------------------------------------------------

class InvRes(nn.Module):
    def __init__(self, cin, cout, s, t, d=1):
        super().__init__()
        hid = cin * t
        self.expand = cbr(cin, hid, 1, act="relu6") if t != 1 else nn.Identity()
        self.dw = cbr(hid, hid, 3, s, g=hid, d=d, act="relu6")
        self.project = cbr(hid, cout, 1, act=None)
        self.res = s == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.res else y


MBV2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
        (6, 160, 3, 2), (6, 320, 1, 1))


def mobilenet_v2_blocks(dilate_from_stride: int = 0):
    """Inverted-residual blocks; past ``dilate_from_stride`` strides become dilations."""
    blocks, cin, stride, dil = [cbr(3, 32, 3, 2, act="relu6")], 32, 2, 1
    for t, c, n, s in MBV2:
        for i in range(n):
            si = s if i == 0 else 1
            if dilate_from_stride and si == 2 and stride >= dilate_from_stride:
                blocks.append(InvRes(cin, c, 1, t, dil))
                dil *= 2
            else:
                blocks.append(InvRes(cin, c, si, t, dil))
                stride *= si
            cin = c
    return blocks


def _sep(cin, cout, s=1, act="relu6"):
    """Depthwise 3x3 + pointwise 1x1: SSDLite's replacement for a regular 3x3 conv."""
    return nn.Sequential(cbr(cin, cin, 3, s, g=cin, act="relu6"), cbr(cin, cout, 1, act=act))


class SSDLiteMobileNetV2(nn.Module):
    """SSDLite head of arXiv:1801.04381 on MobileNetV2, VOC (21 classes), 300x300.

    Feature maps: expansion of block 14 (19x19x576), the 1280-channel 10x10 map, then four
    extra 1x1 + depthwise-separable stride-2 layers (512, 256, 256, 128). Outputs are the
    raw per-map box and class convolutions; decoding and NMS are CPU post-processing.
    """

    def __init__(self, classes=21, anchors=(3, 6, 6, 6, 6, 6), lite=True):
        super().__init__()
        # lite=False: the original SSD's regular 3x3 convolutions in the extra layers and
        # the box / class heads instead of depthwise-separable ones
        sep = _sep if lite else (lambda cin, cout, s=1, act="relu6": cbr(cin, cout, 3, s,
                                                                            act=act))
        blocks = mobilenet_v2_blocks()
        self.head14 = nn.Sequential(*blocks[:14], blocks[14].expand)
        self.tail14 = nn.Sequential(blocks[14].dw, blocks[14].project)
        self.body = nn.Sequential(*blocks[15:], cbr(320, 1280, 1, act="relu6"))
        chans, extras = [576, 1280], []
        for c in (512, 256, 256, 128):
            extras.append(nn.Sequential(cbr(chans[-1], c // 2, 1, act="relu6"),
                                        sep(c // 2, c, 2)))
            chans.append(c)
        self.extras = nn.ModuleList(extras)
        self.loc = nn.ModuleList(sep(c, a * 4, act=None) for c, a in zip(chans, anchors))
        self.conf = nn.ModuleList(sep(c, a * classes, act=None) for c, a in zip(chans, anchors))

    def forward(self, x):
        f14 = self.head14(x)
        feats = [f14, self.body(self.tail14(f14))]
        for e in self.extras:
            feats.append(e(feats[-1]))
        return tuple(h(f) for f, h in zip(feats, self.loc)) + tuple(
            h(f) for f, h in zip(feats, self.conf))


class DeepLabV3MobileNetV2(nn.Module):
    """DeepLab v3 of arXiv:1706.05587 on MobileNetV2, output stride 16, VOC, 513x513.

    The authors' released MobileNetV2 variant (2.75 G multiply-adds): ASPP reduced to the
    1x1 branch plus image pooling, no decoder; logits resized bilinearly to the input size and
    reduced to the per-pixel class by ArgMax, as in the released inference graph.
    """

    def __init__(self, classes=21, output_stride=16):
        super().__init__()
        self.backbone = nn.Sequential(*mobilenet_v2_blocks(dilate_from_stride=output_stride))
        self.aspp1 = cbr(320, 256, 1)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), cbr(320, 256, 1))
        self.project = cbr(512, 256, 1)
        self.logits = nn.Conv2d(256, classes, 1)

    def forward(self, x):
        f = self.backbone(x)
        hw = [int(v) for v in f.shape[-2:]]  # static sizes: no Shape/Slice ops in the graph
        pooled = F.interpolate(self.image_pool(f), size=hw, mode="bilinear", align_corners=True)
        y = self.logits(self.project(torch.cat([self.aspp1(f), pooled], 1)))
        y = F.interpolate(y, size=[int(v) for v in x.shape[-2:]], mode="bilinear",
                          align_corners=True)
        return y.argmax(1)


# --- YOLOv5s --------------------------------------------------------------------------------

def _c(cin, cout, k=1, s=1, p=None):
    return cbr(cin, cout, k, s, p, act="silu")


class C3(nn.Module):
    def __init__(self, cin, cout, n=1, shortcut=True):
        super().__init__()
        h = cout // 2
        self.cv1, self.cv2, self.cv3 = _c(cin, h), _c(cin, h), _c(2 * h, cout)
        self.m = nn.ModuleList(nn.Sequential(_c(h, h), _c(h, h, 3)) for _ in range(n))
        self.shortcut = shortcut

    def forward(self, x):
        y = self.cv1(x)
        for m in self.m:
            y = y + m(y) if self.shortcut else m(y)
        return self.cv3(torch.cat([y, self.cv2(x)], 1))


class SPPF(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.cv1, self.cv2 = _c(cin, cin // 2), _c(cin * 2, cout)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], 1))


class YOLOv5s(nn.Module):
    """YOLOv5s (v6 layout: 6x6 stem, C3, SPPF, PANet), COCO 80 classes, 320x320.

    Ends at the three raw 1x1 detection convolutions (255 = 3 anchors x 85 channels).
    """

    def __init__(self, classes=80):
        super().__init__()
        self.b1 = nn.Sequential(_c(3, 32, 6, 2, 2), _c(32, 64, 3, 2), C3(64, 64),
                                _c(64, 128, 3, 2), C3(128, 128, 2))
        self.b2 = nn.Sequential(_c(128, 256, 3, 2), C3(256, 256, 3))
        self.b3 = nn.Sequential(_c(256, 512, 3, 2), C3(512, 512), SPPF(512, 512), _c(512, 256))
        self.h1, self.h1c = C3(512, 256, shortcut=False), _c(256, 128)
        self.p3 = C3(256, 128, shortcut=False)
        self.d3, self.p4 = _c(128, 128, 3, 2), C3(256, 256, shortcut=False)
        self.d4, self.p5 = _c(256, 256, 3, 2), C3(512, 512, shortcut=False)
        no = 3 * (classes + 5)
        self.det = nn.ModuleList(nn.Conv2d(c, no, 1) for c in (128, 256, 512))

    def forward(self, x):
        up = lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest")  # noqa: E731
        x4 = self.b1(x)
        x6 = self.b2(x4)
        x10 = self.b3(x6)
        x14 = self.h1c(self.h1(torch.cat([up(x10), x6], 1)))
        p3 = self.p3(torch.cat([up(x14), x4], 1))
        p4 = self.p4(torch.cat([self.d3(p3), x14], 1))
        p5 = self.p5(torch.cat([self.d4(p4), x10], 1))
        return tuple(d(p) for d, p in zip(self.det, (p3, p4, p5)))


# --- segmentation ---------------------------------------------------------------------------

class FCN8s(nn.Module):
    """FCN-8s of arXiv:1605.06211 as released (Caffe voc-fcn8s), VGG16, VOC, 500x500.

    Faithful to the release: conv1_1 pads by 100, fc6/fc7 are 7x7/1x1 convolutions, skips
    are cropped (offsets 5, 9, 31) and upsampling uses learned transposed convolutions.
    """

    def __init__(self, classes=21):
        super().__init__()
        cfg = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
        stages, cin = [], 3
        for widths in cfg:
            layers = []
            for c in widths:
                layers.append(cbr(cin, c, p=100 if cin == 3 else 1, bn=False))
                cin = c
            stages.append(nn.Sequential(*layers, nn.MaxPool2d(2, 2, ceil_mode=True)))
        self.to_pool3, self.to_pool4, self.to_pool5 = (nn.Sequential(*stages[:3]), stages[3],
                                                       stages[4])
        self.fc = nn.Sequential(cbr(512, 4096, 7, p=0, bn=False), cbr(4096, 4096, 1, bn=False),
                                nn.Conv2d(4096, classes, 1))
        self.score4, self.score3 = nn.Conv2d(512, classes, 1), nn.Conv2d(256, classes, 1)
        self.up2 = nn.ConvTranspose2d(classes, classes, 4, 2, bias=False)
        self.up4 = nn.ConvTranspose2d(classes, classes, 4, 2, bias=False)
        self.up8 = nn.ConvTranspose2d(classes, classes, 16, 8, bias=False)

    @staticmethod
    def crop(x, offset, like):
        h, w = like.shape[-2:]
        return x[:, :, offset:offset + h, offset:offset + w]

    def forward(self, x):
        p3 = self.to_pool3(x)
        p4 = self.to_pool4(p3)
        y = self.up2(self.fc(self.to_pool5(p4)))
        y = self.up4(y + self.crop(self.score4(p4), 5, y))
        y = self.up8(y + self.crop(self.score3(p3), 9, y))
        return self.crop(y, 31, x)


# --- super-resolution -----------------------------------------------------------------------

class VDSR(nn.Module):
    """VDSR of arXiv:1511.04587: 20 3x3 conv layers of 64 channels, global residual, Y channel.

    Input 256x256 (the bicubic-upscaled luminance image).
    """

    def __init__(self):
        super().__init__()
        body = [cbr(1, 64, bn=False)] + [cbr(64, 64, bn=False) for _ in range(18)]
        self.body = nn.Sequential(*body, nn.Conv2d(64, 1, 3, 1, 1))

    def forward(self, x):
        return x + self.body(x)


def fsrcnn(scale=2, d=56, s=12, m=4):
    """FSRCNN(56, 12, 4) of arXiv:1608.00367, x2, PReLU, Y channel; LR input 256x256."""
    def cp(cin, cout, k):
        return nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2), nn.PReLU(cout))
    return nn.Sequential(cp(1, d, 5), cp(d, s, 1), *[cp(s, s, 3) for _ in range(m)], cp(s, d, 1),
                         nn.ConvTranspose2d(d, 1, 9, scale, 4, output_padding=scale - 1))


# name -> (builder, input shape NCHW, one-line description for the docs)
ZOO = {
    "AlexNet": (alexnet, (1, 3, 224, 224), "single-tower AlexNet (1404.5997), no LRN"),
    "ResNet18": (resnet18, (1, 3, 224, 224), "ResNet-18"),
    "Inception_v4": (inception_v4, (1, 3, 299, 299), "Inception-v4"),
    "GoogLeNet": (googlenet, (1, 3, 224, 224), "Inception v1 with LRN, no BN"),
    "SqueezeNet_v1": (squeezenet, (1, 3, 224, 224), "SqueezeNet v1.0"),
    "SSD_MobileNetV2_VOC": (SSDLiteMobileNetV2, (1, 3, 300, 300),
                            "SSDLite on MobileNetV2, 21 classes, raw heads"),
    "YOLOv5": (YOLOv5s, (1, 3, 320, 320), "YOLOv5s (v6 layout), raw heads"),
    "FCN": (FCN8s, (1, 3, 500, 500), "FCN-8s on VGG16 as released (pad 100, crops)"),
    "DeepLab_v3": (DeepLabV3MobileNetV2, (1, 3, 513, 513),
                   "DeepLab v3, MobileNetV2 backbone, output stride 16"),
    "VDSR": (VDSR, (1, 1, 256, 256), "20 x 64-channel 3x3 convs"),
    "FSRCNN": (fsrcnn, (1, 1, 256, 256), "FSRCNN(56,12,4), x2 (output 512x512)"),
}


# name -> [(label, builder, input shape)]: other readings of a zoo row's name, for the
# sensitivity of the estimate to the model-variant guess (not fitted)
VARIANTS = {
    "SqueezeNet_v1": [("v1.1", squeezenet_v1_1, (1, 3, 224, 224))],
    "SSD_MobileNetV2_VOC": [("SSD heads (regular 3x3 convolutions)",
                             lambda: SSDLiteMobileNetV2(lite=False), (1, 3, 300, 300))],
    "DeepLab_v3": [("output stride 8", lambda: DeepLabV3MobileNetV2(output_stride=8),
                    (1, 3, 513, 513))],
    "YOLOv5": [("640x640 input", YOLOv5s, (1, 3, 640, 640))],
    "FSRCNN": [("x3", lambda: fsrcnn(scale=3), (1, 1, 256, 256)),
               ("x4", lambda: fsrcnn(scale=4), (1, 1, 256, 256))],
}


# --- validation-only networks (bench/data/kirin990_5g_paddle_lite.csv) -----------------------

def mobilenet_v1():
    """MobileNet v1 1.0 of arXiv:1704.04861: 13 depthwise-separable layers, 224x224."""
    layers, cin = [cbr(3, 32, 3, 2)], 32
    for cout, s in ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1),
                    (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)):
        layers += [cbr(cin, cin, 3, s, g=cin), cbr(cin, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1024, 1000))


def mobilenet_v2():
    """MobileNet v2 1.0 of arXiv:1801.04381 (the zoo's inverted-residual blocks), 224x224."""
    return nn.Sequential(*mobilenet_v2_blocks(), cbr(320, 1280, 1, act="relu6"),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, 1000))


def _torchvision(name: str):
    """A torchvision architecture with random weights (its published layer list)."""
    def build():
        from .compat_models import torchvision_models_module
        return torchvision_models_module().get_model(name, weights=None)
    build.__doc__ = f"torchvision.models.{name}"
    return build


# name -> (builder, input shape, description): the networks of the validation-only data,
# predicted with the constants fitted on ZOO and never fitted themselves. The three that
# are also zoo networks reuse the zoo builders.
VALIDATION = {
    "MobileNetV1": (mobilenet_v1, (1, 3, 224, 224), "MobileNet v1 1.0"),
    "MobileNetV2": (mobilenet_v2, (1, 3, 224, 224), "MobileNet v2 1.0"),
    "MobileNetV3_small": (_torchvision("mobilenet_v3_small"), (1, 3, 224, 224),
                          "torchvision mobilenet_v3_small"),
    "MobileNetV3_large": (_torchvision("mobilenet_v3_large"), (1, 3, 224, 224),
                          "torchvision mobilenet_v3_large"),
    "ResNet50": (_torchvision("resnet50"), (1, 3, 224, 224), "torchvision resnet50"),
    "MnasNet": (_torchvision("mnasnet1_0"), (1, 3, 224, 224),
                "torchvision mnasnet1_0 (MnasNet-B1)"),
    "SqueezeNet_v1_1": (squeezenet_v1_1, (1, 3, 224, 224), "SqueezeNet v1.1"),
}


def builders() -> dict:
    """Every network this module can export: the zoo and the validation-only ones."""
    return {**ZOO, **VALIDATION}


def input_shape(name: str, side: int | None = None) -> tuple:
    """The documented input shape, or the same with a square ``side`` x ``side`` image."""
    shape = builders()[name][1]
    return shape if side is None else shape[:2] + (side, side)


def export(name: str, out: Path = OUT, side: int | None = None) -> Path:
    """Export ``name`` to ``out/<name>.onnx`` unless the file is already there.

    ``side`` exports the same network for a square input of that size instead
    (``<name>_<side>.onnx``), for what-if estimates.
    """
    path = out / (f"{name}.onnx" if side is None else f"{name}_{side}.onnx")
    return _export(builders()[name][0], input_shape(name, side), path)


def export_variant(name: str, index: int, out: Path = OUT) -> Path:
    """Export ``VARIANTS[name][index]`` to ``out/<name>__variant<index>.onnx`` (cached)."""
    _, build, shape = VARIANTS[name][index]
    return _export(build, shape, out / f"{name}__variant{index}.onnx")


def _export(build, shape: tuple, path: Path) -> Path:
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build().eval()
    tmp = path.with_suffix(".onnx.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about constant sizes: intended
        torch.onnx.export(model, torch.randn(*shape), str(tmp), opset_version=17, dynamo=False,
                          input_names=["input"])
    _constants_to_initializers(tmp)
    tmp.replace(path)
    return path


def _constants_to_initializers(path: Path) -> None:
    """Fold what a converter folds: Constant nodes, Identity of a weight, Resize size math.

    Leaves plain initializers, so every Conv/Gemm sees its weight as a constant and no
    shape-computing ops remain (all input shapes here are static).
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(path))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    keep = []
    for node in g.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        src = inits.get(node.input[0]) if node.op_type == "Identity" else None
        if node.op_type == "Constant" and value is not None:
            value.name = node.output[0]
        elif src is not None:
            value = onnx.TensorProto()
            value.CopyFrom(src)
            value.name = node.output[0]
        else:
            keep.append(node)
            continue
        g.initializer.append(value)
        inits[value.name] = value
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in onnx.shape_inference.infer_shapes(model, data_prop=True).graph.value_info}
    shapes.update({v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                   for v in g.output})
    for node in keep:
        if node.op_type == "Resize" and len(node.input) > 3 and node.input[3] not in inits:
            name, dims = node.output[0] + "_sizes", shapes.get(node.output[0], [])
            if not dims or min(dims) <= 0:
                raise RuntimeError(f"{path}: cannot infer the static size of {node.name}")
            g.initializer.append(numpy_helper.from_array(np.array(dims, np.int64), name))
            node.input[3] = name
    used = {o.name for o in g.output}
    for node in reversed(keep):  # drop what no longer feeds anything
        if any(o in used for o in node.output):
            used.update(node.input)
        else:
            node.op_type = ""
    del g.node[:]
    g.node.extend(n for n in keep if n.op_type)
    live = {x for n in g.node for x in n.input}
    kept_inits = [i for i in g.initializer if i.name in live]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    onnx.save(model, str(path))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--models", default=",".join(ZOO), help="comma-separated names")
    args = ap.parse_args(argv)
    for name in args.models.split(","):
        print(export(name, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
