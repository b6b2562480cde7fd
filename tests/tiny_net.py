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


def build():
    torch.manual_seed(0)
    m = TinyNet()
    # non-trivial BN statistics so folding matters
    with torch.no_grad():
        for bn in (m.bn1, m.bn_dw, m.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return m
