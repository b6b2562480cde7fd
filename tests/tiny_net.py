"""A small network with every pattern the torch adapter handles (used by tests and CLI tests)."""
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)          # depthwise, with bias
        self.bn_dw = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 8, 1)                                # no BN after it
        self.grouped = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = y + self.pw(torch.relu(self.bn_dw(self.dw(y))))       # residual
        y = torch.relu(self.bn2(self.grouped(y)))
        return self.fc(y.mean((2, 3)))


def build(cls=None):
    torch.manual_seed(0)
    m = (cls or TinyNet)()
    # non-trivial BN statistics so folding matters
    with torch.no_grad():
        for bn in (m.bn1, m.bn_dw, m.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return m


WIDE_SHAPE = "x:1,20,16,16"


class WideNet(TinyNet):
    """TinyNet's patterns with every convolution wide enough (Cin >= 17) for the NPU to run
    it in INT8: the tests that check INT8 behaviour quantize this one (TinyNet's 3- and
    8-channel convolutions run in FP16 on the NPU whatever the configuration asks)."""

    def __init__(self):
        nn.Module.__init__(self)
        self.conv1 = nn.Conv2d(20, 24, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.bn_dw = nn.BatchNorm2d(24)
        self.pw = nn.Conv2d(24, 24, 1)
        self.grouped = nn.Conv2d(24, 32, 3, stride=2, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 5)


def build_wide():
    return build(WideNet)
