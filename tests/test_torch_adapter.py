import json
from pathlib import Path
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from dopt import DoptError  # noqa: E402
from dopt.quant import numerics as nm  # noqa: E402
from dopt.formats import param_file as P  # noqa: E402
from dopt.dopt_torch.opt_main import (freeze_bn_stats, generate_config_file,  # noqa: E402
                                      generate_final_model, get_quant_loss, optimize_model,
                                      set_calibrate_state)
from dopt_adapters.torch import fake_quant as fq  # noqa: E402
from dopt_adapters.torch.modules import quant_layers  # noqa: E402

from tests.tiny_net import WIDE_SHAPE, build, build_wide  # noqa: E402

CONV = "<class 'torch.nn.modules.conv.Conv2d'>"
LIN = "<class 'torch.nn.modules.linear.Linear'>"


def wide_data(n, generator=None):
    return torch.randn(n, 20, 16, 16, generator=generator)


def write_cfg(tmp_path, model, quantize="all", shape="x:1,3,16,16"):
    gen = tmp_path / "config_gen.json"
    generate_config_file(model, shape, dst_path=str(gen))
    cfg = json.loads(gen.read_text())
    for name, e in cfg["layer_strategy"].items():
        if quantize == "all" or name in quantize:
            e["quant_strategy"] = "Quant_INT8-8"
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    return p


def calibrated(tmp_path, n=64, seed=0):
    """WideNet, every layer INT8 (all run INT8 on the NPU), calibrated on random data."""
    model = build_wide()
    cfg = write_cfg(tmp_path, model, shape=WIDE_SHAPE)
    q = optimize_model(model, str(cfg))
    set_calibrate_state(q, True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(4):
            q(wide_data(n // 4, g))
    set_calibrate_state(q, False)
    return q, cfg


def test_wide_net_runs_int8_everywhere_on_the_npu():
    """The tests below quantize WideNet because the NPU really runs its layers in INT8."""
    from dopt_adapters.torch.api import npu_skips_int8
    m = build_wide()
    assert npu_skips_int8(dict(m.named_modules()), ["conv1", "dw", "pw", "grouped", "fc"]) == []
    assert npu_skips_int8(dict(build().named_modules()), ["conv1", "dw", "pw", "grouped"]) == \
        ["conv1", "pw", "grouped"]


def test_config_matches_reference_format(tmp_path):
    doc = generate_config_file(build(), "x:1,3,16,16", dst_path=str(tmp_path / "c.json"))
    on_disk = json.loads((tmp_path / "c.json").read_text())
    assert doc == on_disk
    assert on_disk[f"quant_strategy_for op '{CONV}'"] == ["Quant_INT8-8"]
    assert on_disk[f"quant_strategy_for op '{LIN}'"] == ["Quant_INT8-8"]
    assert on_disk["input_shape"] == "x:1,3,16,16"
    assert list(on_disk["layer_strategy"]) == ["conv1", "dw", "pw", "grouped", "fc"]
    assert on_disk["layer_strategy"]["dw"] == {"op_type": CONV, "quant_strategy": "float"}
    assert list(on_disk)[-1] == "layer_strategy"


def test_torch_fake_quant_is_bit_exact_with_core():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10000, generator=g) * 3
    x[:5] = torch.tensor([0.5, 1.5, -2.5, 0.0, 100.0]) * (8 / 255)  # ties and clamp
    lo, hi = torch.tensor(-2.0), torch.tensor(6.0)
    s, o = fq.activation_qparams_float(-2.0, 6.0)
    s_np, o_np = nm.activation_qparams(-2.0, 6.0)
    assert s == s_np and o == o_np
    got = fq.fake_quant_activation(x, lo, hi).numpy()
    assert np.array_equal(got, nm.fake_quant_activation(x.numpy(), s_np, o_np))
    w = torch.randn(6, 4, 3, 3, generator=g)
    w[2] = 0
    sw = fq.weight_scales(w)
    assert np.array_equal(sw.numpy(), nm.weight_scales(w.numpy()))
    assert np.array_equal(fq.fake_quant_weight(w, sw).detach().numpy(),
                          nm.fake_quant_weight(w.numpy(), sw.numpy()))
    b = torch.randn(6, generator=g)
    bq = fq.fake_quant_bias(b, s, sw).numpy()
    ref = nm.quantize_bias(b.numpy(), s_np, sw.numpy()) * nm.bias_scales(s_np, sw.numpy())
    assert np.array_equal(bq, ref.astype(np.float32))


def test_fake_quant_gradients_ste_and_range():
    x = torch.tensor([-5.0, 0.3, 2.0, 50.0], requires_grad=True)
    lo = torch.tensor(-1.0, requires_grad=True)
    hi = torch.tensor(4.0, requires_grad=True)
    y = fq.fake_quant_activation(x, lo, hi)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]  # straight through inside, zero outside
    # clipped 50 pulls hi up; clipped -5 pulls lo down (grad > 0)
    assert hi.grad.item() > 0 and lo.grad.item() > 0


def test_ste_mask_is_the_clamp_range_at_its_edges():
    # the gradient passes where the clamp leaves rint(x/s) alone: up to half a step past
    # each end of [qmin - o, qmax - o], taken from x in one pass (no saved mask)
    lo, hi = torch.tensor(-1.0, requires_grad=True), torch.tensor(4.0, requires_grad=True)
    s, o = fq.activation_qparams_float(-1.0, 4.0)
    a, b = fq.QMIN - o, fq.QMAX - o
    x = torch.tensor([a * s, (a - 0.4) * s, (a - 0.6) * s, b * s, (b + 0.4) * s,
                      (b + 0.6) * s], requires_grad=True)
    y = fq.fake_quant_activation(x, lo, hi)
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    r = torch.round(x.detach() / s)
    assert ((r >= a) & (r <= b)).tolist() == [g == 1.0 for g in x.grad.tolist()]


def test_optimize_calibrate_and_fold(tmp_path):
    q, _ = calibrated(tmp_path)
    names = [n for n, _ in quant_layers(q)]
    assert names == ["conv1", "dw", "pw", "grouped", "fc"]
    layers = dict(quant_layers(q))
    assert layers["conv1"].bn_name == "bn1" and layers["dw"].bn_name == "bn_dw"
    assert layers["pw"].bn is None and layers["grouped"].bn_name == "bn2"
    assert isinstance(q.bn1, torch.nn.Identity)
    for _, m in quant_layers(q):
        assert int(m.act.initialized) == 1 and m.act.hi.item() > m.act.lo.item()
    # eval output with quantization disabled in spirit: close to the float model
    ref = build_wide().eval()
    x = wide_data(8)
    q.eval()
    with torch.no_grad():
        d = (q(x) - ref(x)).abs().max().item()
    assert 0 < d < 0.1 * ref(x).abs().max().item()


def test_calibration_min_max_equals_observed(tmp_path):
    model = build_wide()
    cfg = write_cfg(tmp_path, model, quantize=["conv1"], shape=WIDE_SHAPE)
    q = optimize_model(model, str(cfg))
    set_calibrate_state(q, True)
    xs = [wide_data(4) for _ in range(3)]
    with torch.no_grad():
        outs = [q(x) for x in xs]
    set_calibrate_state(q, False)
    act = q.conv1.act
    assert act.lo.item() == pytest.approx(min(x.min().item() for x in xs))
    assert act.hi.item() == pytest.approx(max(x.max().item() for x in xs))
    # calibration forward passes are float: equal to the float model (BN running stats)
    ref = build_wide().eval()
    with torch.no_grad():
        assert torch.allclose(outs[0], ref(xs[0]), atol=1e-5)


def test_qat_train_step_changes_ranges_and_weights(tmp_path):
    q, _ = calibrated(tmp_path)
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=0.05)
    hi0 = q.conv1.act.hi.item()
    w0 = q.conv1.layer.weight.detach().clone()
    rm0 = q.conv1.bn.running_mean.clone()
    x, y = wide_data(16) * 2, torch.randint(0, 5, (16,))
    # ranges get LSQ-scaled gradients (1/sqrt(N*127)): a large loss makes one step visible
    loss = 100 * torch.nn.functional.cross_entropy(q(x), y) + 0.05 * get_quant_loss(q)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert q.conv1.act.hi.item() != hi0
    assert not torch.equal(q.conv1.layer.weight, w0)
    assert not torch.equal(q.conv1.bn.running_mean, rm0)  # BN statistics still update in QAT


def test_quant_loss_zero_without_quantized_layers(tmp_path):
    model = build()
    cfg = write_cfg(tmp_path, model, quantize=[])
    q = optimize_model(model, str(cfg))
    loss = get_quant_loss(q)
    assert float(loss) == 0.0
    q2, _ = calibrated(tmp_path / "b" if (tmp_path / "b").mkdir() is None else tmp_path)
    ql = get_quant_loss(q2)
    assert 0 < float(ql) < 0.25 and ql.requires_grad


def test_checkpoint_round_trip(tmp_path):
    q, cfg = calibrated(tmp_path)
    q.eval()
    pth = tmp_path / "quant.pth"
    torch.save(q.state_dict(), pth)
    q2 = optimize_model(build_wide(), str(cfg))
    q2.load_state_dict(torch.load(pth, weights_only=True))
    q2.eval()
    x = wide_data(4)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))


def test_generate_final_model_outputs(tmp_path):
    q, cfg = calibrated(tmp_path)
    pth = tmp_path / "quant.pth"
    torch.save(q.state_dict(), pth)
    out = tmp_path / "final"
    files = generate_final_model(build_wide(), str(cfg), pth_file=str(pth), output_dir=str(out))
    assert sorted(os.listdir(out)) == ["model_fused.onnx", "model_qdq.onnx", "quant_param.json"]
    fused = onnx.load(files["float_onnx"])
    ops = [n.op_type for n in fused.graph.node]
    assert "BatchNormalization" not in ops
    names = {n.name for n in fused.graph.node}
    assert {"conv1", "dw", "pw", "grouped", "fc"} <= names
    doc = P.read_params(files["param_file"])
    assert set(doc["layers"]) == {"conv1", "dw", "pw", "grouped", "fc"}
    rec = doc["layers"]["conv1"]
    assert rec["folded_bn"] == "bn1" and len(rec["weight"]["scales"]) == 24
    s, o = q.conv1.act.qparams()
    assert rec["input"]["scale"] == s and rec["input"]["offset"] == o
    # QDQ on ONNX Runtime agrees with the fake-quant model on fresh inputs
    qdq = onnx.load(files["qdq_onnx"])
    assert qdq.opset_import[0].version >= 13
    assert sum(n.op_type == "QuantizeLinear" for n in qdq.graph.node) == 5
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(files["qdq_onnx"], so, providers=["CPUExecutionProvider"])
    x = wide_data(32)
    q.eval()
    with torch.no_grad():
        ref = q(x).numpy()
    got = sess.run(None, {"x": x.numpy()})[0]
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.99
    assert np.abs(ref - got).max() <= 0.02 * np.abs(ref).max()


def test_param_file_round_trips_exactly(tmp_path):
    q, cfg = calibrated(tmp_path)
    torch.save(q.state_dict(), tmp_path / "quant.pth")
    files = generate_final_model(build_wide(), str(cfg), str(tmp_path / "quant.pth"),
                                 str(tmp_path / "o"))
    doc = P.read_params(files["param_file"])
    P.write_params(tmp_path / "again.json", doc)
    assert P.read_params(tmp_path / "again.json") == doc
    assert (tmp_path / "again.json").read_bytes() == open(files["param_file"], "rb").read()
    s = doc["layers"]["dw"]["weight"]["scales"]
    assert all(np.float32(v) == v for v in s)  # exact float32 values


# ---- convolutions the NPU runs in FP16 although INT8 is asked (Cin too small) ----

def _narrow_model(tmp_path):
    """TinyNet with every layer asked INT8: conv1 (Cin 3), pw and grouped (Cin 8) run in
    FP16 on the NPU, dw (depthwise, exempt) and fc in INT8."""
    from dopt.npu.profile import load_profile
    from dopt.npu.rules import int8_skip_reason
    model = build()
    cfg = write_cfg(tmp_path, model)
    reason = int8_skip_reason(3, load_profile())
    with pytest.warns(UserWarning, match=r"conv1 \(" + reason.replace("(", r"\(")
                      .replace(")", r"\)") + r"\).*training and inference"):
        q = optimize_model(model, str(cfg))
    set_calibrate_state(q, True)
    with torch.no_grad():
        q(torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    set_calibrate_state(q, False)
    return q, cfg


def test_narrow_convolution_is_the_npu_fp16_kernel_in_inference(tmp_path):
    from dopt_adapters.torch.modules import NpuFp16Conv2d, npu_fp16_layers
    from dopt_adapters.torch.npu_edges import npu_numerics
    q, _ = _narrow_model(tmp_path)
    assert [n for n, _ in quant_layers(q)] == ["dw", "fc"]
    assert [n for n, _ in npu_fp16_layers(q)] == ["conv1", "pw", "grouped"]
    assert isinstance(q.conv1, NpuFp16Conv2d) and q.conv1.bn_name == "bn1"
    assert isinstance(q.bn1, torch.nn.Identity)
    ref = build().eval()
    x = torch.randn(8, 3, 16, 16) * 3
    h = lambda t: t.half().float()  # noqa: E731
    f = ref.bn1.weight / torch.sqrt(ref.bn1.running_var + ref.bn1.eps)
    wf = ref.conv1.weight * f.reshape(-1, 1, 1, 1)
    bf = ref.bn1.bias - ref.bn1.running_mean * f
    q.eval()
    with torch.no_grad():
        want = h(torch.nn.functional.conv2d(h(x), h(wf), h(bf), padding=1))
        assert torch.equal(q.conv1(x), want)  # what the compiled FP16 kernel computes
        with npu_numerics(False):  # the export's float32 form: the folded float layer
            assert torch.allclose(q.conv1(x), ref.bn1(ref.conv1(x)), atol=1e-5)


def test_narrow_convolution_trains_as_fp16_with_straight_through_gradients(tmp_path):
    q, _ = _narrow_model(tmp_path)
    q.train()
    x = torch.randn(8, 3, 16, 16, requires_grad=True)
    rm0 = q.conv1.bn.running_mean.clone()
    y = q.conv1(x)
    assert torch.equal(y, y.half().float())  # FP16 values, as the NPU's output
    assert not torch.equal(q.conv1.bn.running_mean, rm0)  # BN statistics still update
    # a tiny loss: gradients far below FP16's smallest subnormal still reach the weights
    (y.sum() * 1e-12).backward()
    assert q.conv1.layer.weight.grad.abs().min() > 0 and x.grad.abs().max() > 0
    freeze_bn_stats(q)
    rm1 = q.conv1.bn.running_mean.clone()
    q.conv1(x)
    assert torch.equal(q.conv1.bn.running_mean, rm1)


def test_in_place_fp16_rounding_is_the_straight_through_rounding():
    from dopt_adapters.torch.modules import round_fp16_ste, round_fp16_ste_
    w = torch.randn(4, 3, requires_grad=True)
    g = torch.randn(4, 3)
    a, b = w * 1.7, w * 1.7  # new tensors, nobody else holds them
    ya, yb = round_fp16_ste(a), round_fp16_ste_(b)
    assert yb is b and torch.equal(ya, yb) and torch.equal(yb, yb.half().float())
    ga, = torch.autograd.grad(ya, w, g)
    gb, = torch.autograd.grad(yb, w, g)
    assert torch.equal(ga, gb) and torch.equal(ga, g * 1.7)
    # a tensor some node saved for its backward is refused at backward, not silently wrong
    c = w.exp()  # exp's backward keeps its output
    round_fp16_ste_(c)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        c.sum().backward()


def test_the_quant_model_runs_clamps_out_of_place_with_the_same_values(tmp_path):
    # in-place hardtanh copies its input under autograd: the quant model runs it out of
    # place (one pass less); outputs and gradients are unchanged
    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU6(True),
                                   torch.nn.Conv2d(8, 4, 3, padding=1),
                                   torch.nn.Hardtanh(-1.0, 1.0, inplace=True))
    cfg = tmp_path / "gen.json"
    generate_config_file(net(), "input:1,3,8,8", dst_path=str(cfg))
    q = optimize_model(net(), str(cfg))
    assert [m.inplace for m in q.modules() if isinstance(m, torch.nn.Hardtanh)] == [False, False]
    ref = optimize_model(net(), str(cfg))
    for m in ref.modules():
        if isinstance(m, torch.nn.Hardtanh):
            m.inplace = True
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    outs = []
    for m in (q, ref):
        m.train()
        y = m(x)
        y.square().sum().backward()
        outs.append((y.detach(), [p.grad for p in m.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


def test_narrow_convolutions_export_as_float_and_compile_to_fp16(tmp_path):
    from dopt.npu.compiler import compile_onnx
    from dopt.npu.profile import load_profile
    from dopt.runtime import Session
    q, cfg = _narrow_model(tmp_path)
    torch.save(q.state_dict(), tmp_path / "quant.pth")
    with pytest.warns(UserWarning, match="conv1"):
        files = generate_final_model(build(), str(cfg), str(tmp_path / "quant.pth"),
                                     str(tmp_path / "out"))
    doc = P.read_params(files["param_file"])
    assert set(doc["layers"]) == {"dw", "fc"}  # no INT8 claim for the FP16 layers
    assert {"conv1", "pw", "grouped"} <= set(doc["float_layers"])
    om, report = compile_onnx(onnx.load(files["float_onnx"]), load_profile(), params=doc,
                              input_shapes={"x": [1, 3, 16, 16]})
    assert om.quant["int8_layers"] == ["dw", "fc"]
    findings = [f["rule"] for r in report["nodes"] for f in r.get("findings", [])]
    assert "int8_min_cin" not in findings
    x = torch.randn(512, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    q.eval()
    with torch.no_grad():
        want = q(x).numpy()
    got = Session(om).run(x.numpy())[om.graph["outputs"][0]["name"]]
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.999
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()


# ---- bad inputs: one-paragraph errors, nothing written ----

def _err(fn, *a, **k):
    with pytest.raises(DoptError) as ei:
        fn(*a, **k)
    msg = str(ei.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_config_names_missing_layer(tmp_path):
    cfg = write_cfg(tmp_path, build())
    doc = json.loads(cfg.read_text())
    doc["layer_strategy"]["conv9"] = {"op_type": CONV, "quant_strategy": "Quant_INT8-8"}
    cfg.write_text(json.dumps(doc))
    msg = _err(optimize_model, build(), str(cfg))
    assert "conv9" in msg and str(cfg) in msg and "layer_strategy.conv9" in msg


def test_config_unknown_strategy(tmp_path):
    cfg = write_cfg(tmp_path, build())
    doc = json.loads(cfg.read_text())
    doc["layer_strategy"]["fc"]["quant_strategy"] = "Quant_INT4-4"
    cfg.write_text(json.dumps(doc))
    msg = _err(optimize_model, build(), str(cfg))
    assert "Quant_INT4-4" in msg and "layer_strategy.fc.quant_strategy" in msg


def test_config_bad_json_gives_line_and_column(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{\n  "layer_strategy": {,}\n}')
    msg = _err(optimize_model, build(), str(p))
    assert "line 2" in msg and "column" in msg and str(p) in msg


def test_config_op_type_mismatch(tmp_path):
    cfg = write_cfg(tmp_path, build())
    doc = json.loads(cfg.read_text())
    doc["layer_strategy"]["fc"]["op_type"] = CONV
    cfg.write_text(json.dumps(doc))
    assert "layer_strategy.fc.op_type" in _err(optimize_model, build(), str(cfg))


@pytest.mark.parametrize("shape", ["x:1,3,a,16", "x1,3,16,16", "y:1,3,16,16", "x:1,3,0,16", ""])
def test_wrong_input_shape(tmp_path, shape):
    msg = _err(generate_config_file, build(), shape, dst_path=str(tmp_path / "c.json"))
    assert "input_shape" in msg
    assert not (tmp_path / "c.json").exists()


def _final_err(tmp_path, pth):
    q, cfg = calibrated(tmp_path)
    out = tmp_path / "final"
    msg = _err(generate_final_model, build_wide(), str(cfg), pth_file=str(pth),
               output_dir=str(out))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dopt")]
    return msg


def test_corrupt_pth(tmp_path):
    pth = tmp_path / "quant.pth"
    pth.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    msg = _final_err(tmp_path, pth)
    assert str(pth) in msg and "not a readable PyTorch checkpoint" in msg


def test_truncated_pth(tmp_path):
    q, _ = calibrated(tmp_path)
    full = tmp_path / "full.pth"
    torch.save(q.state_dict(), full)
    pth = tmp_path / "quant.pth"
    pth.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert str(pth) in _final_err(tmp_path, pth)


def test_pth_not_a_state_dict(tmp_path):
    pth = tmp_path / "quant.pth"
    torch.save([torch.zeros(3)], pth)
    msg = _final_err(tmp_path, pth)
    assert "state dict" in msg and str(pth) in msg


def test_pth_with_pickled_code_is_refused(tmp_path):
    pth = tmp_path / "quant.pth"
    torch.save({"x": torch.nn.ReLU()}, pth)  # arbitrary object: never unpickled
    assert "not a readable PyTorch checkpoint" in _final_err(tmp_path, pth)


def test_float_checkpoint_instead_of_quant(tmp_path):
    pth = tmp_path / "float.pth"
    torch.save(build_wide().state_dict(), pth)
    msg = _final_err(tmp_path, pth)
    assert "does not match the quantized model" in msg and "float checkpoint" in msg


def test_uncalibrated_checkpoint(tmp_path):
    model = build()
    cfg = write_cfg(tmp_path, model)
    q = optimize_model(model, str(cfg))
    pth = tmp_path / "quant.pth"
    torch.save(q.state_dict(), pth)
    msg = _err(generate_final_model, build(), str(cfg), pth_file=str(pth),
               output_dir=str(tmp_path / "out"))
    assert "no activation range" in msg and not (tmp_path / "out").exists()


def test_ddp_wrapped_model_rejected_by_optimize(tmp_path):
    cfg = write_cfg(tmp_path, build())
    wrapped = torch.nn.DataParallel(build())
    assert "DataParallel" in _err(optimize_model, wrapped, str(cfg))


def test_non_module_rejected():
    msg = _err(generate_config_file, object(), "x:1,3,16,16")
    assert "torch.nn.Module" in msg


def test_export_check_catches_a_wrong_qdq_model(tmp_path, monkeypatch):
    """The post-export ONNX Runtime check is an error, not a warning."""
    from dopt.formats import qdq as onnx_qdq
    q, cfg = calibrated(tmp_path)
    torch.save(q.state_dict(), tmp_path / "quant.pth")
    real = onnx_qdq.build_qdq

    def skewed(model, doc):
        doc = json.loads(json.dumps(doc))
        doc["layers"]["conv1"]["input"]["scale"] *= 0.2  # clips most of the input range
        return real(model, doc)
    monkeypatch.setattr(onnx_qdq, "build_qdq", skewed)
    out = tmp_path / "final"
    msg = _err(generate_final_model, build_wide(), str(cfg),
               pth_file=str(tmp_path / "quant.pth"), output_dir=str(out))
    assert "does not reproduce the fake-quant model" in msg and not out.exists()
    assert "layer 'conv1'" in msg  # compared layer by layer: the culprit is named


def test_export_check_names_a_layer_left_unquantized_in_the_qdq_model(tmp_path, monkeypatch):
    """A QDQ model whose quantized layer reads its float input directly (its Q/DQ pair
    bypassed) is refused by name, and nothing is written."""
    from dopt.formats import qdq as onnx_qdq
    q, cfg = calibrated(tmp_path)
    torch.save(q.state_dict(), tmp_path / "quant.pth")
    real = onnx_qdq.build_qdq

    def bypassed(model, doc):
        m = real(model, doc)
        node = next(n for n in m.graph.node if n.name == "conv1")
        node.input[0] = doc["layers"]["conv1"]["input"]["tensor"]
        return m
    monkeypatch.setattr(onnx_qdq, "build_qdq", bypassed)
    out = tmp_path / "final"
    msg = _err(generate_final_model, build_wide(), str(cfg),
               pth_file=str(tmp_path / "quant.pth"), output_dir=str(out))
    assert "conv1" in msg and "no input quantization" in msg and not out.exists()


class _SameConv(torch.nn.Conv2d):
    """TF-"SAME" convolution as EfficientNet and timm ports write it: the asymmetric
    padding of a stride-2 layer added in forward."""

    def forward(self, x):
        return super().forward(torch.nn.functional.pad(x, (0, 1, 0, 1)))


class _SameNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = _SameConv(20, 32, 3, 2, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(32)
        self.dw = _SameConv(32, 32, 3, 2, groups=32, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(32)
        self.pw = torch.nn.Conv2d(32, 48, 1)
        self.fc = torch.nn.Linear(48, 10)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)

    def forward(self, x):
        y = torch.nn.functional.relu6(self.bn1(self.stem(x)))
        y = torch.nn.functional.relu6(self.bn2(self.dw(y)))
        return self.fc(self.pw(y).mean((2, 3)))


def test_conv_subclass_with_its_own_forward_keeps_its_padding_and_folds_its_bn(tmp_path):
    # before: the quantized wrapper ran the convolution from its attributes alone (the
    # padding added in forward was lost, 9x9 maps instead of 8x8) and torch.fx traced into
    # the subclass, so its BatchNorm was not folded while the export folded it
    model = _SameNet().eval()
    cfg = write_cfg(tmp_path, model, shape=WIDE_SHAPE)
    q = optimize_model(_SameNet().eval(), str(cfg))
    layers = dict(quant_layers(q))
    assert layers["stem"].bn_name == "bn1" and layers["dw"].bn_name == "bn2"
    shapes = []
    q.dw.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    set_calibrate_state(q, True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(4):
            q(wide_data(16, g))
    set_calibrate_state(q, False)
    q.eval()
    x = wide_data(8, g)
    with torch.no_grad():
        ref, got = model(x), q(x)
    assert shapes[-1] == (8, 32, 4, 4)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    torch.save(q.state_dict(), tmp_path / "q.pth")
    files = generate_final_model(_SameNet().eval(), str(cfg), pth_file=str(tmp_path / "q.pth"),
                                 output_dir=str(tmp_path / "out"))
    assert Path(files["qdq_onnx"]).is_file()
