"""AIPP compiled into the .om (dopt omg --insert_op_conf) and run by dopt.runtime."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dopt import runtime
from dopt.errors import DoptError
from dopt.npu import aipp as A
from dopt.npu import omg
from dopt.npu.aipp_config import parse_text

from test_aipp_config import EX_DYNAMIC, EX_MIXED, EX_STATIC


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Conv + ReLU with free batch and spatial dims, 3 channels in."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 3, 3, 3)) * 0.2).astype(np.float32)
    nodes = [helper.make_node("Conv", ["data", "w"], ["y"], name="conv", pads=[1] * 4,
                              kernel_shape=[3, 3]),
             helper.make_node("Relu", ["y"], ["z"], name="relu")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(
        "data", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path_factory.mktemp("aipp") / "m.onnx"
    onnx.save(m, path)
    return path


def _compile(model, tmp_path, cfg_text, shape, name="m", extra=()):
    cfg = tmp_path / f"{name}.cfg"
    cfg.write_text(cfg_text)
    args = ["--framework", "5", "--model", str(model), "--output", str(tmp_path / name),
            "--input_shape", shape, "--insert_op_conf", str(cfg), *extra]
    return omg.main(args), tmp_path / f"{name}.om"


def test_static_full_example_compiles_and_runs_bit_exact(model, tmp_path, capsys):
    rc, om = _compile(model, tmp_path, EX_STATIC, "data:1,3,224,224")
    assert rc == 0
    assert "| Aipp | 1 | npu |" in capsys.readouterr().out
    s = runtime.load(om)
    assert s.inputs[0]["shape"] == [1, 384, 480, 4] and s.inputs[0]["dtype"] == "uint8"
    k0 = s.om.graph["kernels"][0]
    assert k0["op"] == "Aipp" and k0["device"] == "npu"
    assert s.estimate["kernels"][0]["op"] == "Aipp" and s.estimate["kernels"][0]["time_us"] > 0
    raw = np.random.default_rng(1).integers(0, 256, (2, 384, 480, 4), dtype=np.uint8)
    got = s.run(raw)["z"]
    # the same model compiled without AIPP, fed the AIPP output computed on its own
    plain = tmp_path / "plain"
    assert omg.main(["--framework", "5", "--model", str(model), "--output", str(plain),
                     "--input_shape", "data:1,3,224,224"]) == 0
    x = A.run(parse_text(EX_STATIC)[0], raw, 3).astype(np.float32)
    want = runtime.load(str(plain) + ".om").run(x)["z"]
    assert got.shape == (2, 16, 224, 224) and np.array_equal(got, want)
    with pytest.raises(DoptError, match="static"):
        s.run(raw, aipp={"crop_size_w": 10})
    with pytest.raises(DoptError, match="raw UINT8 frames"):
        s.run(raw.astype(np.float32))


def test_mixed_example_takes_dynamic_crop_per_call(model, tmp_path):
    rc, om = _compile(model, tmp_path, EX_MIXED, "data:1,3,224,224")
    s = runtime.load(om)
    assert s.aipp[0]["mode"] == "dynamic"
    raw = np.random.default_rng(2).integers(0, 256, (1, 200, 200, 4), dtype=np.uint8)
    a = s.run(raw, aipp={"crop_size_w": 100, "crop_size_h": 100})["z"]
    b = s.run(raw, aipp={"crop_size_w": 80, "crop_size_h": 80, "load_start_pos_w": 20})["z"]
    assert a.shape == b.shape == (1, 16, 224, 224) and not np.array_equal(a, b)
    with pytest.raises(DoptError, match="over the compiled maximum"):
        s.run(raw, aipp={"crop_size_w": 120, "crop_size_h": 100})
    with pytest.raises(DoptError, match="is dynamic: pass its run-time parameters"):
        s.run(raw)


def test_dynamic_example_takes_nv12_frames(model, tmp_path):
    rc, om = _compile(model, tmp_path, EX_DYNAMIC, "data:1,3,200,250")
    s = runtime.load(om)
    assert s.inputs[0]["shape"] == [1, -1, -1, -1]
    nv12 = np.random.default_rng(3).integers(0, 256, (1, 576, 480), dtype=np.uint8)
    params = {"format": "YUV420SP_U8", "src_image_size_w": 480, "src_image_size_h": 384,
              "ax_swap_switch": False, "color_space": "BT_601_NARROW",
              "load_start_pos_w": 10, "crop_size_w": 150, "crop_size_h": 150,
              "resize_output_w": 250, "resize_output_h": 200}
    assert s.run(nv12, aipp=params)["z"].shape == (1, 16, 200, 250)
    with pytest.raises(DoptError, match="AX swap is not available for YUV420SP_U8"):
        s.run(nv12, aipp={**params, "ax_swap_switch": True})
    with pytest.raises(DoptError, match="another size than the model's input"):
        s.run(nv12, aipp={**params, "resize_output_w": 200})


@pytest.mark.parametrize("cfg,shape,needle", [
    (EX_STATIC.replace("aipp_op {", 'aipp_op {\n    input_name: "img"'), "data:1,3,224,224",
     "input_name 'img' is not an input"),
    (EX_STATIC.replace("aipp_op {", 'aipp_op {\n    input_name: "data"\n'
                       '    related_input_rank: 1'), "data:1,3,224,224", "past the model"),
    (EX_STATIC, "data:1,3,200,200", "the AIPP output is 224x224"),
    (EX_STATIC.replace("resize_output_w: 182", "resize_output_w: 12"), "data:1,3,224,224",
     "resize output out of range"),
], ids=["input_name", "related_input_rank", "output_size", "resize_range"])
def test_bad_configs_exit_2_and_leave_no_om(model, tmp_path, capsys, cfg, shape, needle):
    from dopt.errors import run_cli
    rc = run_cli("dopt omg", lambda: _compile(model, tmp_path, cfg, shape)[0])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "line " in err
    assert not (tmp_path / "m.om").exists()


def test_fashion_mnist_aipp_agrees_with_the_float_pipeline(tmp_path):
    pytest.importorskip("torch")
    from demos.fashion_mnist import aipp_demo
    res = aipp_demo.run("resnet8", limit=1000, out_dir=tmp_path, quiet=True)
    assert res["input"]["dtype"] == "uint8" and res["input"]["shape"] == [1, 28, 28, 1]
    assert res["agreement"] >= 99.9


def test_dopt_run_takes_dynamic_aipp_parameters_from_json(model, tmp_path):
    """``dopt run --aipp params.json``: the same numbers as ``session.run(..., aipp=...)``."""
    import json
    from cli import dopt, one_paragraph_error
    rc, om = _compile(model, tmp_path, EX_MIXED, "data:1,3,224,224")
    raw = np.random.default_rng(5).integers(0, 256, (1, 200, 200, 4), dtype=np.uint8)
    np.save(tmp_path / "raw.npy", raw)
    params = {"crop_size_w": 90, "crop_size_h": 100, "load_start_pos_h": 7}
    (tmp_path / "p.json").write_text(json.dumps(params))
    r = dopt("run", "--om", str(om), "--input", str(tmp_path / "raw.npy"), "--aipp",
             str(tmp_path / "p.json"), "--output", str(tmp_path / "o.npz"))
    assert r.returncode == 0, r.stderr
    want = runtime.load(om).run(raw, aipp=params)["z"]
    assert np.array_equal(np.load(tmp_path / "o.npz")["z"], want)
    (tmp_path / "p.json").write_text(json.dumps({"crop_size_w": 500, "crop_size_h": 100}))
    one_paragraph_error(dopt("run", "--om", str(om), "--input", str(tmp_path / "raw.npy"),
                             "--aipp", str(tmp_path / "p.json")), "crop_size_w")
    (tmp_path / "p.json").write_text("[1, 2]")
    one_paragraph_error(dopt("run", "--om", str(om), "--input", str(tmp_path / "raw.npy"),
                             "--aipp", str(tmp_path / "p.json")), "--aipp", "one JSON object")


def test_precheck_mode_includes_aipp(model, tmp_path, capsys):
    """``--mode 3 --insert_op_conf``: the report and the estimate hold the Aipp kernel."""
    import json
    cfg = tmp_path / "s.cfg"
    cfg.write_text(EX_STATIC)
    assert omg.main(["--mode", "3", "--framework", "5", "--model", str(model), "--input_shape",
                     "data:1,3,224,224", "--insert_op_conf", str(cfg), "--check_report",
                     str(tmp_path / "r.json")]) == 0
    assert "| Aipp | 1 | npu |" in capsys.readouterr().out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["aipp"][0]["mode"] == "static" and rep["aipp"][0]["output_hw"] == [224, 224]
    assert rep["nodes"][0]["onnx_op"] == "Aipp"
    assert not (tmp_path / "m.om").exists()
