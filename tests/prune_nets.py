"""Small networks for the pruning tests: one with a residual group that is compute-bound on
the emulated NPU (so a latency target is reachable), and two that cannot be pruned."""
import torch
import torch.nn.functional as F
from torch import nn


class ResNetish(nn.Module):
    """3x16x16 in: a 64-channel residual group (stem + conv2), a 96-channel inner group,
    a 128-channel head and a classifier."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU())
        self.conv1 = nn.Conv2d(64, 96, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(96)
        self.conv2 = nn.Conv2d(96, 64, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.head = nn.Conv2d(64, 128, 1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        x = F.relu(self.head(F.relu(x + y)))
        return self.fc(x.mean((2, 3)))


class LinearOnly(nn.Module):
    """Nothing to prune: the one layer produces the output."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(x, 1))


class DataDependent(nn.Module):
    """A forward that branches on the data, which the dependency graph's trace rejects."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        if float(x.sum()) == 0.0:
            raise ValueError("an all-zero input is not supported by this model")
        return self.fc(self.conv(x).mean((2, 3)))


def trained_like(seed=0) -> ResNetish:
    """Random weights with BatchNorm statistics from a few random batches (eval mode)."""
    torch.manual_seed(seed)
    m = ResNetish()
    m.train()
    with torch.no_grad():
        for _ in range(4):
            m(torch.randn(16, 3, 16, 16))
    return m.eval()


def batches(n=4, seed=1, labels=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(8, 3, 16, 16, generator=g)
        out.append((x, torch.randint(0, 10, (8,), generator=g)) if labels else x)
    return out
