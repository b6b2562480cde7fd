"""dopt.prune on PyTorch: widths on the NPU's channel blocks, latency targets met on the
cost model's estimate, saved files that reload without shape surgery, and the pruned model
through the existing quantize / compile paths."""
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

pytest.importorskip("torch_pruning")

import dopt.prune as P  # noqa: E402
from dopt.errors import DoptError  # noqa: E402
from dopt.npu.profile import load_profile  # noqa: E402

from prune_nets import DataDependent, LinearOnly, ResNetish, batches, trained_like  # noqa: E402

SHAPE = (1, 3, 16, 16)


def _convs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _err(fn, *a, **k):
    with pytest.raises(DoptError) as ei:
        fn(*a, **k)
    msg = str(ei.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


@pytest.fixture(scope="module")
def pruned_int8(tmp_path_factory):
    """ResNetish pruned for an INT8 speed-up of 1.15x, saved."""
    model = trained_like()
    ref = trained_like()
    result = P.prune(model, SHAPE, "speedup=1.15", precision="int8", calib_data=batches())
    out = tmp_path_factory.mktemp("pruned")
    files = result.save(out)
    return model, ref, result, files


def test_every_pruned_channel_count_is_on_the_profiles_block(pruned_int8):
    model, ref, result, _files = pruned_int8
    block = load_profile().channel_block(True)
    assert result.plan.block == block == 32
    before, after = _convs(ref), _convs(model)
    assert result.plan.widths, "the target needs some pruning"
    changed = 0
    for name, conv in after.items():
        for dim in ("in_channels", "out_channels"):
            was, now = getattr(before[name], dim), getattr(conv, dim)
            if now != was:
                changed += 1
                assert now % block == 0, f"{name}.{dim} = {now} is not a multiple of {block}"
    assert changed >= 2   # a group shrinks a producer's Cout and a consumer's Cin


def test_latency_target_is_met_on_the_estimate(pruned_int8):
    _model, _ref, result, files = pruned_int8
    from dopt.nas.latency import estimate_onnx
    before = result.plan.before["latency_int8_ms"]
    after = estimate_onnx(files["onnx"], load_profile())["latency_int8_ms"]
    assert after <= before / 1.15 + 1e-9
    assert after == pytest.approx(result.plan.after["latency_int8_ms"])
    doc = json.loads(open(files["plan"]).read())
    assert doc["target"] == "speedup=1.15" and doc["channel_block"] == 32
    assert all(s["saved"] > 0 for s in doc["steps"])


def test_saved_files_reload_without_shape_surgery(pruned_int8):
    import importlib.util
    model, _ref, _result, files = pruned_int8
    spec = importlib.util.spec_from_file_location("pruned_rebuild", files["py"])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rebuilt = mod.load()          # build() + load_state_dict(strict) of the .pth beside it
    fresh = mod.build()
    fresh.load_state_dict(torch.load(files["pth"], weights_only=True))   # strict by default
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model(x), atol=1e-5)
        assert torch.allclose(fresh.eval()(x), model(x), atol=1e-5)
    import onnxruntime as ort
    sess = ort.InferenceSession(files["onnx"], providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x[:1].numpy()})[0]
    assert np.allclose(got, model(x[:1]).detach().numpy(), atol=1e-4)


def test_pruned_model_quantizes_and_compiles_through_the_existing_paths(pruned_int8, tmp_path):
    import importlib.util

    from dopt.dopt_torch.opt_main import (generate_config_file, generate_final_model,
                                          optimize_model, set_calibrate_state)
    from dopt.formats import param_file
    from dopt.npu.compiler import compile_onnx
    from dopt.runtime import Session
    _model, _ref, _result, files = pruned_int8
    spec = importlib.util.spec_from_file_location("pruned_rebuild2", files["py"])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.load()
    generate_config_file(model, "x:1,3,16,16", dst_path=str(tmp_path / "gen.json"))
    cfg = json.loads((tmp_path / "gen.json").read_text())
    for entry in cfg["layer_strategy"].values():
        entry["quant_strategy"] = "Quant_INT8-8"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    q = optimize_model(model, str(tmp_path / "cfg.json"))
    set_calibrate_state(q, True)
    with torch.no_grad():
        for x in batches():
            q(x)
    set_calibrate_state(q, False)
    torch.save(q.state_dict(), tmp_path / "quant.pth")
    out = generate_final_model(mod.build(), str(tmp_path / "cfg.json"),
                               str(tmp_path / "quant.pth"), str(tmp_path / "final"))
    doc = param_file.read_params(out["param_file"])
    om, report = compile_onnx(onnx.load(out["float_onnx"]), load_profile(), params=doc,
                              input_shapes={"x": list(SHAPE)})
    assert om.quant["int8_layers"], "the pruned convolutions run INT8"
    align = [f for r in report["nodes"] for f in r.get("findings", [])
             if f["rule"] == "conv_channel_alignment" and r["node"] in om.quant["int8_layers"]]
    assert not align, f"pruned INT8 layers flagged for padding: {align}"
    x = batches(1, seed=9)[0]
    q.eval()
    with torch.no_grad():
        want = q(x).numpy()
    got = Session(om).run(x.numpy())[om.graph["outputs"][0]["name"]]
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9


def test_fp16_target_uses_16_channel_blocks_and_mac_target():
    model = trained_like()
    r = P.prune(model, SHAPE, "macs=0.5", precision="fp16", calib_data=batches())
    assert r.plan.block == 16
    assert r.plan.after["macs"] <= 0.5 * r.plan.before["macs"]
    assert all(w % 16 == 0 for w in r.plan.widths.values())
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == (2, 10)


def test_bn_statistics_are_recalibrated_after_pruning():
    model = trained_like()
    before = model.bn1.running_var.clone()
    P.prune(model, SHAPE, "size=0.7", precision="fp16", calib_data=batches(seed=4))
    # every BatchNorm was reset and re-estimated: even kept channels have new statistics
    assert not torch.allclose(model.stem[1].running_var[:16],
                              trained_like().stem[1].running_var[:16])
    assert model.bn1.running_var.numel() <= before.numel()


def _accuracy_on(xs):
    def accuracy(m):
        return float(np.mean([(m(x).argmax(1) == y).float().mean().item() for x, y in xs]))
    return accuracy


def test_sensitivity_table_weighs_the_search(tmp_path):
    """Fast variant: widths within 20 % of each group (one aligned step each)."""
    model = trained_like()
    r = P.prune(model, SHAPE, "size=0.9", precision="fp16", calib_data=batches(2),
                eval_fn=_accuracy_on(batches(1, seed=3, labels=True)), sensitivity=True,
                max_ratio=0.2)
    table = r.sensitivity
    assert set(table["groups"]) == {g["group"] for g in r.plan.groups}
    rows = [r for rows in table["groups"].values() for r in rows[1:]]
    assert rows and all(r["width"] % 16 == 0 and 0 < r["ratio"] <= 0.2 for r in rows)
    files = r.save(tmp_path)
    assert json.loads(open(files["sensitivity_json"]).read())["base_metric"] == \
        table["base_metric"]


@pytest.mark.slow
def test_sensitivity_table_and_plot(tmp_path):
    model = trained_like()
    r = P.prune(model, SHAPE, "speedup=1.2", precision="fp16", calib_data=batches(),
                eval_fn=_accuracy_on(batches(2, seed=3, labels=True)), sensitivity=True)
    table = r.sensitivity
    assert set(table["groups"]) == {g["group"] for g in r.plan.groups}
    for rows in table["groups"].values():
        widths = [row["width"] for row in rows]
        assert widths == sorted(widths, reverse=True)
        assert all(w % 16 == 0 for w in widths[1:])
    files = r.save(tmp_path)
    assert json.loads(open(files["sensitivity_json"]).read())["channel_block"] == 16
    if "sensitivity_png" in files:
        assert open(files["sensitivity_png"], "rb").read(4) == b"\x89PNG"
    assert "conv" in P.render_text(table)


@pytest.mark.slow
def test_taylor_and_bn_scale_importance():
    for imp, data in (("taylor", batches(labels=True)), ("bn_scale", batches())):
        model = trained_like()
        r = P.prune(model, SHAPE, "size=0.8", precision="fp16", importance=imp,
                    calib_data=data)
        assert r.plan.widths


# ---- bad targets and unprunable models: one-paragraph errors ----

def test_unreachable_latency_target_names_the_floor():
    msg = _err(P.prune, trained_like(), SHAPE, "speedup=20", calib_data=batches())
    assert "cannot be met" in msg and "launches" in msg and "speedup=" in msg


@pytest.mark.parametrize("target, words", [
    ("speedup=0.8", "above 1"), ("macs=1.5", "between 0 and 1"), ("fast", "KIND=VALUE"),
    ("target_ms=abc", "not a number"), ("flops=0.5", "unknown pruning target"),
    ("target_ms=-1", "> 0")])
def test_bad_targets_are_refused_before_any_work(target, words):
    assert words in _err(P.prune, trained_like(), SHAPE, target)


def test_bad_precision_and_importance():
    assert "precision" in _err(P.prune, trained_like(), SHAPE, "speedup=1.2", precision="int4")
    assert "importance" in _err(P.prune, trained_like(), SHAPE, "speedup=1.2",
                                importance="random")
    assert "Taylor" in _err(P.prune, trained_like(), SHAPE, "speedup=1.2", importance="taylor")


def test_unprunable_models_are_named():
    assert "no prunable channel group" in _err(P.prune, LinearOnly(), SHAPE, "speedup=1.2")
    msg = _err(P.prune, DataDependent(), SHAPE, "speedup=1.2")
    assert "DataDependent" in msg and "dependency graph" in msg
    msg = _err(P.prune, ResNetish(), SHAPE, "speedup=1.2", ignored_layers=["nope"])
    assert "nope" in msg


def test_ignored_layers_keep_their_width():
    model = trained_like()
    P.prune(model, SHAPE, "macs=0.7", precision="fp16", calib_data=batches(),
            ignored_layers=["conv2", "stem.0"])
    assert model.conv2.out_channels == 64 and model.stem[0].out_channels == 64
