"""``dopt omg --dynamic_dims``: one .om with a gear per shape; each gear equals the static build."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dopt import runtime
from dopt.errors import DoptError, run_cli
from dopt.npu import gears as G
from dopt.npu import omfile, omg

from test_aipp_config import EX_STATIC


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Conv + ReLU + Concat with a branch + global pool + FC; free batch and spatial dims."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32)
    w1 = (rng.standard_normal((16, 16, 1, 1)) * 0.3).astype(np.float32)
    fc = (rng.standard_normal((10, 32)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["data", "w"], ["y"], name="conv", pads=[1] * 4,
                              kernel_shape=[3, 3]),
             helper.make_node("Relu", ["y"], ["z"], name="relu"),
             helper.make_node("Conv", ["z", "w1"], ["b"], name="conv1x1", kernel_shape=[1, 1]),
             helper.make_node("Concat", ["z", "b"], ["c"], name="cat", axis=1),
             helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc"], ["out"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(
        "data", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (w1, "w1"), (fc, "fc"))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path_factory.mktemp("gears") / "m.onnx"
    onnx.save(m, path)
    return path


def _omg(model, out, shape, *extra):
    return omg.main(["--framework", "5", "--model", str(model), "--output", str(out),
                     "--input_shape", shape, *extra])


def test_dynamic_batch_gears_equal_static_builds_bit_for_bit(model, tmp_path, capsys):
    assert _omg(model, tmp_path / "dyn", "data:-1,3,20,20", "--dynamic_dims", "1;2;4") == 0
    log = capsys.readouterr().out
    # the reference's log: each gear's output shapes after "Graph:"
    for n in (1, 2, 4):
        assert f"Graph: gear {[1, 2, 4].index(n)} dims {n}: inputs data:{n},3,20,20; " \
               f"outputs out:{n},10" in log
    s = runtime.load(tmp_path / "dyn.om")
    assert s.inputs[0]["shape"] == [-1, 3, 20, 20]
    assert [g["dims"] for g in s.gears] == [[1], [2], [4]]
    assert set(s.om.tensors) == {"conv.weight", "conv.bias", "conv1x1.weight", "conv1x1.bias",
                                 "fc.weight", "fc.bias"}    # weights stored once
    rng = np.random.default_rng(1)
    for n in (1, 2, 4):
        assert _omg(model, tmp_path / f"s{n}", f"data:{n},3,20,20") == 0
        x = rng.standard_normal((n, 3, 20, 20)).astype(np.float32)
        got = s.run(x)["out"]
        want = runtime.load(tmp_path / f"s{n}.om").run(x)["out"]
        assert got.shape == (n, 10) and np.array_equal(got, want)
    # each gear carries its own estimate; more samples cost more
    est = [g["estimate"]["total_ms"] for g in s.gears]
    assert est[0] < est[1] < est[2]
    with pytest.raises(DoptError, match=r"no gear .* \[3, 3, 20, 20\].*\[4, 3, 20, 20\]"):
        s.run(rng.standard_normal((3, 3, 20, 20)).astype(np.float32))
    # predict() cuts a large array into the gears it has: 7 = 4 + 2 + 1
    x = rng.standard_normal((7, 3, 20, 20)).astype(np.float32)
    assert np.array_equal(s.predict(x), np.concatenate([s.run(x[:4])["out"],
                                                         s.run(x[4:6])["out"],
                                                         s.run(x[6:])["out"]]))


def test_dynamic_resolution_gears_equal_static_builds(model, tmp_path):
    assert _omg(model, tmp_path / "dyn", "data:1,3,-1,-1", "--dynamic_dims",
                "16,16;24,40") == 0
    s = runtime.load(tmp_path / "dyn.om")
    assert s.om.graph["dynamic"]["kind"] == "resolution"
    assert s.inputs[0]["shape"] == [1, 3, -1, -1]
    rng = np.random.default_rng(2)
    for h, w in ((16, 16), (24, 40)):
        assert _omg(model, tmp_path / "s", f"data:1,3,{h},{w}") == 0
        x = rng.standard_normal((1, 3, h, w)).astype(np.float32)
        assert np.array_equal(s.run(x)["out"], runtime.load(tmp_path / "s.om").run(x)["out"])
    with pytest.raises(DoptError, match="no gear"):
        s.run(rng.standard_normal((1, 3, 20, 20)).astype(np.float32))


def test_int8_gears_keep_their_quantized_kernels(tmp_path):
    """A quantized model: every gear runs the same INT8 kernels as its static build."""
    from dopt.formats.param_file import write_params
    from npu_models import int8_net, params_for
    m = int8_net()
    onnx.save(m, tmp_path / "q.onnx")
    write_params(tmp_path / "q.json", params_for(m, {"c1": (-3, 3), "dw": (0, 4),
                                                      "c2": (0, 3), "fc": (0, 2)}))
    common = ["--framework", "5", "--model", str(tmp_path / "q.onnx"),
              "--compress_conf", str(tmp_path / "q.json")]
    c, h, w = 32, 12, 12
    assert omg.main([*common, "--output", str(tmp_path / "dyn"), "--input_shape",
                     f"x:-1,{c},{h},{w}", "--dynamic_dims", "1;3"]) == 0
    s = runtime.load(tmp_path / "dyn.om")
    assert s.om.quant["int8_layers"]
    rng = np.random.default_rng(3)
    for n in (1, 3):
        assert omg.main([*common, "--output", str(tmp_path / "s"), "--input_shape",
                         f"x:{n},{c},{h},{w}"]) == 0
        x = rng.standard_normal((n, c, h, w)).astype(np.float32)
        want = runtime.load(tmp_path / "s.om").run(x)
        got = s.run(x)
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_dynamic_batch_with_static_aipp(model, tmp_path):
    cfg = tmp_path / "a.cfg"
    cfg.write_text(EX_STATIC)
    assert _omg(model, tmp_path / "dyn", "data:-1,3,224,224", "--dynamic_dims", "1;2",
                "--insert_op_conf", str(cfg)) == 0
    s = runtime.load(tmp_path / "dyn.om")
    assert s.inputs[0]["shape"] == [-1, 384, 480, 4] and s.inputs[0]["dtype"] == "uint8"
    assert _omg(model, tmp_path / "s2", "data:2,3,224,224", "--insert_op_conf", str(cfg)) == 0
    raw = np.random.default_rng(4).integers(0, 256, (2, 384, 480, 4), dtype=np.uint8)
    assert np.array_equal(s.run(raw)["out"], runtime.load(tmp_path / "s2.om").run(raw)["out"])


def test_dump_shows_gears_and_rebuilds(model, tmp_path):
    assert _omg(model, tmp_path / "dyn", "data:-1,3,16,16", "--dynamic_dims", "1;2") == 0
    assert omg.main(["--mode", "1", "--om", str(tmp_path / "dyn.om"),
                     "--json", str(tmp_path / "d.json")]) == 0
    doc = json.loads((tmp_path / "d.json").read_text())
    assert [g["dims"] for g in doc["graph"]["dynamic"]["gears"]] == [[1], [2]]
    assert omg.main(["--mode", "1", "--json", str(tmp_path / "d.json"),
                     "--output", str(tmp_path / "back")]) == 0
    x = np.ones((2, 3, 16, 16), np.float32)
    assert np.array_equal(runtime.load(tmp_path / "back.om").run(x)["out"],
                          runtime.load(tmp_path / "dyn.om").run(x)["out"])


def test_precheck_mode_prints_every_gear(model, tmp_path, capsys):
    assert omg.main(["--mode", "3", "--framework", "5", "--model", str(model),
                     "--input_shape", "data:-1,3,16,16", "--dynamic_dims", "1;8",
                     "--check_report", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "Graph: gear 0 dims 1:" in out and "Graph: gear 1 dims 8:" in out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert [g["dims"] for g in rep["gears"]] == [[1], [8]]


@pytest.mark.parametrize("shape,dims,needle", [
    ("data:-1,3,16,16", ";".join(str(i) for i in range(1, 18)), "17 gears"),
    ("data:-1,3,16,16", None, "needs --dynamic_dims"),
    ("data:1,3,16,16", "1;2", "needs -1 in --input_shape"),
    ("data:1,3,-1,-1", "16;32", "gives 1 value(s), but --input_shape has 2"),
    ("data:-1,3,16,16", "1;0", "not a list of positive integers"),
    ("data:-1,3,16,16", "2;2", "repeats an earlier gear"),
], ids=["17_gears", "no_dims", "no_minus_one", "count", "zero", "repeat"])
def test_bad_gears_exit_2_and_leave_no_om(model, tmp_path, capsys, shape, dims, needle):
    extra = ["--dynamic_dims", dims] if dims else []
    rc = run_cli("dopt omg", lambda: _omg(model, tmp_path / "m", shape, *extra))
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "--dynamic_dims" in err and "\n" not in err.strip()
    assert not (tmp_path / "m.om").exists()


def test_dynamic_resolution_with_aipp_is_refused(model, tmp_path, capsys):
    cfg = tmp_path / "a.cfg"
    cfg.write_text(EX_STATIC)
    rc = run_cli("dopt omg", lambda: _omg(model, tmp_path / "m", "data:1,3,-1,-1",
                                          "--dynamic_dims", "224,224;112,112",
                                          "--insert_op_conf", str(cfg)))
    assert rc == 2 and "AIPP output size is fixed" in capsys.readouterr().err
    assert not (tmp_path / "m.om").exists()


def test_a_tampered_gear_table_is_refused(model, tmp_path):
    assert _omg(model, tmp_path / "dyn", "data:-1,3,16,16", "--dynamic_dims", "1;2") == 0
    om = omfile.read_om(tmp_path / "dyn.om")
    om.graph["dynamic"]["gears"] = om.graph["dynamic"]["gears"] * 9   # 18 gears
    omfile.write_om(tmp_path / "bad.om", om)
    with pytest.raises(DoptError, match="1 to 16 gears"):
        runtime.load(tmp_path / "bad.om")
    om = omfile.read_om(tmp_path / "dyn.om")
    om.graph["dynamic"]["gears"][1]["graph"]["kernels"][0]["inputs"] = ["nowhere"]
    omfile.write_om(tmp_path / "bad.om", om)
    with pytest.raises(DoptError, match="reads 'nowhere'"):
        runtime.load(tmp_path / "bad.om")


def test_parse_kinds():
    assert G.parse("1;4", {"x": (-1, 3, 8, 8)})["kind"] == "batch"
    assert G.parse("8,8;16,16", {"x": (1, -1, -1, 3)}, input_format="NHWC")["kind"] == \
        "resolution"
    spec = G.parse("2,8;4,16", {"x": (-1, 3, -1, 8)})
    assert spec["kind"] == "dims" and spec["gears"][1]["shapes"] == {"x": [4, 3, 16, 8]}
