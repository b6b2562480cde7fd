"""Semantic segmentation with NASEA: Fashion-MNIST garments on 56x56 canvases.

Each canvas holds two real Fashion-MNIST glyphs at seeded positions; the mask gives every
pixel its garment's class + 1 (0 is background), 11 classes in all. The metric is mIoU.
``feature_choose`` hands PostNet the chosen layers' outputs and the last layer's, the
reference's contract: PostNet fuses a full-resolution feature with the upsampled last one.
"""
import gzip
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MEAN, STD = 0.2860, 0.3530
MAX_ITEMS = 1 << 20
CANVAS, CLASSES = 56, 11
LOW = 16                # channels of the layer named in feature_choose (filters[0])
HIGH = 64               # channels of the last layer (filters[-1])


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read(16 + 28 * 28 * MAX_ITEMS)
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or not 1 <= ndim <= 3:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    if int(np.prod(dims)) != len(data) - 4 - 4 * ndim:
        raise ValueError(f"{path}: IDX header dims {dims} do not match the file size")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(folder, split):
    folder = Path(folder)
    x = read_idx(folder / f"{split}-images-idx3-ubyte.gz")
    y = read_idx(folder / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
    x = ((x.astype(np.float32) / 255.0 - MEAN) / STD)[:, None]
    return torch.from_numpy(x), torch.from_numpy(y)


def compose(x, y, n, seed):
    """``n`` canvases of two glyphs each, with their per-pixel class masks."""
    rng = np.random.default_rng(seed)
    img = torch.full((n, 1, CANVAS, CANVAS), float(x.min()))
    mask = torch.zeros((n, CANVAS, CANVAS), dtype=torch.int64)
    for i in range(n):
        for j in rng.choice(len(x), 2, replace=False):
            r, c = rng.integers(0, CANVAS - 28, 2)
            glyph = x[j, 0]
            on = glyph > float(x.min()) + 0.3 * float(x.max() - x.min())
            img[i, 0, r:r + 28, c:c + 28] = torch.where(on, glyph, img[i, 0, r:r + 28, c:c + 28])
            mask[i, r:r + 28, c:c + 28][on] = int(y[j]) + 1
    return img, mask


class UserModule:
    def __init__(self, epoch, batch_size):
        self.epoch, self.batch_size = epoch, batch_size

    def dataset_define(self, dataset_dir, is_training):
        x, y = load_split(dataset_dir, "train")
        n_val = len(x) // 6
        if is_training:
            img, mask = compose(x[:-n_val], y[:-n_val], (len(x) - n_val) // 3, seed=1)
        else:
            img, mask = compose(x[-n_val:], y[-n_val:], n_val // 2, seed=2)
        return torch.utils.data.TensorDataset(img, mask)

    def scheduler_define(self, optimizer, steps_per_epoch):
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=optimizer.param_groups[0]["lr"],
            total_steps=max(1, self.epoch * steps_per_epoch))

    def metrics_func(self, eval_dataloader, eval_function):
        """Mean intersection over union of the classes present."""
        inter = torch.zeros(CLASSES)
        union = torch.zeros(CLASSES)
        for x, m in eval_dataloader:
            p = eval_function(x).argmax(1).cpu()
            for c in range(CLASSES):
                inter[c] += ((p == c) & (m == c)).sum()
                union[c] += ((p == c) | (m == c)).sum()
        present = union > 0
        return float((inter[present] / union[present]).mean())

    def loss_func(self, labels, logits):
        return F.cross_entropy(logits, labels)


class PreNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, inputs):
        return torch.relu(self.bn(self.conv(inputs)))


class PostNet(nn.Module):
    """inputs: [feature of layer feature_choose[0] (full size), last layer's output]."""

    def __init__(self):
        super().__init__()
        self.low = nn.Conv2d(LOW, 32, 1, bias=False)
        self.high = nn.Conv2d(HIGH, 32, 1, bias=False)
        self.bn = nn.BatchNorm2d(32)
        self.head = nn.Conv2d(32, CLASSES, 1)

    def forward(self, inputs):
        low, high = inputs[0], inputs[-1]
        high = F.interpolate(self.high(high), size=low.shape[2:], mode="bilinear",
                             align_corners=False)
        return self.head(torch.relu(self.bn(self.low(low) + high)))
