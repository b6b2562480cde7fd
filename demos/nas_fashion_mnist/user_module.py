"""The developer interface of the NASEA Fashion-MNIST demo (the reference's PyTorch
``UserModule``, ``PreNet`` and ``PostNet``).

``dataset_dir`` holds the Fashion-MNIST IDX files (``train-images-idx3-ubyte.gz`` ...). The
search never sees the test set: the last sixth of the training images is the validation
split (``is_training=False``); the test set is for final numbers only.
"""
import gzip
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MEAN, STD = 0.2860, 0.3530
FEATURES = 128          # the last entry of scen.yaml's filters: what PostNet receives
NUM_CLASSES = 10
MAX_ITEMS = 1 << 20


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
    """(images N x 1 x 28 x 28 normalised, labels) of ``train`` or ``t10k``."""
    folder = Path(folder)
    x = read_idx(folder / f"{split}-images-idx3-ubyte.gz")
    y = read_idx(folder / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
    x = ((x.astype(np.float32) / 255.0 - MEAN) / STD)[:, None]
    return torch.from_numpy(x), torch.from_numpy(y)


class UserModule:
    def __init__(self, epoch, batch_size):
        self.epoch, self.batch_size = epoch, batch_size

    def dataset_define(self, dataset_dir, is_training):
        x, y = load_split(dataset_dir, "train")
        n_val = len(x) // 6
        sl = slice(0, len(x) - n_val) if is_training else slice(len(x) - n_val, None)
        return torch.utils.data.TensorDataset(x[sl], y[sl])

    def scheduler_define(self, optimizer, steps_per_epoch):
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=optimizer.param_groups[0]["lr"],
            total_steps=max(1, self.epoch * steps_per_epoch))

    def metrics_func(self, eval_dataloader, eval_function):
        correct = total = 0
        for x, y in eval_dataloader:
            logits = eval_function(x)
            correct += int((logits.argmax(1).cpu() == y).sum())
            total += len(y)
        return correct / max(total, 1)

    def loss_func(self, labels, logits):
        return F.cross_entropy(logits, labels)


class PreNet(nn.Module):
    """The stem: 3x3 convolution to 16 channels (MobileNetV2S's)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, inputs):
        return torch.relu(self.bn(self.conv(inputs)))


class PostNet(nn.Module):
    """Global average pooling and the classifier."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(FEATURES, NUM_CLASSES)

    def forward(self, inputs):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(inputs, 1), 1))
