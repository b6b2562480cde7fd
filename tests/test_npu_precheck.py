"""Pre-check on a graph with one of each outcome (the emulated NPU issue's acceptance model)."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from dopt.npu.lower import lower_onnx  # noqa: E402
from dopt.npu.precheck import precheck, render_text  # noqa: E402
from dopt.npu.profile import load_profile  # noqa: E402
from dopt.npu.rules import int8_skip_reason, padding_waste  # noqa: E402


def _w(name, *shape):
    return numpy_helper.from_array(np.random.default_rng(0).normal(size=shape).astype(np.float32),
                                   name)


def mixed_model():
    """conv (+BN) -> [conv24, relu, conv16] -> concat(56 ch, offsets 0/24/40) -> einsum."""
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv_bn", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c0", "g", "b", "m", "v"], ["b0"], name="bn"),
        helper.make_node("Relu", ["b0"], ["r0"], name="relu"),
        helper.make_node("Conv", ["r0", "w24"], ["c24"], name="conv24"),
        helper.make_node("Conv", ["r0", "w16"], ["c16"], name="conv16"),
        helper.make_node("Concat", ["c24", "r0", "c16"], ["cat"], name="concat", axis=1),
        helper.make_node("Einsum", ["cat", "e"], ["y"], name="einsum", equation="nchw,cd->ndhw"),
    ]
    inits = [_w("w0", 16, 16, 3, 3), _w("g", 16), _w("b", 16), _w("m", 16),
             numpy_helper.from_array(np.ones(16, np.float32), "v"),
             _w("w24", 24, 16, 1, 1), _w("w16", 16, 16, 1, 1), _w("e", 56, 10)]
    g = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 16, 8, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_each_outcome_with_reason():
    r = precheck(lower_onnx(mixed_model()), load_profile())
    by = {x["node"]: x for x in r["nodes"]}
    assert by["bn"]["outcome"] == "fused"
    assert by["bn"]["findings"][0]["values"] == {"into": "conv_bn"}
    assert by["conv_bn"]["outcome"] == "npu" and by["conv16"]["outcome"] == "npu"
    assert by["conv24"]["outcome"] == "npu_degraded"
    f = by["conv24"]["findings"][0]
    assert f["rule"] == "conv_channel_alignment" and f["values"]["cout"] == 24
    assert f["values"]["padding_waste"] == pytest.approx(1 - 24 / 32)
    assert by["concat"]["outcome"] == "npu_degraded"
    assert by["concat"]["findings"][0]["values"]["offsets"] == [0, 24, 40]
    assert by["einsum"]["outcome"] == "cpu"
    assert by["einsum"]["findings"][0]["rule"] == "unsupported_op"
    assert r["summary"] == {"npu": 3, "npu_degraded": 2, "fused": 1, "cpu": 1}
    assert [p["device"] for p in r["partitions"]] == ["npu", "cpu"]
    assert r["partitions"][1]["transfers_in"] == 1
    text = render_text(r)
    assert "einsum" in text and "padding" in text and "cpu" in text


def test_int8_rules():
    r = precheck(lower_onnx(mixed_model()), load_profile(), int8_nodes={"conv_bn", "conv24"})
    by = {x["node"]: x for x in r["nodes"]}
    # Cin 16 <= 16: INT8 skipped, the layers run FP16 (where 16 channels are aligned)
    assert [f["rule"] for f in by["conv_bn"]["findings"]] == ["int8_min_cin"]
    assert int8_skip_reason(16, load_profile()) in by["conv_bn"]["findings"][0]["message"]
    assert not by["conv_bn"]["int8"] and by["conv_bn"]["outcome"] == "npu_degraded"
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="wide")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 48, 8, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], [_w("w", 64, 48, 1, 1)])
    m = lower_onnx(helper.make_model(g))
    x = precheck(m, load_profile(), int8_nodes={"wide"})["nodes"][0]
    assert x["int8"] and x["findings"][0]["values"] == {
        "cin": 48, "cout": 64, "block": 32, "padding_waste": 0.25}
    assert precheck(m, load_profile())["nodes"][0]["outcome"] == "npu"  # FP16: 48, 64 aligned


def test_padding_waste():
    assert padding_waste(16, 16, 16) == 0
    assert padding_waste(3, 16, 16) == pytest.approx(1 - 3 / 16)
    assert padding_waste(24, 24, 16, depthwise=True) == pytest.approx(1 - 24 / 32)


def test_flatten_after_global_pool_is_shape_only():
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w"], ["y"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 32, 7, 7])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], [_w("w", 10, 32)])
    r = precheck(lower_onnx(helper.make_model(g)), load_profile())
    by = {x["node"]: x for x in r["nodes"]}
    assert by["flat"]["outcome"] == "fused" and by["fc"]["ir_op"] == "FullyConnection"
    assert by["gap"]["ir_op"] == "PoolingD"


def _dopt(*args, cwd):
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "dopt", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120, env=dict(os.environ, PYTHONPATH=str(root)))


def test_omg_mode3_cli(tmp_path):
    import json
    onnx.save(mixed_model(), tmp_path / "m.onnx")
    r = _dopt("omg", "--mode", "3", "--framework", "5", "--model", "m.onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "check_report.json").read_text())  # reference default path
    assert rep["summary"]["cpu"] == 1 and rep["profile"]["name"] == "kirin9000"
    assert "| (ONNX Einsum) | 1 | cpu | unsupported_op | einsum |" in r.stdout
    r = _dopt("omg", "--mode", "3", "--framework", "5", "--model", "m.onnx", "--strict",
              "--check_report", "strict.json", cwd=tmp_path)
    assert r.returncode == 2 and "einsum" in r.stderr and "--strict" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--framework", "0", "--model", "m.onnx"], "convert the Caffe model to ONNX"),
    (["--framework", "6", "--model", "m.onnx"], "MindSpore models are not supported"),
    (["--framework", "5", "--model", "bad.onnx"], "not a readable ONNX model"),
    (["--framework", "5", "--model", "m.onnx", "--input_shape", "x:1,a"], "--input_shape"),
    (["--framework", "5", "--model", "m.onnx", "--input_shape", "nope:1,16,8,8"],
     "which the model does not have"),
    (["--framework", "5", "--model", "m.onnx", "--compress_conf", "m.onnx"], "not valid JSON"),
])
def test_omg_mode3_bad_inputs(tmp_path, args, needle):
    onnx.save(mixed_model(), tmp_path / "m.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    r = _dopt("omg", "--mode", "3", "--check_report", "r.json", *args, cwd=tmp_path)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert "\n" not in r.stderr.strip() and not (tmp_path / "r.json").exists()
