"""The PTQ algorithm is written once (``dopt.ptq``) and driven through each framework's backend.

* a NumPy backend written here proves the protocol is small and framework-free;
* the PyTorch backend (user's ``nn.Module``, BatchNorm unfolded) and the ONNX backend (the
  same network exported, BatchNorm folded by the exporter) reach the same decisions,
  ranges and corrected weights;
* ``dopt_so`` on a PyTorch model now applies CLE and bias correction, and says so.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from dopt.ptq import PtqBackend, PtqLayer, PtqOptions, run_ptq

HERE = Path(__file__).parent


class NumpyBackend:
    """Two 1x1 convolutions with a ReLU between them, in NumPy (NCHW, H = W = 1)."""

    def __init__(self, seed=0):
        r = np.random.default_rng(seed)
        self.w = {"a": (r.standard_normal((8, 4, 1, 1)) * np.array([4, .1, 1, 2, 3, .2, 1, 5])
                        .reshape(8, 1, 1, 1)).astype(np.float32),
                  "b": r.standard_normal((6, 8, 1, 1)).astype(np.float32)}
        self.b = {"a": r.standard_normal(8).astype(np.float32), "b": None}
        self.orig = ({k: v.copy() for k, v in self.w.items()}, dict(self.b))
        self.plan = None

    def layers(self):
        return {"a": PtqLayer("a", "conv", 1, 4, "x", 1, "a.w"),
                "b": PtqLayer("b", "conv", 1, 8, "h", 1, "b.w")}

    def weight(self, name):
        return self.w[name]

    def equalization_pairs(self):
        return [("a", "b")]

    def scale_channels(self, name, *, out_scale=None, in_scale=None):
        if out_scale is not None:
            self.w[name] = (self.w[name] * out_scale.reshape(-1, 1, 1, 1)).astype(np.float32)
            if self.b[name] is not None:
                self.b[name] = (self.b[name] * out_scale).astype(np.float32)
        if in_scale is not None:
            self.w[name] = (self.w[name] * in_scale.reshape(1, -1, 1, 1)).astype(np.float32)

    def add_to_bias(self, name, delta):
        if self.b[name] is None:
            return False
        self.b[name] = (self.b[name] + delta).astype(np.float32)
        return True

    @staticmethod
    def _conv(x, w, b):
        y = np.einsum("nkhw,ck->nchw", x, w[:, :, 0, 0])
        return y if b is None else y + b.reshape(1, -1, 1, 1)

    def _forward(self, x, w, b):
        h = np.maximum(self._conv(x, w["a"], b["a"]), 0)
        return h, self._conv(h, w["b"], b["b"])

    def run_batch(self, inputs):
        def run(feed):
            h, _ = self._forward(feed["x"], self.w, self.b)
            return {"x": feed["x"], "h": h}
        return run

    def write(self, plan):
        self.plan = plan
        return {"written": "memory"}

    def outputs(self, feed, *, quantized):
        from dopt.quant import numerics as nm
        if not quantized:
            return [self._forward(feed["x"], *self.orig)[1]]
        x = feed["x"]
        for name in ("a", "b"):
            lo, hi = self.plan.ranges[name]
            s, o = nm.activation_qparams(lo, hi)
            xq = (np.clip(np.rint(x / s + o), -128, 127) - o) * s
            w = self.w[name]
            wq = nm.fake_quant_weight(w, nm.weight_scales(w, 0), 0)
            x = self._conv(xq, wq, self.b[name])
            if name == "a":
                x = np.maximum(x, 0)
        return [x]


def _feeds(n=64, seed=1):
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, 4, 1, 1)).astype(np.float32)
    return lambda: ({"x": x[i:i + 16]} for i in range(0, n, 16))


def test_numpy_backend_runs_the_whole_algorithm():
    be = NumpyBackend()
    assert isinstance(be, PtqBackend)
    logs = []
    feeds = _feeds()
    ref = be.outputs(next(feeds()), quantized=False)[0]
    out = run_ptq(be, feeds, PtqOptions(algorithm="minmax", equalization=True,
                                        bias_correction=True, npu_placement=False,
                                        progress=False, log=logs.append))
    assert out.equalized_pairs == 1 and out.bias_corrected == 1   # "b" has no bias
    assert out.plan.quantized == ["a", "b"] and set(out.plan.ranges) == {"a", "b"}
    # CLE is exact: before bias correction moved "a"'s bias, the float function was kept;
    # here check the ranges it equalized: a's output-channel ranges now equal b's input ones
    ra = np.abs(be.w["a"]).max(axis=(1, 2, 3))
    rb = np.abs(be.w["b"]).max(axis=(0, 2, 3))
    assert np.allclose(ra, rb, rtol=1e-5)
    assert out.sqnr_db is not None and out.sqnr_db > 25
    assert any("bias correction skipped for 1 layer(s) (b)" in s for s in logs)
    assert ref.shape == (16, 6, 1, 1)


def test_cle_keeps_the_float_function():
    be = NumpyBackend()
    feed = next(_feeds()())
    before = be._forward(feed["x"], be.w, be.b)[1]
    from dopt.ptq.algorithm import equalize
    assert equalize(be, be.layers(), lambda s: None) == 1
    after = be._forward(feed["x"], be.w, be.b)[1]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)


def test_exclude_and_placement_are_decided_once():
    from dopt.errors import DoptError
    from dopt.ptq.algorithm import select_layers
    layers = {"c1": PtqLayer("c1", "conv", 1, 3, "x", 1, "c1.weight"),
              "dw": PtqLayer("dw", "conv", 32, 32, "y", 1, "dw.weight"),
              "fc": PtqLayer("fc", "linear", 1, 10, "z", -1, "fc.weight")}
    q, f = select_layers(layers, ["fc.weight"], npu_placement=True)
    assert q == ["dw"] and f["fc"] == "exclude_op" and "FP16" in f["c1"]
    with pytest.raises(DoptError, match="exclude_op names 'nope'"):
        select_layers(layers, ["nope"], npu_placement=False, config_file="c.prototxt")


def _so_net(seed=0):
    sys.path.insert(0, str(HERE))
    import so_net
    sys.path.pop(0)
    return so_net.trained_like(seed)


def test_torch_and_onnx_backends_agree(tmp_path):
    from dopt_adapters.onnx.ptq_backend import OnnxPtqBackend
    from dopt_adapters.torch.ptq_backend import TorchPtqBackend
    net = _so_net()
    buf = io.BytesIO()
    torch.onnx.export(net, (torch.zeros(1, 3, 64, 64),), buf, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}})
    x = np.random.default_rng(0).uniform(-1, 1, (32, 3, 64, 64)).astype(np.float32)

    def feeds():
        return ({"input": x[i:i + 8]} for i in range(0, 32, 8))

    opts = dict(algorithm="minmax", equalization=True, bias_correction=True, progress=False,
                log=lambda s: None)
    tb = TorchPtqBackend(net, {"input": (1, 3, 64, 64)}, tmp_path)
    ob = OnnxPtqBackend(onnx.load_from_string(buf.getvalue()))
    t = run_ptq(tb, feeds, PtqOptions(**opts))
    o = run_ptq(ob, feeds, PtqOptions(**opts))
    assert (t.equalized_pairs, t.bias_corrected) == (o.equalized_pairs, o.bias_corrected)
    assert t.equalized_pairs == 3 and t.bias_corrected == 4
    assert len(t.plan.quantized) == len(o.plan.quantized) == 4
    assert len(t.plan.float_layers) == len(o.plan.float_layers) == 1   # Cin = 3
    for a, b in zip(t.plan.quantized, o.plan.quantized):
        np.testing.assert_allclose(t.plan.ranges[a], o.plan.ranges[b], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(tb.weight(a), ob.weight(b), rtol=1e-4, atol=1e-6)
    assert t.sqnr_db > 25 and o.sqnr_db > 25
    assert Path(t.written["param_file"]).is_file()


def test_dopt_so_pytorch_applies_cle_and_bias_correction(tmp_path):
    from dopt.calib import sets as calibset
    from dopt.formats import param_file as P
    from dopt.cli.dopt_so import run
    net = _so_net()
    torch.save(net.state_dict(), tmp_path / "net.pth")
    (tmp_path / "net.py").write_text((HERE / "so_net.py").read_text())
    x = np.random.default_rng(0).uniform(-1, 1, (16, 3, 64, 64)).astype(np.float32)
    calibset.write_bin610(tmp_path / "cal.bin", x)
    (tmp_path / "c.prototxt").write_text(
        'device: USE_CPU\ncalibration_algorithm: "minmax"\nequalization: true\n'
        f'preprocess_parameter {{\n  input_type: BINARY\n  input_file_path: "{tmp_path}/cal.bin"\n}}\n')
    logs = []
    run(["--framework", "5", "--mode", "0", "--model", str(tmp_path / "net.py"),
         "--weight", str(tmp_path / "net.pth"), "--cal_conf", str(tmp_path / "c.prototxt"),
         "--output", str(tmp_path / "q.pt"), "--input_shape", "input:1,3,64,64",
         "--compress_conf", str(tmp_path / "q_param"), "--relax_path_rules"],
        log=logs.append)
    text = "\n".join(logs)
    assert "cross-layer equalization: 3 convolution pair(s)" in text
    assert "bias correction: 4 layer(s)" in text and "SQNR" in text
    doc = P.read_params(tmp_path / "q_param")
    assert any("bias correction" in n for n in doc["producer"]["ptq"])
    # the calibrated state dict keeps the user's keys: it loads into optimize_model(Net())
    state = torch.load(tmp_path / "q.pt", weights_only=True)
    assert "bn1.bias" in state or any(k.endswith("bn.bias") for k in state)
