"""Fidelity, property-based: whatever the network and whatever subset of its layers is asked
for INT8, the fake-quant model predicts the compiled INT8 ``.om`` on the emulated NPU.

Hypothesis draws small networks (convolutions plain / grouped / depthwise, BatchNorm,
residual adds, concatenations, pooling, ReLU / ReLU6 / LeakyReLU / HardSwish / Sigmoid / SiLU /
Tanh, linear heads; channel counts on both sides of the NPU's INT8 threshold, so narrow
convolutions asked for INT8 are drawn often) and a configuration (any subset of the
quantizable layers asked ``Quant_INT8-8``). Each case is calibrated on structured random
data (smooth images with per-channel gain and offset), exported, compiled with the emulated
NPU compiler and run on the emulated NPU. Required, per case:

* the parameter file and the ``.om`` agree with what the fake-quant model simulated: an
  INT8 record for exactly the requested layers the NPU runs in INT8, each of them an INT8
  kernel of the ``.om``;
* the INT8 kernels are bit-exact (``dopt.runtime.verify.kernel_agreement``: the fast engine
  against the kernel-by-kernel reference);
* top-1 (argmax of the logits) agrees on at least 99.9 % of the samples whose top-1 is not
  a near tie. The fake-quant model and the NPU compute float convolutions in float32 with
  different summation orders, and the NPU rounds every op's output to FP16 while the
  fake-quant model rounds at layer edges only: a logit can move by a few FP16 steps, and a
  random network's top two logits are sometimes closer than that. A sample counts as a
  near tie when its top-two margin is below ``TIE_REL`` of the largest logit magnitude
  (a few FP16 steps of the logits); such samples may be at most ``MAX_TIES`` of the set,
  so the exclusion cannot hide a model that is simply wrong. Real disagreements (an INT8
  layer simulated in FP16 or the reverse, a wrong scale, a dropped bias) move logits by
  whole quantization steps and fail this on hundreds of samples.

The default profile runs a few derandomized examples (deterministic in CI); the ``slow``
tests run many more. Cases that Hypothesis once shrank to a failure are kept below as
explicit regression tests.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import warnings

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dopt import DoptError  # noqa: E402
from dopt.formats import param_file as P  # noqa: E402
from dopt.npu.compiler import compile_onnx  # noqa: E402
from dopt.npu.profile import load_profile  # noqa: E402
from dopt.npu.rules import int8_skipped  # noqa: E402
from dopt.runtime import Session  # noqa: E402
from dopt.runtime.verify import kernel_agreement  # noqa: E402

INT8 = "Quant_INT8-8"
N_CAL = 64          # calibration samples
N_EVAL = 512        # samples compared per case
N_VERIFY = 4        # samples for the kernel-by-kernel check
MIN_AGREEMENT = 0.999
TIE_REL = 2.0 ** -10
MAX_TIES = 0.05
MIN_EXACT = 0.9      # PyTorch: share of samples whose logits are bit-identical

COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
FAST = settings(max_examples=int(os.environ.get("DOPT_FIDELITY_EXAMPLES", "10")), **COMMON)
SLOW = settings(max_examples=int(os.environ.get("DOPT_FIDELITY_SLOW_EXAMPLES", "80")), **COMMON)

ACTS = ("none", "relu", "relu6", "leaky", "hardswish", "sigmoid", "tanh", "silu")
WIDTHS = (1, 3, 4, 8, 12, 16, 17, 20, 24, 32)


# ---- what is compared ----------------------------------------------------------------

def top1_agreement(want: np.ndarray, got: np.ndarray, tie_rel: float = None) -> dict:
    """Top-1 agreement of ``got`` with ``want`` (logits, ``(N, classes)``), near ties apart.

    A near tie: ``want``'s top-two margin below ``TIE_REL`` times the largest logit
    magnitude of the set (see the module docstring)."""
    tie_rel = TIE_REL if tie_rel is None else tie_rel
    want = np.asarray(want, np.float64)
    got = np.asarray(got, np.float64)
    top2 = np.sort(want, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    tie = margin < tie_rel * max(float(np.abs(want).max()), 1e-30)
    same = want.argmax(1) == got.argmax(1)
    decided = ~tie
    scale = max(float(np.abs(want).max()), 1e-30)
    return {"agreement": float(same[decided].mean()) if decided.any() else 1.0,
            "raw_agreement": float(same.mean()), "ties": float(tie.mean()),
            "max_rel_diff": float(np.abs(want - got).max()) / scale,
            "median_rel_diff": float(np.median(np.abs(want - got).max(1))) / scale,
            "exact": float(np.all(want == got, axis=1).mean()),
            "disagreements": int((~same & decided).sum()), "n": len(want)}


def check_agreement(want, got, what: str, *, tie_rel: float = None, max_ties: float = MAX_TIES,
                    min_exact: float = 0.0) -> dict:
    r = top1_agreement(want, got, tie_rel)
    assert r["ties"] <= max_ties, f"{what}: {r}"
    assert r["agreement"] >= MIN_AGREEMENT, f"{what}: {r}"
    assert r["exact"] >= min_exact, f"{what}: {r}"
    return r


def check_int8_kernels_exact(om, feeds: dict) -> int:
    """Every INT8 kernel bit-exact, fast engine against the reference; returns how many."""
    rows = kernel_agreement(om, feeds)
    int8 = [r for r in rows if r["precision"] == "int8"]
    bad = [r for r in int8 if not r["exact"]]
    assert not bad, bad[:3]
    assert all(r["within_bound"] for r in rows), [r for r in rows if not r["within_bound"]][:3]
    return len(int8)


def structured(n: int, c: int, size: int, seed: int) -> np.ndarray:
    """Smooth random images (a 3x3 field upsampled, a little noise) with per-channel gain and
    offset: spatially correlated like photos, not white noise. NCHW float32."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.standard_normal((n, c, 3, 3)).astype(np.float32))
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).numpy()
    x = x + 0.1 * rng.standard_normal(x.shape).astype(np.float32)
    gain = rng.uniform(0.5, 2.0, (1, c, 1, 1)).astype(np.float32)
    offset = rng.uniform(-0.5, 0.5, (1, c, 1, 1)).astype(np.float32)
    return (x * gain + offset).astype(np.float32)


# ---- random networks -------------------------------------------------------------------

def _divisors(a: int, b: int) -> list[int]:
    return [g for g in range(2, min(a, b) + 1) if a % g == 0 and b % g == 0 and g < a]


@st.composite
def torch_specs(draw):
    """A network description: input channels and size, blocks, head."""
    cin = draw(st.sampled_from(WIDTHS))
    size = draw(st.sampled_from((8, 12, 16)))
    blocks, c, s = [], cin, size
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(("conv", "conv", "grouped", "dw", "res", "cat", "pool")))
        act = draw(st.sampled_from(ACTS))
        bn = draw(st.booleans())
        if kind == "pool" and s < 4:
            kind = "conv"
        if kind == "conv":
            cout = draw(st.sampled_from(WIDTHS[2:]))
            k = draw(st.sampled_from((1, 3)))
            stride = draw(st.sampled_from((1, 2))) if s >= 4 else 1
            blocks.append(dict(kind="conv", cout=cout, k=k, stride=stride, groups=1, bn=bn,
                               act=act, bias=draw(st.booleans())))
            c, s = cout, -(-s // stride)
        elif kind == "grouped":
            cout = draw(st.sampled_from((8, 12, 16, 20, 24, 32)))
            gs = _divisors(c, cout)
            g = draw(st.sampled_from(gs)) if gs else 1
            blocks.append(dict(kind="conv", cout=cout, k=3, stride=1, groups=g, bn=bn, act=act,
                               bias=draw(st.booleans())))
            c = cout
        elif kind == "dw":
            stride = draw(st.sampled_from((1, 2))) if s >= 4 else 1
            blocks.append(dict(kind="conv", cout=c, k=3, stride=stride, groups=c, bn=bn, act=act,
                               bias=draw(st.booleans())))
            s = -(-s // stride)
        elif kind == "res":
            blocks.append(dict(kind="res", k=draw(st.sampled_from((1, 3))),
                               dw=draw(st.booleans()), act=act))
        elif kind == "cat":
            a = draw(st.sampled_from((4, 8, 16, 20)))
            b = draw(st.sampled_from((0, 4, 8, 16)))  # 0: cat with the block's input
            blocks.append(dict(kind="cat", a=a, b=b, act=act))
            c = a + (b or c)
        else:
            blocks.append(dict(kind="pool", op=draw(st.sampled_from(("max", "avg")))))
            s //= 2
    hidden = draw(st.sampled_from((0, 0, 8, 24)))
    return dict(cin=cin, size=size, blocks=blocks, hidden=hidden,
                head_act=draw(st.sampled_from(ACTS[1:])),
                classes=draw(st.integers(3, 10)), seed=draw(st.integers(0, 2 ** 16)))


def _act(name: str):
    return {"none": nn.Identity(), "relu": nn.ReLU(), "relu6": nn.ReLU6(),
            "leaky": nn.LeakyReLU(0.1), "hardswish": nn.Hardswish(), "sigmoid": nn.Sigmoid(),
            "silu": nn.SiLU(inplace=True),
            "tanh": nn.Tanh()}[name]


def _conv_unit(cin, cout, k, stride, groups, bn, act, bias):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(_act(act))
    return nn.Sequential(*layers)


class SpecNet(nn.Module):
    """The network a spec describes (traceable by torch.fx: the spec is static)."""

    def __init__(self, spec: dict):
        super().__init__()
        self.kinds = [b["kind"] for b in spec["blocks"]]
        self.blocks = nn.ModuleList()
        c = spec["cin"]
        for b in spec["blocks"]:
            if b["kind"] == "conv":
                self.blocks.append(_conv_unit(c, b["cout"], b["k"], b["stride"], b["groups"],
                                              b["bn"], b["act"], b["bias"]))
                c = b["cout"]
            elif b["kind"] == "res":
                body = nn.Sequential(nn.Conv2d(c, c, b["k"], 1, b["k"] // 2,
                                               groups=c if b["dw"] else 1, bias=False),
                                     nn.BatchNorm2d(c))
                self.blocks.append(nn.ModuleDict({"body": body, "act": _act(b["act"])}))
            elif b["kind"] == "cat":
                d = {"a": _conv_unit(c, b["a"], 1, 1, 1, True, b["act"], False)}
                if b["b"]:
                    d["b"] = _conv_unit(c, b["b"], 3, 1, 1, True, b["act"], True)
                self.blocks.append(nn.ModuleDict(d))
                c = b["a"] + (b["b"] or c)
            else:
                self.blocks.append(nn.MaxPool2d(2) if b["op"] == "max" else nn.AvgPool2d(2))
        if spec["hidden"]:
            self.fc1 = nn.Linear(c, spec["hidden"])
            self.head_act = _act(spec["head_act"])
            c = spec["hidden"]
        else:
            self.fc1 = None
        self.fc = nn.Linear(c, spec["classes"])

    def forward(self, x):
        for kind, blk in zip(self.kinds, self.blocks):
            if kind == "res":
                x = blk["act"](x + blk["body"](x))
            elif kind == "cat":
                other = blk["b"](x) if "b" in blk else x
                x = torch.cat([blk["a"](x), other], 1)
            else:
                x = blk(x)
        x = x.mean((2, 3))
        if self.fc1 is not None:
            x = self.head_act(self.fc1(x))
        return self.fc(x)


def build_torch(spec: dict) -> nn.Module:
    """``SpecNet`` with BN statistics re-estimated on structured data (realistic ranges)
    and non-trivial BN affine parameters, in eval mode."""
    torch.manual_seed(spec["seed"])
    net = SpecNet(spec)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches below
        net.train()
        x = structured(64, spec["cin"], spec["size"], spec["seed"] + 1)
        for i in range(0, 64, 16):
            net(torch.from_numpy(x[i:i + 16]))
        for bn in bns:
            bn.momentum = 0.1
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return net.eval()


def quantizable(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def npu_fp16(model: nn.Module, names) -> set[str]:
    """Requested layers the NPU runs in FP16 anyway (the profile's rule)."""
    mods, profile = dict(model.named_modules()), load_profile()
    return {n for n in names if isinstance(mods[n], nn.Conv2d)
            and int8_skipped(mods[n].in_channels, mods[n].groups, profile)}


def run_torch_case(spec: dict, int8: list[str], tmp_path, *, n_eval: int = N_EVAL) -> dict:
    """Calibrate, export, compile, run; assert the three properties. Returns the figures."""
    from dopt.dopt_torch.opt_main import (generate_config_file, generate_final_model,
                                          optimize_model, set_calibrate_state)
    model = build_torch(spec)
    shape = f"x:1,{spec['cin']},{spec['size']},{spec['size']}"
    gen = tmp_path / "config_gen.json"
    generate_config_file(model, shape, dst_path=str(gen))
    doc = json.loads(gen.read_text())
    for name, e in doc["layer_strategy"].items():
        e["quant_strategy"] = INT8 if name in int8 else "float"
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(doc))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # narrow convolutions asked INT8 warn
        q = optimize_model(copy.deepcopy(model), str(cfg))
        set_calibrate_state(q, True)
        xc = structured(N_CAL, spec["cin"], spec["size"], spec["seed"] + 2)
        with torch.no_grad():
            for i in range(0, N_CAL, 16):
                q(torch.from_numpy(xc[i:i + 16]))
        set_calibrate_state(q, False)
        torch.save(q.state_dict(), tmp_path / "quant.pth")
        files = generate_final_model(copy.deepcopy(model), str(cfg), str(tmp_path / "quant.pth"),
                                     str(tmp_path / "final"))
    params = P.read_params(files["param_file"])
    expect = set(int8) - npu_fp16(model, int8)
    assert set(params["layers"]) == expect
    om, _report = compile_onnx(onnx.load(files["float_onnx"]), load_profile(), params=params,
                               input_shapes={"x": [1, spec["cin"], spec["size"], spec["size"]]})
    assert set(om.quant["int8_layers"]) == expect
    x = structured(n_eval, spec["cin"], spec["size"], spec["seed"] + 3)
    q.eval()
    with torch.no_grad():
        want = q(torch.from_numpy(x)).numpy()
    got = Session(om).run(x)[om.graph["outputs"][0]["name"]]
    r = check_agreement(want, got, f"spec {spec}, INT8 {sorted(int8)}", min_exact=MIN_EXACT)
    r["int8_kernels"] = check_int8_kernels_exact(om, {"x": x[:N_VERIFY]})
    return r


@st.composite
def torch_cases(draw):
    spec = draw(torch_specs())
    names = quantizable(SpecNet(spec))
    if draw(st.booleans()):  # the reference's recipe: every layer INT8
        return spec, names
    return spec, [n for n in names if draw(st.booleans())]


@FAST
@given(case=torch_cases())
def test_torch_fake_quant_predicts_the_npu(case, tmp_path_factory):
    spec, int8 = case
    run_torch_case(spec, int8, tmp_path_factory.mktemp("case"))


@pytest.mark.slow
@SLOW
@given(case=torch_cases())
def test_torch_fake_quant_predicts_the_npu_many(case, tmp_path_factory):
    spec, int8 = case
    run_torch_case(spec, int8, tmp_path_factory.mktemp("case"))


# ---- Keras ---------------------------------------------------------------------------

@st.composite
def keras_specs(draw):
    """A small Keras functional network (NHWC): blocks, head, INT8 subset (by position)."""
    cin = draw(st.sampled_from(WIDTHS))
    blocks, c = [], cin
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(("conv", "conv", "dw", "sep", "res", "cat", "pool")))
        act = draw(st.sampled_from(("none", "relu", "relu6", "leaky", "sigmoid", "tanh")))
        bn = draw(st.booleans())
        if kind == "conv":
            c = draw(st.sampled_from(WIDTHS[2:]))
            blocks.append(dict(kind="conv", cout=c, k=draw(st.sampled_from((1, 3))), bn=bn,
                               act=act, bias=draw(st.booleans())))
        elif kind == "sep":
            c = draw(st.sampled_from(WIDTHS[2:]))
            blocks.append(dict(kind="sep", cout=c, mult=draw(st.sampled_from((1, 2))), bn=bn,
                               act=act))
        elif kind == "cat":
            a = draw(st.sampled_from((4, 8, 20)))
            blocks.append(dict(kind="cat", a=a, act=act))
            c = a + c
        else:
            blocks.append(dict(kind=kind, bn=bn, act=act,
                               op=draw(st.sampled_from(("max", "avg")))))
    return dict(cin=cin, size=8, blocks=blocks, classes=draw(st.integers(3, 8)),
                int8_bits=draw(st.integers(0, 2 ** 12 - 1)), all_int8=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 16)))


def build_keras(spec: dict):
    """The Keras network a spec describes, with BN statistics from structured data and
    non-trivial BN affine parameters."""
    import keras
    L = keras.layers
    keras.utils.set_random_seed(spec["seed"])

    def act(x, name, i):
        if name == "none":
            return x
        if name == "relu6":
            return L.ReLU(6.0, name=f"act{i}")(x)
        if name == "leaky":
            return L.LeakyReLU(0.1, name=f"act{i}")(x)
        return L.Activation(name, name=f"act{i}")(x)

    inp = keras.Input((spec["size"], spec["size"], spec["cin"]), name="image")
    x = inp
    for i, b in enumerate(spec["blocks"]):
        k = b["kind"]
        if k == "conv":
            y = L.Conv2D(b["cout"], b["k"], padding="same", use_bias=b["bias"], name=f"conv{i}")(x)
        elif k == "dw":
            y = L.DepthwiseConv2D(3, padding="same", name=f"dw{i}")(x)
        elif k == "sep":
            y = L.SeparableConv2D(b["cout"], 3, padding="same", depth_multiplier=b["mult"],
                                  name=f"sep{i}")(x)
        elif k == "res":
            y = L.Conv2D(x.shape[-1], 1, use_bias=False, name=f"res{i}")(x)
            y = L.BatchNormalization(name=f"bn{i}")(y)
            x = act(L.Add(name=f"add{i}")([x, y]), b["act"], i)
            continue
        elif k == "cat":
            y = L.Conv2D(b["a"], 1, name=f"cat{i}")(x)
            x = L.Concatenate(name=f"concat{i}")([act(y, b["act"], i), x])
            continue
        else:
            pool = L.MaxPooling2D if b["op"] == "max" else L.AveragePooling2D
            x = pool(2, name=f"pool{i}")(x) if x.shape[1] >= 4 else x
            continue
        if b.get("bn"):
            y = L.BatchNormalization(name=f"bn{i}")(y)
        x = act(y, b["act"], i)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dense(spec["classes"], name="fc")(x)
    m = keras.Model(inp, x, name="spec")
    data = structured(64, spec["cin"], spec["size"], spec["seed"] + 1).transpose(0, 2, 3, 1)
    for layer in m.layers:
        if isinstance(layer, L.BatchNormalization):
            feats = keras.Model(inp, layer.input).predict(data, verbose=0)
            axes = tuple(range(feats.ndim - 1))
            rng = np.random.default_rng(spec["seed"])
            n = layer.gamma.shape
            layer.moving_mean.assign(feats.mean(axes))
            layer.moving_variance.assign(feats.var(axes) + 1e-3)
            layer.gamma.assign(rng.uniform(0.5, 1.5, n))
            layer.beta.assign(rng.uniform(-0.3, 0.3, n))
    return m


def run_keras_case(spec: dict, tmp_path, *, n_eval: int = N_EVAL) -> dict:
    from dopt_adapters.tensorflow import keras_api as KA, keras_export as KE
    model = build_keras(spec)
    gen = tmp_path / "config_gen.json"
    doc = KA.generate_config_file(model, str(gen))
    names = list(doc["layer_strategy"])
    int8 = [n for i, n in enumerate(names) if spec["all_int8"] or spec["int8_bits"] >> i & 1]
    for n, e in doc["layer_strategy"].items():
        e["quant_strategy"] = INT8 if n in int8 else "float"
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(doc))
    nhwc = lambda a: a.transpose(0, 2, 3, 1)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = KA.optimize_model(model, str(cfg))
        KA.set_calibrate_state(q, True)
        q.predict(nhwc(structured(N_CAL, spec["cin"], spec["size"], spec["seed"] + 2)),
                  batch_size=16, verbose=0)
        KA.set_calibrate_state(q, False)
        files = KE.generate_final_model(q, str(cfg), None, str(tmp_path / "final"))
    params = P.read_params(files["param_file"])
    fp16_parts = {p.name for w in _quant_wrappers(q) for p in w.parts if p.npu_fp16}
    want_records = {p.name for w in _quant_wrappers(q) for p in w.parts if not p.npu_fp16}
    assert set(params["layers"]) == want_records
    assert not fp16_parts & set(params["layers"])
    om, _report = compile_onnx(onnx.load(files["float_onnx"]), load_profile(), params=params)
    assert set(om.quant["int8_layers"]) == want_records
    x = nhwc(structured(n_eval, spec["cin"], spec["size"], spec["seed"] + 3))
    want = q.predict(x, batch_size=128, verbose=0)
    sess = Session(om)
    got = sess.run(x)[sess.outputs[0]]
    r = check_agreement(want, got, f"keras spec {spec}")
    r["int8_kernels"] = check_int8_kernels_exact(om, {sess.inputs[0]["name"]: x[:N_VERIFY]})
    return r


def _quant_wrappers(q):
    from dopt_adapters.tensorflow import keras_layers as KL
    return list(KL.quant_wrappers(q))


# ---- dopt_so on an ONNX model ------------------------------------------------------------

def run_so_case(spec: dict, int8_bits: int, tmp_path, *, n_eval: int = N_EVAL) -> dict:
    """``dopt_so``'s ONNX path (``quantize_onnx``, what ``dopt_so --framework 5 --model
    m.onnx`` runs) on the exported float network; the layers not drawn are ``exclude_op``.
    Its fake-quant model is the QDQ file on ONNX Runtime (float32 between the Q/DQ pairs,
    where the NPU computes FP16): top-1 agreement with the compiled ``.om``, near ties
    apart, and bit-exact INT8 kernels."""
    from dopt.formats import qdq as onnx_qdq
    from dopt_adapters.onnx.ptq_backend import quantize_onnx
    model = build_torch(spec)
    shape = [1, spec["cin"], spec["size"], spec["size"]]
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(shape),), str(path), dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}})
    layers = sorted(onnx_qdq.graph_layers(onnx.load(str(path))))
    exclude = [n for i, n in enumerate(layers) if not int8_bits >> i & 1]
    if len(exclude) == len(layers):
        exclude = exclude[1:]
    xc = structured(N_CAL, spec["cin"], spec["size"], spec["seed"] + 2)

    def feeds():
        return iter([{"x": xc[i:i + 16]} for i in range(0, N_CAL, 16)])
    try:
        r = quantize_onnx(str(path), feeds, output=str(tmp_path / "q.onnx"),
                          param_file=str(tmp_path / "q_param"), input_shapes={"x": shape},
                          check=True, exclude=exclude)
    except DoptError as e:  # every drawn layer is one the NPU runs in FP16: refused, rightly
        assert "no layer is left to quantize" in str(e)
        drawn = set(layers) - set(exclude)
        assert _onnx_npu_fp16(path, drawn) == drawn
        return None
    params = P.read_params(tmp_path / "q_param")
    assert set(params["layers"]) == set(r.quantized)
    om, _report = compile_onnx(onnx.load(str(tmp_path / "q.onnx")), load_profile(),
                               params=params, input_shapes={"x": shape})
    assert set(om.quant["int8_layers"]) == set(r.quantized)
    x = structured(n_eval, spec["cin"], spec["size"], spec["seed"] + 3)
    qdq = onnx.load(str(tmp_path / "q.onnx"))
    want = onnx_qdq.ort_session(qdq_with_npu_fp16(qdq).SerializeToString()).run(None, {"x": x})[0]
    plain = onnx_qdq.ort_session(qdq.SerializeToString()).run(None, {"x": x})[0]
    sess = Session(om)
    got = sess.run(x)[sess.outputs[0]]
    out = check_agreement(want, got, f"dopt_so spec {spec}, excluded {exclude}",
                          min_exact=MIN_EXACT)
    out["plain_qdq_agreement"] = float((plain.argmax(1) == got.argmax(1)).mean())
    out["int8_kernels"] = check_int8_kernels_exact(om, {"x": x[:N_VERIFY]})
    return out


def qdq_with_npu_fp16(model):
    """The reference the ``.om`` must reproduce: the QDQ model with the NPU's data types
    (``dopt.formats.qdq.with_npu_data_types``)."""
    from dopt.formats.qdq import with_npu_data_types
    return with_npu_data_types(model)


def _onnx_npu_fp16(path, names) -> set[str]:
    """ONNX Conv nodes among ``names`` that the NPU runs in FP16 (the profile's rule)."""
    from onnx import numpy_helper
    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    out = set()
    for n in m.graph.node:
        if n.name in names and n.op_type == "Conv":
            g = next((a.i for a in n.attribute if a.name == "group"), 1)
            if int8_skipped(inits[n.input[1]].shape[1] * g, g, load_profile()):
                out.add(n.name)
    return out


KERAS_FAST = settings(FAST, max_examples=int(os.environ.get("DOPT_FIDELITY_KERAS_EXAMPLES", "2")))
KERAS_SLOW = settings(SLOW, max_examples=int(os.environ.get("DOPT_FIDELITY_KERAS_SLOW", "20")))


def _keras():
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("Keras runs on another backend")


@KERAS_FAST
@given(spec=keras_specs())
def test_keras_fake_quant_predicts_the_npu(spec, tmp_path_factory):
    _keras()
    run_keras_case(spec, tmp_path_factory.mktemp("keras"))


@pytest.mark.slow
@KERAS_SLOW
@given(spec=keras_specs())
def test_keras_fake_quant_predicts_the_npu_many(spec, tmp_path_factory):
    _keras()
    run_keras_case(spec, tmp_path_factory.mktemp("keras"))


@FAST
@given(spec=torch_specs(), int8_bits=st.integers(0, 2 ** 12 - 1))
def test_dopt_so_onnx_qdq_predicts_the_npu(spec, int8_bits, tmp_path_factory):
    run_so_case(spec, int8_bits, tmp_path_factory.mktemp("so"))


@pytest.mark.slow
@SLOW
@given(spec=torch_specs(), int8_bits=st.integers(0, 2 ** 12 - 1))
def test_dopt_so_onnx_qdq_predicts_the_npu_many(spec, int8_bits, tmp_path_factory):
    run_so_case(spec, int8_bits, tmp_path_factory.mktemp("so"))


# ---- regressions: cases Hypothesis shrank to a failure ----------------------------------

def test_regression_residual_add_reads_the_fp16_input(tmp_path):
    """A residual add of the model's input: on the NPU the input is FP16 and the add's
    output is rounded to FP16 before the activation and the mean; the fake-quant model
    added the float32 input and rounded only at the next layer's edge, which moved an
    INT8 input across a quantization step (1 of 512 top-1 disagreements, logits 0.8 %
    off). Fixed: in eval the model reads its inputs as FP16 and rounds every op's output."""
    spec = {"cin": 32, "size": 12, "blocks": [{"kind": "res", "k": 1, "dw": False,
                                               "act": "leaky"}],
            "hidden": 24, "head_act": "leaky", "classes": 3, "seed": 0}
    r = run_torch_case(spec, ["blocks.0.body.0", "fc", "fc1"], tmp_path)
    assert r["disagreements"] == 0 and r["max_rel_diff"] < 1e-3


@pytest.mark.parametrize("act,depthwise", [("silu", True), ("gelu_tanh", False),
                                           ("mish", False)])
def test_regression_activations_round_like_their_exported_kernels(act, depthwise, tmp_path,
                                                                   monkeypatch):
    """SiLU exports as two ONNX ops (Sigmoid, Mul), GELU (tanh form) as nine and Mish as
    three (Softplus, Tanh, Mul), one FP16 kernel each on the NPU; the fake-quant model
    rounded each activation once. SiLU: on EfficientNet-B0 the inputs of its quantized
    layers moved by a step at 0.7 % of the elements after the first block; GELU: 46 % of
    the samples were bit-identical. (The exact GELU's ``Erf`` is computed by ONNX Runtime's
    own approximation, which differs from PyTorch's in the last float32 place for 14 % of
    inputs: that case stays at 69 %.)"""
    orig = _act
    module = {"silu": nn.SiLU(inplace=True), "gelu_tanh": nn.GELU(approximate="tanh"),
              "mish": nn.Mish()}[act]
    monkeypatch.setattr(sys.modules[__name__], "_act",
                        lambda name: module if name == "x" else orig(name))
    blocks = [dict(kind="conv", cout=32, k=3, stride=1, groups=1, bn=True, act="x", bias=False),
              dict(kind="conv", cout=32, k=3, stride=1, groups=32, bn=True, act="x", bias=False),
              dict(kind="conv", cout=48, k=1, stride=1, groups=1, bn=True, act="x", bias=False)]
    spec = {"cin": 24, "size": 12, "blocks": blocks if depthwise else blocks[::2], "hidden": 0,
            "head_act": "x", "classes": 5, "seed": 3}
    r = run_torch_case(spec, quantizable(SpecNet(spec)), tmp_path)
    assert r["disagreements"] == 0 and r["exact"] >= MIN_EXACT, r


def test_regression_narrow_convolutions_asked_int8(tmp_path):
    """The reference's recipe on a network whose convolutions have Cin <= 16 (a grouped one
    too): before, they were fake-quantized INT8 while the NPU ran them in FP16; the
    logits differed on most samples."""
    spec = {"cin": 12, "size": 8, "blocks": [
        {"kind": "conv", "cout": 8, "k": 3, "stride": 1, "groups": 4, "bn": False,
         "act": "relu", "bias": True},
        {"kind": "conv", "cout": 32, "k": 1, "stride": 1, "groups": 1, "bn": True,
         "act": "none", "bias": True},
        {"kind": "conv", "cout": 32, "k": 3, "stride": 1, "groups": 1, "bn": True,
         "act": "relu6", "bias": False}], "hidden": 0, "head_act": "relu", "classes": 6,
        "seed": 11}
    names = quantizable(SpecNet(spec))
    r = run_torch_case(spec, names, tmp_path)
    assert r["exact"] >= MIN_EXACT


@pytest.mark.parametrize("spec,int8_bits", [
    ({"cin": 1, "size": 16, "blocks": [
        {"kind": "conv", "cout": 24, "k": 3, "stride": 2, "groups": 1, "bn": True,
         "act": "hardswish", "bias": True},
        {"kind": "cat", "a": 8, "b": 0, "act": "sigmoid"},
        {"kind": "conv", "cout": 32, "k": 3, "stride": 2, "groups": 1, "bn": True, "act": "relu",
         "bias": True},
        {"kind": "conv", "cout": 12, "k": 3, "stride": 1, "groups": 4, "bn": False,
         "act": "sigmoid", "bias": False}], "hidden": 24, "head_act": "tanh", "classes": 7,
      "seed": 309}, 1246),
    ({"cin": 12, "size": 8, "blocks": [
        {"kind": "conv", "cout": 8, "k": 3, "stride": 1, "groups": 2, "bn": False, "act": "relu",
         "bias": False},
        {"kind": "cat", "a": 4, "b": 16, "act": "none"},
        {"kind": "conv", "cout": 4, "k": 3, "stride": 1, "groups": 1, "bn": False, "act": "none",
         "bias": False},
        {"kind": "res", "k": 1, "dw": False, "act": "none"}], "hidden": 0, "head_act": "relu",
      "classes": 3, "seed": 6589}, 32),
])
def test_regression_dopt_so_reference_has_the_npu_data_types(spec, int8_bits, tmp_path):
    """Shrunk from the slow profile: against the float32 QDQ file the ``.om`` disagreed on
    1.2 % / 0.2 % of top-1 decisions (logits squashed by sigmoid and tanh sit close; FP16
    between the layers moves them). Against the QDQ file with the NPU's data types
    (``qdq_with_npu_fp16``) every decision agrees and nearly every sample is bit-identical:
    not all, because an FP16 convolution's accumulation order is not specified (the 1-ULP
    bound of docs/numerics.md) and ONNX Runtime picks its convolution kernels by CPU, so on
    some machines one FP16 step moves an INT8 input across a quantization step (seen: 2 of
    512 samples, logits 0.5 % apart, on one of the machines the suite runs on)."""
    r = run_so_case(spec, int8_bits, tmp_path)
    assert r["disagreements"] == 0 and r["exact"] >= 0.99 and r["max_rel_diff"] < 0.02


# ---- the reference's recipe on the shipped Fashion-MNIST networks ------------------------

def reference_recipe(name: str, n_test: int, tmp_path) -> float:
    """Every layer ``Quant_INT8-8`` (the reference tutorial's recipe) on a shipped
    Fashion-MNIST network (one-channel first convolution), calibrated on 512 training
    images: top-1 agreement (%) of the fake-quant model with the INT8 ``.om`` on the
    emulated NPU over the first ``n_test`` test images."""
    from dopt.dopt_torch.opt_main import (generate_config_file, generate_final_model,
                                          optimize_model, set_calibrate_state)
    from demos.fashion_mnist import data, demo, models
    xte, _ = data.load("test")
    xtr, _ = data.load("train")
    xte = xte[:n_test]
    model = demo.build_float(name)
    generate_config_file(model, "x:1,1,28,28", dst_path=str(tmp_path / "gen.json"))
    cfg = json.loads((tmp_path / "gen.json").read_text())
    for e in cfg["layer_strategy"].values():
        e["quant_strategy"] = INT8
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    narrow = npu_fp16(model, list(cfg["layer_strategy"]))
    with pytest.warns(UserWarning, match="training and inference"):
        q = optimize_model(model, str(tmp_path / "cfg.json"))
    set_calibrate_state(q, True)
    with torch.no_grad():
        for i in range(0, 512, 128):
            q(torch.from_numpy(xtr[i:i + 128]))
    set_calibrate_state(q, False)
    torch.save(q.state_dict(), tmp_path / "q.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = generate_final_model(models.build(name), str(tmp_path / "cfg.json"),
                                     str(tmp_path / "q.pth"), str(tmp_path / "final"))
    params = P.read_params(files["param_file"])
    om, _ = compile_onnx(onnx.load(files["float_onnx"]), load_profile(), params=params,
                         input_shapes={"x": [1, 1, 28, 28]})
    assert narrow and not narrow & (set(om.quant["int8_layers"]) | set(params["layers"]))
    pred_fq = demo.predict(q, xte)
    pred_npu = Session(om).predict(xte, batch_size=500).argmax(1)
    return 100 * float((pred_fq == pred_npu).mean())


def test_reference_recipe_on_a_one_channel_network(tmp_path):
    """ResNet8 (stem Cin=1, four more convolutions with Cin=16): 99.72 % before (10k
    images), now at least 99.9 %."""
    assert reference_recipe("resnet8", 2000, tmp_path) >= 99.9


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenetv2s", "resnet8"])
def test_reference_recipe_full_test_set(name, tmp_path):
    """The issue's measurement: MobileNetV2S gave 99.38 %, ResNet8 99.72 %."""
    assert reference_recipe(name, 10000, tmp_path) >= 99.9
