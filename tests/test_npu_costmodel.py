"""The NPU cost model: padding, INT8 vs FP16, CPU fallback transfers, labels, profile checks."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from dopt.errors import DoptError  # noqa: E402
from dopt.npu.costmodel import estimate, render_text  # noqa: E402
from dopt.npu.lower import lower_onnx  # noqa: E402
from dopt.npu.precheck import precheck  # noqa: E402
from dopt.npu.profile import PROFILES_DIR, load_profile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _w(name, *shape):
    rng = np.random.default_rng(0)
    return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)


def _model(nodes, inits, x_shape, out="y"):
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, list(x_shape))], [helper.make_tensor_value_info(
            out, TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def _estimate(model, int8=(), profile=None):
    profile = profile or load_profile()
    graph = lower_onnx(model)
    return estimate(graph, precheck(graph, profile, int8), profile)


def _kernel(est, name):
    return next(k for k in est["kernels"] if k["node"] == name)


def test_channel_padding_and_waste():
    """24 output channels pad to 32 in FP16 (25 % waste); depthwise pads channels only."""
    m = _model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv24"),
                helper.make_node("Conv", ["c", "wd"], ["y"], name="dw24", group=24,
                                 pads=[1, 1, 1, 1])],
               [_w("w", 24, 16, 1, 1), _w("wd", 24, 1, 3, 3)], (1, 16, 8, 8))
    est = _estimate(m)
    conv, dw = _kernel(est, "conv24"), _kernel(est, "dw24")
    assert conv["macs"] == 8 * 8 * 24 * 16 and conv["padded_macs"] == 8 * 8 * 32 * 16
    assert conv["padding_waste"] == pytest.approx(0.25)
    assert dw["op"] == "ConvolutionDepthwise"
    assert dw["macs"] == 8 * 8 * 24 * 9 and dw["padded_macs"] == 8 * 8 * 32 * 9
    assert est["top_padding"][0]["node"] == "conv24"
    assert est["summary"]["padding_waste"] == pytest.approx(0.25)


def test_int8_block_is_32():
    """The same 24-channel conv in INT8 (Cin 48 > 16) pads 48 -> 64 and 24 -> 32."""
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
               [_w("w", 24, 48, 1, 1)], (1, 48, 8, 8))
    k = _kernel(_estimate(m, int8=["conv"]), "conv")
    assert k["int8"] and k["padded_macs"] == 8 * 8 * 32 * 64
    assert k["weight_bytes"] == 24 * 48  # one byte per INT8 weight


def test_int8_faster_than_fp16_for_a_wide_conv():
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="wide", pads=[1, 1, 1, 1])],
               [_w("w", 256, 256, 3, 3)], (1, 256, 28, 28))
    fp16, int8 = _kernel(_estimate(m), "wide"), _kernel(_estimate(m, ["wide"]), "wide")
    assert int8["int8"] and not fp16["int8"]
    assert int8["time_us"] < fp16["time_us"]
    assert int8["weight_bytes"] * 2 == fp16["weight_bytes"]


def test_transposed_conv_executes_on_the_output_grid():
    """Stride-2 ConvTranspose runs as a conv over the zero-inserted input: 4x the MACs."""
    m = _model([helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[2, 2])],
               [_w("w", 16, 16, 2, 2)], (1, 16, 4, 4))
    k = _kernel(_estimate(m), "up")
    assert k["macs"] == 4 * 4 * 16 * 16 * 4 and k["padded_macs"] == 8 * 8 * 16 * 16 * 4


def test_cpu_fallback_adds_transfers_at_partition_edges():
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], name="conv_in"),
             helper.make_node("Einsum", ["a", "e"], ["b"], name="einsum",
                              equation="nchw,cd->ndhw"),
             helper.make_node("Conv", ["b", "w1"], ["y"], name="conv_out")]
    m = _model(nodes, [_w("w0", 16, 16, 1, 1), _w("e", 16, 16), _w("w1", 16, 16, 1, 1)],
               (1, 16, 8, 8))
    est = _estimate(m)
    cm = load_profile().cost_model
    assert _kernel(est, "einsum")["device"] == "cpu"
    assert [(x["tensor"], x["from"], x["to"]) for x in est["transfers"]] == [
        ("a", "npu", "cpu"), ("b", "cpu", "npu")]
    for x in est["transfers"]:
        assert x["bytes"] == 16 * 8 * 8 * 2
        assert x["time_us"] == pytest.approx(x["bytes"] / (cm["cpu_npu_transfer_gbps"] * 1e3)
                                             + cm["cpu_npu_transfer_latency_us"])
    s = est["summary"]
    assert s["cpu_kernels"] == 1 and s["transfer_ms"] > 0
    assert s["total_ms"] == pytest.approx(s["npu_ms"] + s["cpu_ms"] + s["transfer_ms"])
    assert "transfer a" in render_text(est)


def test_fused_nodes_add_to_their_conv_and_memory_peak():
    """BN folds and ReLU rides in the conv's output stage: one kernel; liveness peak."""
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0"),
             helper.make_node("BatchNormalization", ["c0", "g", "b", "m", "v"], ["b0"], name="bn"),
             helper.make_node("Relu", ["b0"], ["r0"], name="relu"),
             helper.make_node("Conv", ["r0", "w1"], ["y"], name="conv1")]
    inits = [_w("w0", 32, 16, 1, 1), _w("g", 32), _w("b", 32), _w("m", 32),
             numpy_helper.from_array(np.ones(32, np.float32), "v"), _w("w1", 16, 32, 1, 1)]
    est = _estimate(_model(nodes, inits, (1, 16, 8, 8)))
    assert [k["node"] for k in est["kernels"]] == ["conv0", "conv1"]
    assert _kernel(est, "conv0")["fused"] == ["bn", "relu"]
    s = est["summary"]
    assert s["weight_bytes"] == (32 * 16 + 16 * 32) * 2
    assert s["peak_activation_bytes"] == (16 + 32) * 64 * 2  # x + r0, then r0 + y
    assert s["peak_memory_bytes"] == s["weight_bytes"] + s["peak_activation_bytes"]


def test_estimate_is_labelled_and_stamped():
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
               [_w("w", 16, 16, 3, 3)], (1, 16, 8, 8))
    p = load_profile()
    est = _estimate(m, profile=p)
    assert est["estimate"] is True and est["profile"] == p.stamp()
    assert "estimate" in est["label"].lower() and p.version in est["label"]
    text = render_text(est)
    assert text.splitlines()[0] == est["label"] and text.splitlines()[-1] == est["label"]
    assert "| 0 | conv | Convolution | npu | fp16 |" in text and "estimated total" in text
    json.dumps(est)  # plain data, storable as is


def test_uncalibrated_profile_says_so():
    p = load_profile()
    raw = dict(p.cost_model, calibrated=False)
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [], (1, 16, 8, 8))
    est = _estimate(m, profile=replace(p, cost_model=raw))
    assert "uncalibrated" in est["label"] and est["calibrated"] is False


def _broken(raw, case):
    cm = raw["cost_model"]
    if case == "missing":
        del cm["fp16_tops"]
        return "cost_model.fp16_tops"
    if case == "string":
        cm["ddr_gbps"] = "fast"
        return "cost_model.ddr_gbps"
    if case == "negative":
        cm["kernel_launch_us"] = -1
        return "cost_model.kernel_launch_us"
    if case == "band":
        cm["band"]["int8"] = [1.5, 2.0]   # a band must contain the estimate itself
        return "cost_model.band.int8"
    if case == "flag":
        cm["calibrated"] = "yes"
        return "cost_model.calibrated"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "string", "negative", "band", "flag"])
def test_broken_cost_model_names_the_field(tmp_path, case):
    raw = json.loads((PROFILES_DIR / "kirin9000.json").read_text(encoding="utf-8"))
    field = _broken(raw, case)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DoptError) as e:
        load_profile(path)
    assert str(path) in str(e.value) and f"field '{field}'" in str(e.value)


def test_profile_holds_the_recorded_calibration():
    """The shipped constants and band are the ones bench/results/cost_model.json reports on,
    and the leave-one-family-out medians meet the 25 % bar."""
    results = ROOT / "bench" / "results" / "cost_model.json"
    if not results.is_file():
        pytest.skip("no calibration results")
    res = json.loads(results.read_text(encoding="utf-8"))
    cm = load_profile().cost_model
    assert cm["calibrated"] is True
    for key, value in res["fitted"].items():
        assert cm[key] == pytest.approx(value), key
        lo, hi = cm["priors"][key]["bounds"]
        assert lo <= cm[key] <= hi, key
    assert cm["band"] == res["band"]
    for prec in ("fp16", "int8"):
        assert res["summary"][prec]["lofo_median_abs_error_pct"] <= 25.0


def test_costmodel_imports_no_framework():
    code = ("import sys, dopt.npu.costmodel; "
            "bad = [m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# -- execution-time fusions (the profile's fusions of kind "kernel") -------------------------

def _residual_block(c=32, hw=8):
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c1", "x"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["y"], name="relu1")]
    return _model(nodes, [_w("w0", c, c, 3, 3), _w("w1", c, c, 3, 3)], (1, c, hw, hw))


def test_residual_add_and_activation_ride_in_the_convolution():
    """conv1 + residual Add + ReLU is one kernel; the Add's other operand (x) is read by it."""
    est = _estimate(_residual_block())
    assert [k["node"] for k in est["kernels"]] == ["conv0", "conv1"]
    assert _kernel(est, "conv1")["fused"] == ["add", "relu1"]
    groups = {g["kernel"]: g for g in est["fusions"]}
    assert groups["conv1"]["rules"] == ["eltwise_epilogue", "activation_epilogue"]
    assert groups["conv0"]["rules"] == ["activation_epilogue"]


def test_precheck_report_names_the_fusions(tmp_path):
    """`dopt omg --mode 3` lists each fused kernel with its rule ids."""
    onnx.save(_residual_block(), str(tmp_path / "res.onnx"))
    r = subprocess.run([sys.executable, "-m", "dopt", "omg", "--mode", "3", "--framework", "5",
                        "--model", str(tmp_path / "res.onnx"), "--check_report",
                        str(tmp_path / "rep.json")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "conv1 (+add, relu1): eltwise_epilogue, activation_epilogue" in r.stdout
    assert "estimate" in r.stdout.split("estimated NPU latency:")[1]
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert {"kernel": "conv1", "nodes": ["add", "relu1"],
            "rules": ["eltwise_epilogue", "activation_epilogue"]} in rep["fusions"]
    lo, hi = rep["estimate"]["summary"]["band_ms"]
    assert lo < rep["estimate"]["summary"]["total_ms"] < hi


def test_add_of_two_maps_both_read_elsewhere_stays_a_kernel():
    """The residual Add fuses only when one operand is read by the Add alone."""
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0"),
             helper.make_node("Add", ["c0", "x"], ["s"], name="add"),
             helper.make_node("Mul", ["c0", "s"], ["y"], name="mul")]
    est = _estimate(_model(nodes, [_w("w0", 16, 16, 1, 1)], (1, 16, 8, 8)))
    assert [k["node"] for k in est["kernels"]] == ["conv0", "add", "mul"]


def _pad_conv(mode="constant"):
    pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], name="pad", mode=mode),
             helper.make_node("Conv", ["p", "w"], ["y"], name="conv")]
    return _model(nodes, [pads, _w("w", 32, 32, 3, 3)], (1, 32, 8, 8))


def test_zero_pad_is_absorbed_by_the_convolution():
    est = _estimate(_pad_conv())
    assert [k["node"] for k in est["kernels"]] == ["conv"]
    assert _kernel(est, "conv")["fused"] == ["pad"]
    assert est["fusions"] == [{"kernel": "conv", "nodes": ["pad"], "rules": ["pad_prologue"]}]


def test_reflect_pad_is_its_own_kernel():
    est = _estimate(_pad_conv("reflect"))
    assert [k["node"] for k in est["kernels"]] == ["pad", "conv"]


def test_depthwise_block_is_one_kernel_priced_by_lane_utilisation():
    """DW conv + BN + ReLU6 is one kernel; its MACs run on 1/C0 of the array's lanes."""
    c = 48
    nodes = [helper.make_node("Conv", ["x", "wd"], ["d"], name="dw", group=c, pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["d", "g", "b", "m", "v"], ["bn"], name="bn"),
             helper.make_node("Clip", ["bn", "lo", "hi"], ["y"], name="relu6")]
    inits = [_w("wd", c, 1, 3, 3), _w("g", c), _w("b", c), _w("m", c),
             numpy_helper.from_array(np.ones(c, np.float32), "v"),
             numpy_helper.from_array(np.array(0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6, np.float32), "hi")]
    p = load_profile()
    est = _estimate(_model(nodes, inits, (1, c, 56, 56)), profile=p)
    assert [k["node"] for k in est["kernels"]] == ["dw"]
    k = _kernel(est, "dw")
    assert k["fused"] == ["bn", "relu6"]
    cm = p.cost_model
    rate = cm["fp16_tops"] * 1e6 / 2 * cm["depthwise_block_utilization"] / 16
    assert k["compute_us"] == pytest.approx(k["padded_macs"] / rate)


def test_swish_pair_fuses_only_where_the_profile_enables_it():
    """The shipped profile disables swish_epilogue (the measured YOLOv5 says the NPU does
    not hide SiLU's element-wise work); a profile that enables it gets one kernel."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Sigmoid", ["c"], ["s"], name="sig"),
             helper.make_node("Mul", ["c", "s"], ["y"], name="mul")]
    m = _model(nodes, [_w("w", 32, 32, 1, 1)], (1, 32, 8, 8))
    p = load_profile()
    assert [k["node"] for k in _estimate(m, profile=p)["kernels"]] == ["conv", "sig", "mul"]
    on = replace(p, fusions=[dict(f, enabled=True) for f in p.fusions])
    est = _estimate(m, profile=on)
    assert [k["node"] for k in est["kernels"]] == ["conv"]
    assert est["fusions"][0]["rules"] == ["swish_epilogue"]


def test_int8_map_stays_int8_through_max_pooling():
    """INT8 conv -> MaxPool -> INT8 conv: both maps are stored INT8 (pooling passes INT8)."""
    c, hw = 64, 128
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], name="c0", pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["a"], ["b"], name="pool", kernel_shape=[2, 2],
                              strides=[2, 2]),
             helper.make_node("Conv", ["b", "w1"], ["y"], name="c1", pads=[1, 1, 1, 1])]
    m = _model(nodes, [_w("w0", c, c, 3, 3), _w("w1", c, c, 3, 3)], (1, c, hw, hw))
    p = load_profile()
    p = replace(p, cost_model=dict(p.cost_model, onchip_buffer_kb=256.0))
    est = _estimate(m, ["c0", "c1"], profile=p)
    # a (64x128x128) does not fit 256 KB even in INT8: written by c0 and read by the pool,
    # one byte per element each way
    assert _kernel(est, "c0")["feature_ddr_bytes"] == c * hw * hw * 2 + c * hw * hw
    assert _kernel(est, "pool")["feature_ddr_bytes"] == c * hw * hw


def test_a_rule_removed_from_the_profile_no_longer_fuses():
    """The fusion rules are data: the estimate follows the profile's fusions list."""
    p = load_profile()
    p2 = replace(p, fusions=[f for f in p.fusions if f.get("id") != "eltwise_epilogue"])
    est = _estimate(_residual_block(), profile=p2)
    # the Add is a kernel of its own again, and so is the ReLU after it (not after a MAC)
    assert [k["node"] for k in est["kernels"]] == ["conv0", "conv1", "add", "relu1"]


def test_int8_maps_between_int8_kernels_are_stored_in_int8():
    """A map written by an INT8 kernel and read only by INT8 kernels crosses DDR in INT8."""
    c, hw = 64, 96  # 64 x 96 x 96 x 2 B = 1.2 MB in FP16: larger than a 1 MB buffer
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], name="c0", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w1"], ["y"], name="c1", pads=[1, 1, 1, 1])]
    m = _model(nodes, [_w("w0", c, c, 3, 3), _w("w1", c, c, 3, 3)], (1, c, hw, hw))
    p = load_profile()
    p = replace(p, cost_model=dict(p.cost_model, onchip_buffer_kb=1024.0))
    fp16 = _kernel(_estimate(m, profile=p), "c0")["feature_ddr_bytes"]
    int8 = _kernel(_estimate(m, ["c0", "c1"], profile=p), "c0")["feature_ddr_bytes"]
    both_fp16 = c * hw * hw * 2 * 2       # reads x, writes a (neither fits on chip)
    assert fp16 == both_fp16
    # x is read in FP16 (its producer is not an INT8 kernel); ``a`` in INT8 is 0.6 MB, fits
    # the buffer and never leaves the chip
    assert int8 == c * hw * hw * 2


def test_small_maps_stay_on_chip_and_large_ones_cross_ddr():
    m = _residual_block(c=32, hw=8)        # 4 KB maps
    p = load_profile()
    est = _estimate(m, profile=p)
    conv0 = _kernel(est, "conv0")
    assert conv0["feature_ddr_bytes"] == 32 * 64 * 2        # only the network input
    tiny = replace(p, cost_model=dict(p.cost_model, onchip_buffer_kb=1.0))
    assert _kernel(_estimate(m, profile=tiny), "conv0")["feature_ddr_bytes"] > 32 * 64 * 2


def test_every_estimate_carries_a_band_and_says_estimate():
    est = _estimate(_residual_block())
    s = est["summary"]
    lo, hi = s["band_ms"]
    assert lo < s["total_ms"] < hi
    assert s["total_text"].endswith("estimate)") and f"{s['total_ms']:.3f} ms" in s["total_text"]
    assert s["total_text"] in render_text(est)
    assert est == _estimate(_residual_block())       # deterministic


def test_kernel_fusion_entry_without_ops_names_the_entry(tmp_path):
    """A kernel fusion rule must say which operators it fuses; the loader names the entry."""
    raw = json.loads((PROFILES_DIR / "kirin9000.json").read_text(encoding="utf-8"))
    i = next(i for i, f in enumerate(raw["fusions"]) if f.get("id") == "eltwise_epilogue")
    del raw["fusions"][i]["ops"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DoptError) as e:
        load_profile(path)
    assert str(path) in str(e.value) and f"field 'fusions[{i}]'" in str(e.value)
