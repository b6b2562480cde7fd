"""Depth pruning (``dopt.prune(..., depth=True)``): whole residual blocks removed where the
NPU estimate says it pays, found in the model's own code, saved so that they reload."""
import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("torch_pruning")

import dopt.prune as P  # noqa: E402
from dopt.errors import DoptError  # noqa: E402
from dopt_adapters.torch.prune_depth import find_blocks, residual_form  # noqa: E402

SHAPE = (1, 3, 16, 16)


def cbr(cin, cout, k=3, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)


class Inverted(nn.Module):          # y = x + f(x)
    def __init__(self, c):
        super().__init__()
        self.block = nn.Sequential(cbr(c, 2 * c, 1), cbr(2 * c, 2 * c, 3, groups=2 * c),
                                   cbr(2 * c, c, 1, act=False))

    def forward(self, x):
        return x + self.block(x)


class Basic(nn.Module):             # y = relu(f(x) + x)
    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = cbr(c, c), cbr(c, c, act=False)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(self.conv1(x)) + x)


class Plain(nn.Module):             # no residual: never removable
    def __init__(self, c):
        super().__init__()
        self.conv = cbr(c, c)

    def forward(self, x):
        return self.conv(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU())
        self.a = Inverted(32)
        self.b = Basic(32)           # its input comes out of Inverted (may be negative)
        self.c = Plain(32)
        self.d = Basic(32)           # after Plain's ReLU6: never negative
        self.e = Inverted(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.e(self.d(self.c(self.b(self.a(self.stem(x))))))
        return self.fc(x.mean((2, 3)))


def net(seed=0):
    torch.manual_seed(seed)
    m = Net().train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(8, *SHAPE[1:]))
    return m.eval()


def data(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, *SHAPE[1:], generator=g) for _ in range(n)]


def test_residual_blocks_are_found_in_the_models_code():
    m = net()
    assert residual_form(m.a) == "add" and residual_form(m.b) == "add_relu"
    assert residual_form(m.c) is None
    blocks = find_blocks(m, data()[0])
    # b ends in relu(x + f(x)) but its input can be negative: relu(x) != x, not offered
    assert blocks == {"a": "add", "d": "add_relu", "e": "add"}
    assert "a" not in find_blocks(m, data()[0], excluded=["a.block.0.0"])


def test_depth_pruning_meets_a_target_channels_cannot(tmp_path):
    m, ref = net(), net()
    with pytest.raises(DoptError) as ei:
        P.prune(net(), SHAPE, "speedup=1.3", calib_data=data())
    assert "depth=True" in str(ei.value)          # the hint names the way out
    r = P.prune(m, SHAPE, "speedup=1.3", calib_data=data(), depth=True)
    gone = sorted(k for k, v in r.plan.widths.items() if k.startswith("block:") and v == 0)
    assert gone and set(gone) <= {"block:a", "block:d", "block:e"}
    assert r.plan.after["latency_int8_ms"] <= r.plan.before["latency_int8_ms"] / 1.3 + 1e-9
    for k in gone:
        assert isinstance(m.get_submodule(k[len("block:"):]), nn.Identity)
    kinds = {g["group"]: g["kind"] for g in r.plan.as_dict()["groups"]}
    assert all(kinds[k] == "block" for k in gone)
    # saved: the rebuild file replaces the removed blocks and loads the weights strictly
    files = r.save(tmp_path)
    spec = importlib.util.spec_from_file_location("pruned_depth", files["py"])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rebuilt = mod.load()
    x = torch.randn(4, *SHAPE[1:])
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), m(x), atol=1e-5)
        # removing a block changes the function: the pruned model is not the original
        assert not torch.allclose(m(x), ref(x), atol=1e-3)
    assert "nn.Identity()" in open(files["py"]).read()
    import onnxruntime as ort
    sess = ort.InferenceSession(files["onnx"], providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x[:1].numpy()})[0]
    assert np.allclose(got, m(x[:1]).detach().numpy(), atol=1e-4)


def test_a_block_that_does_little_goes_first():
    # e's branch scaled to almost nothing: removing it costs the least accuracy
    m = net()
    with torch.no_grad():
        m.e.block[2][1].weight.mul_(1e-3)
        m.e.block[2][1].bias.zero_()
    b = P.backend_class("torch")(m, input_shape=SHAPE, calib_data=data(), depth=True)
    imp = {g.name: float(b.importance(g.name)[0]) for g in b.groups() if g.kind == "block"}
    assert imp["block:e"] < 0.01 < min(imp["block:a"], imp["block:d"])
    r = P.prune(m, SHAPE, "speedup=1.05", calib_data=data(), depth=True)
    assert r.plan.steps[0]["group"] == "block:e"


def test_unknown_block_is_named():
    b = P.backend_class("torch")(net(), input_shape=SHAPE, calib_data=data(), depth=True)
    with pytest.raises(DoptError) as ei:
        b.apply({"block:zz": 0})
    assert "block:zz" in str(ei.value) and "block:a" in str(ei.value)


def test_a_mild_target_does_not_take_a_whole_block():
    # ResNet8 (the shipped Fashion-MNIST weights): removing layer1 saves the most per unit of
    # risk, but one 32-channel step on layer3 already meets speedup=1.02 at far less risk
    from demos.fashion_mnist import data as D, models as M
    net = M.build("resnet8")
    net.load_state_dict(torch.load("demos/fashion_mnist/weights/resnet8.pth",
                                   weights_only=True))
    x, _ = D.load("train", limit=128)
    xs = torch.as_tensor(x, dtype=torch.float32)
    r = P.prune(net, (1, 1, 28, 28), "speedup=1.02", calib_data=[xs[:64], xs[64:]], depth=True)
    assert r.plan.widths and not any(k.startswith("block:") for k in r.plan.widths)
    assert r.plan.after["latency_int8_ms"] <= r.plan.before["latency_int8_ms"] / 1.02 + 1e-9
    r2 = P.prune(M.build("resnet8"), (1, 1, 28, 28), "speedup=1.2",
                 calib_data=[xs[:64], xs[64:]], depth=True)
    assert r2.plan.widths.get("block:layer1") == 0        # only the block reaches 1.2
