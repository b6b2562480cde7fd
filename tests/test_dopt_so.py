"""``dopt_so``: the reference's no-training command line on ONNX and PyTorch models."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from dopt.calib import sets as calibset
from dopt.formats import param_file as P
from dopt.formats.qdq import ort_session

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
N_CAL = 24

BIN_CONF = """strategy: "Quant_INT8-8"
device: USE_GPU
// one preprocess_parameter per model input
preprocess_parameter:
{{
    input_type: BINARY
    input_file_path: "{path}"
}}
{extra}
"""
IMAGE_CONF = """strategy: "Quant_INT8-8"
device: USE_CPU
preprocess_parameter:
{{
    input_type: IMAGE
    image_format: BGR
    mean_value: 104.0
    mean_value: 113.0
    mean_value: 123.0
    standard_deviation: 58.0
    input_file_path: "{path}"
}}
{extra}
"""


def _images(n, seed=0, size=160):
    """Smooth colour images with edges (photo-like statistics, not white noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a = rng.uniform(0, 6, 6)
        img = np.stack([np.sin(a[0] * xx + a[1] * yy + a[2]), np.cos(a[3] * xx * yy + a[4]),
                        (xx * a[5] % 1.0)], -1)
        img = (img - img.min()) / (np.ptp(img) + 1e-6) * 255
        img[rng.integers(0, size // 2):, rng.integers(0, size // 2):] *= 0.4
        out.append(img.astype(np.uint8))
    return out


def _to_input(imgs):
    mean = np.array([104.0, 113.0, 123.0], np.float32)
    x = np.stack([i[:128, :128, ::-1].astype(np.float32) for i in imgs])  # BGR, like IMAGE
    return ((x - mean) / 58.0).transpose(0, 3, 1, 2).copy()


def _run(args, cwd):
    return subprocess.run([sys.executable, "-W", "ignore", "./dopt_so.py", *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def _so_error(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("dopt_so: error:")]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in err[0], err[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A user's folder: the script, net.py/net.pth, m.onnx and three calibration sets."""
    d = tmp_path_factory.mktemp("so")
    shutil.copy(ROOT / "dopt_so.py", d / "dopt_so.py")
    shutil.copy(HERE / "so_net.py", d / "net.py")
    sys.path.insert(0, str(HERE))
    import so_net
    sys.path.pop(0)
    net = so_net.trained_like(0)
    torch.save(net.state_dict(), d / "net.pth")
    torch.onnx.export(net, (torch.zeros(1, 3, 128, 128),), str(d / "m.onnx"), dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}})
    imgs = _images(N_CAL)
    x = _to_input(imgs)
    calibset.write_bin610(d / "cal610.bin", x)
    calibset.write_bin510(d / "cal510.bin", x)
    (d / "images").mkdir()
    from PIL import Image
    for i, im in enumerate(imgs):
        Image.fromarray(im[:128, :128]).save(d / "images" / f"img_{i:03d}.png")
    (d / "conf610.prototxt").write_text(BIN_CONF.format(path="cal610.bin", extra=""))
    (d / "conf510.prototxt").write_text(BIN_CONF.format(path="cal510.bin", extra=""))
    (d / "confimg.prototxt").write_text(IMAGE_CONF.format(path="images", extra=""))
    test = _to_input(_images(16, seed=1))
    np.save(d / "test.npy", test)
    return d


def _reference_cmd(conf, out="m_quant", model="./m.onnx"):
    return ["--framework", "5", "--mode", "0", "--model", model, "--cal_conf", f"./{conf}",
            "--output", f"./{out}.onnx", "--input_shape", "input:1,3,128,128",
            "--compress_conf", f"./{out}_param"]


def _sqnr(ref, got):
    return 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - got) ** 2))


@pytest.mark.parametrize("conf", ["conf610.prototxt", "conf510.prototxt", "confimg.prototxt"])
def test_reference_onnx_example_runs_unchanged(work, conf):
    out = f"q_{conf.split('.')[0]}"
    r = _run(_reference_cmd(conf, out), work)
    assert r.returncode == 0, r.stderr
    assert "USE_GPU asked" in r.stderr or "device: CPU" in r.stderr
    doc = P.read_params(work / f"{out}_param")
    qdq = onnx.load(str(work / f"{out}.onnx"))
    assert doc["model"] == f"{out}.onnx"
    # the first convolution (Cin=3) stays float: the NPU runs it in FP16
    assert len(doc["layers"]) == 4 and len(doc["float_layers"]) == 1
    ops = [n.op_type for n in qdq.graph.node]
    assert ops.count("QuantizeLinear") == 4
    test = np.load(work / "test.npy")
    ref = ort_session(str(work / "m.onnx")).run(None, {"input": test})[0]
    got = ort_session(str(work / f"{out}.onnx")).run(None, {"input": test})[0]
    assert _sqnr(ref, got) > 25, _sqnr(ref, got)


def test_the_three_calibration_sets_agree(work):
    for conf in ("conf610.prototxt", "conf510.prototxt", "confimg.prototxt"):
        if not (work / f"q_{conf.split('.')[0]}_param").exists():
            assert _run(_reference_cmd(conf, f"q_{conf.split('.')[0]}"), work).returncode == 0
    docs = [P.read_params(work / f"q_conf{k}_param") for k in ("610", "510", "img")]
    s = [[r["input"]["scale"] for r in d["layers"].values()] for d in docs]
    assert s[0] == s[1]  # the same data in both bin formats
    np.testing.assert_allclose(s[0], s[2], rtol=0.05)  # PNG -> uint8 -> BGR -> (x-m)/s


def test_omg_compiles_the_quantized_model_with_its_param_file(work):
    if not (work / "q_conf610_param").exists():
        assert _run(_reference_cmd("conf610.prototxt", "q_conf610"), work).returncode == 0
    r = subprocess.run([sys.executable, "-W", "ignore", "-m", "dopt", "omg", "--framework", "5",
                        "--model", "q_conf610.onnx", "--compress_conf", "q_conf610_param",
                        "--output", "q610", "--input_shape", "input:1,3,128,128"],
                       capture_output=True, text=True, cwd=work, timeout=300)
    assert r.returncode == 0, r.stderr
    from dopt import runtime
    sess = runtime.load(str(work / "q610.om"))
    test = np.load(work / "test.npy")
    got = sess.run({"input": test[:1]})
    ref = ort_session(str(work / "q_conf610.onnx")).run(None, {"input": test[:1]})[0]
    out = next(iter(got.values())) if isinstance(got, dict) else got[0]
    assert _sqnr(ref, np.asarray(out, np.float32)) > 25


def test_pytorch_form(work):
    r = _run(["--framework", "5", "--mode", "0", "--model", "./net.py", "--weight", "./net.pth",
              "--cal_conf", "./conf610.prototxt", "--output", "./tq.pt",
              "--input_shape", "input:1,3,128,128", "--compress_conf", "./tq_param"], work)
    assert r.returncode == 0, r.stderr
    state = torch.load(work / "tq.pt", weights_only=True)
    assert any(k.endswith("act.lo") or "act" in k for k in state)
    doc = P.read_params(work / "tq_param")
    assert doc["model"] == "tq.onnx" and len(doc["layers"]) == 4
    r = subprocess.run([sys.executable, "-W", "ignore", "-m", "dopt", "omg", "--framework", "5",
                        "--model", "tq.onnx", "--compress_conf", "tq_param", "--output", "tq"],
                       capture_output=True, text=True, cwd=work, timeout=300)
    assert r.returncode == 0, r.stderr
    test = np.load(work / "test.npy")
    sys.path.insert(0, str(HERE))
    import so_net
    sys.path.pop(0)
    net = so_net.Net().eval()
    net.load_state_dict(torch.load(work / "net.pth", weights_only=True))
    with torch.no_grad():
        ref = net(torch.from_numpy(test)).numpy()
    got = ort_session(str(work / "tq_qdq.onnx")).run(None, {"input": test})[0]
    assert _sqnr(ref, got) > 25


def test_exclude_op_names_weights(work):
    m = onnx.load(str(work / "m.onnx"))
    conv = [n for n in m.graph.node if n.op_type == "Conv"][2]
    (work / "conf_ex.prototxt").write_text(BIN_CONF.format(
        path="cal610.bin", extra=f'exclude_op: "{conv.input[1]}"'))
    r = _run(_reference_cmd("conf_ex.prototxt", "q_ex"), work)
    assert r.returncode == 0, r.stderr
    doc = P.read_params(work / "q_ex_param")
    assert len(doc["layers"]) == 3 and len(doc["float_layers"]) == 2


def _no_outputs(work, stem):
    return not any(p.name.startswith(stem) for p in work.iterdir())


@pytest.mark.parametrize("case", ["magic", "truncated", "dims", "empty_dir", "bad_image",
                                  "exclude", "mean_count", "prototxt", "unwritable", "no_dir",
                                  "path"])
def test_bad_inputs(work, case):
    stem = f"bad_{case}"
    conf = f"{stem}.prototxt"
    cmd = _reference_cmd(conf, stem)
    needles = []
    raw = (work / "cal610.bin").read_bytes()
    if case == "magic":
        (work / f"{stem}.bin").write_bytes(np.int32(611).tobytes() + raw[4:])
        text = BIN_CONF.format(path=f"{stem}.bin", extra="")
        needles = ["611", "610", "510"]
    elif case == "truncated":
        (work / f"{stem}.bin").write_bytes(raw[:-10])
        text = BIN_CONF.format(path=f"{stem}.bin", extra="")
        needles = [f"{stem}.bin"]
    elif case == "dims":
        text = BIN_CONF.format(path="cal610.bin", extra="")
        cmd[cmd.index("--input_shape") + 1] = "input:1,3,96,96"
        needles = ["cal610.bin", "96"]
    elif case == "empty_dir":
        (work / stem).mkdir(exist_ok=True)
        (work / stem / "notes.txt").write_text("x")
        text = IMAGE_CONF.format(path=stem, extra="")
        needles = [stem]
    elif case == "bad_image":
        (work / stem).mkdir(exist_ok=True)
        shutil.copy(work / "images" / "img_000.png", work / stem / "a.png")
        (work / stem / "b.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        text = IMAGE_CONF.format(path=stem, extra="")
        needles = ["b.jpg"]
    elif case == "exclude":
        text = BIN_CONF.format(path="cal610.bin", extra='exclude_op: "conv9;nothere"')
        needles = ["exclude_op", "conv9"]
    elif case == "mean_count":
        text = IMAGE_CONF.format(path="images", extra="").replace("mean_value: 123.0\n", "")
        needles = ["mean_value", "3"]
    elif case == "prototxt":
        text = BIN_CONF.format(path="cal610.bin", extra="").replace("input_type: BINARY",
                                                                   "input_type BINARY")
        needles = ["line 6, column", "input_type"]
    elif case == "unwritable":
        text = BIN_CONF.format(path="cal610.bin", extra="")
        (work / "ro").mkdir(exist_ok=True)
        os.chmod(work / "ro", 0o500)
        cmd[cmd.index("--output") + 1] = f"./ro/{stem}.onnx"
        needles = ["ro"]
    elif case == "no_dir":
        text = BIN_CONF.format(path="cal610.bin", extra="")
        cmd[cmd.index("--compress_conf") + 1] = "./nodir/bad_param"
        needles = ["nodir", "does not exist"]
    else:  # path
        text = BIN_CONF.format(path="cal610.bin", extra="")
        cmd[cmd.index("--output") + 1] = f"./{stem}-x.onnx"
        needles = ["--output", "'-'"]
    (work / conf).write_text(text)
    try:
        r = _run(cmd, work)
    finally:
        if case == "unwritable":
            os.chmod(work / "ro", 0o700)
    if case == "unwritable" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    _so_error(r, *needles)
    left = [p.name for p in work.iterdir() if p.name.startswith(stem) and
            p.suffix not in (".prototxt", ".bin") and not p.is_dir()]
    assert left == [], left


def test_multi_input_model(work, tmp_path):
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.2, (32, 24, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.2, (32, 20, 1, 1)).astype(np.float32), "w2")
    g = helper.make_graph(
        [helper.make_node("Conv", ["a", "w1"], ["ya"], pads=[1, 1, 1, 1], name="ca"),
         helper.make_node("Conv", ["b", "w2"], ["yb"], name="cb"),
         helper.make_node("Add", ["ya", "yb"], ["y"], name="add")], "two",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 24, 8, 8]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 20, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    d = tmp_path
    shutil.copy(ROOT / "dopt_so.py", d)
    onnx.save(m, str(d / "two.onnx"))
    calibset.write_bin610(d / "a.bin", rng.normal(0, 1, (10, 24, 8, 8)).astype(np.float32))
    calibset.write_bin610(d / "b.bin", rng.normal(0, 3, (10, 20, 8, 8)).astype(np.float32))
    (d / "c.prototxt").write_text(
        "preprocess_parameter { input_type: BINARY input_file_path: \"a.bin\" }\n"
        "preprocess_parameter { input_type: BINARY input_file_path: \"b.bin\" }\n")
    r = _run(["--framework", "5", "--mode", "0", "--model", "two.onnx", "--cal_conf",
              "c.prototxt", "--output", "two_q.onnx", "--input_shape",
              "a:2,24,8,8;b:2,20,8,8", "--compress_conf", "two_param"], d)
    assert r.returncode == 0, r.stderr
    doc = P.read_params(d / "two_param")
    assert set(doc["layers"]) == {"ca", "cb"}
    # each input's range comes from its own file
    assert doc["layers"]["cb"]["input"]["range"][1] > 2 * doc["layers"]["ca"]["input"]["range"][1]


def test_interrupt_keeps_statistics():
    from dopt.calib.loop import calibrate

    def feeds():
        for i in range(5):
            if i == 3:
                raise KeyboardInterrupt
            yield {"x": np.full((2, 4), float(i + 1), np.float32)}

    logs = []
    st = calibrate(lambda f: {"t": f["x"]}, feeds(), tensors=["t"], algorithm="minmax",
                   progress=False, log=logs.append)
    assert st.interrupted and st.samples == 6 and st.ranges["t"] == (1.0, 3.0)
    assert "interrupted" in logs[0]


def test_module_and_console_entry_points(work):
    r = subprocess.run([sys.executable, "-m", "dopt.dopt_so", "--help"], capture_output=True,
                       text=True, cwd=work, timeout=120)
    assert r.returncode == 0 and "--compress_conf" in r.stdout
    exe = shutil.which("dopt_so")
    if exe:
        r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "--input_shape" in r.stdout
