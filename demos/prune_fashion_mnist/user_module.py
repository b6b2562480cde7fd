"""The data, metric and loss of the pruning demo (``dopt prune --user_module``).

``dataset_dir`` holds the Fashion-MNIST IDX files (the demo passes the copy shipped in
``demos/fashion_mnist/data``). Fine-tuning uses the training images; the metric (top-1
accuracy) is measured on the test set, as the other Fashion-MNIST demos report it.
"""
import gzip
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MEAN, STD = 0.2860, 0.3530
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


class UserModule:
    def __init__(self, epoch, batch_size):
        self.epoch, self.batch_size = epoch, batch_size

    def dataset_define(self, dataset_dir, is_training):
        split = "train" if is_training else "t10k"
        folder = Path(dataset_dir)
        x = read_idx(folder / f"{split}-images-idx3-ubyte.gz")
        y = read_idx(folder / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
        x = ((x.astype(np.float32) / 255.0 - MEAN) / STD)[:, None]
        return torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))

    def metrics_func(self, eval_dataloader, eval_function):
        correct = total = 0
        for x, y in eval_dataloader:
            correct += int((eval_function(x).argmax(1).cpu() == y).sum())
            total += len(y)
        return correct / max(total, 1)

    def loss_func(self, labels, logits):
        return F.cross_entropy(logits, labels)
