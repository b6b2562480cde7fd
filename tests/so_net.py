"""A model-definition file as a dopt_so user writes it (input named ``input``, 3x128x128)."""
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.dw = nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24, bias=False)
        self.bn2 = nn.BatchNorm2d(24)
        self.pw = nn.Conv2d(24, 48, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(48)
        self.conv2 = nn.Conv2d(48, 48, 3, stride=2, padding=1)
        self.fc = nn.Linear(48, 10)

    def forward(self, input):
        y = torch.relu(self.bn1(self.conv1(input)))
        y = torch.relu(self.bn2(self.dw(y)))
        y = torch.relu(self.bn3(self.pw(y)))
        y = torch.relu(self.conv2(y))
        return self.fc(y.mean((2, 3)))


def trained_like(seed=0):
    """``Net`` in eval mode with non-trivial BatchNorm statistics (as after training)."""
    torch.manual_seed(seed)
    net = Net().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.3)
    return net
