"""TensorFlow on the command line: ``dopt_so --framework 3`` and ``dopt omg --framework 3``.

A small TF1-style frozen graph (conv + bias + fused BN, depthwise, matmul) is built in the
test; the reference's no-training flow runs on it with BINARY 610/510 and IMAGE
calibration sets; the outputs compile and run on the emulated NPU; bad inputs fail in
one paragraph with nothing written. ``import dopt`` must not need TensorFlow.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli import dopt, one_paragraph_error

ROOT = Path(__file__).resolve().parents[1]
N_CAL = 32
BIN_CONF = """strategy: "Quant_INT8-8"
device: USE_CPU
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
    image_format: RGB
    mean_value: 120.0
    mean_value: 110.0
    mean_value: 100.0
    standard_deviation: 60.0
    input_file_path: "{path}"
}}
"""


def test_import_dopt_without_tensorflow():
    code = ("import sys; sys.modules['tensorflow'] = None; sys.modules['keras'] = None\n"
            "import dopt, dopt.dopt_tf.opt_main, dopt.dopt_so\n"
            "from dopt.plugin_manager import adapters\n"
            "assert 'tensorflow' in adapters(), adapters()\n"
            "try:\n"
            "    dopt.dopt_tf.opt_main.generate_config_file(object(), 'x.json')\n"
            "except dopt.errors.DoptError as e:\n"
            "    print('ERR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ERR" in r.stdout and "tensorflow" in r.stdout.lower()


tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")


def _build_pb(path: Path, seed=0):
    """input (N,16,16,3) -> conv3x3(24)+bias -> fused BN -> relu -> depthwise3x3 -> relu
    -> conv1x1(32) -> mean -> matmul(10)+bias -> output."""
    tf1 = tf.compat.v1
    rng = np.random.default_rng(seed)
    g = tf.Graph()
    with g.as_default():
        x = tf1.placeholder(tf.float32, [None, 16, 16, 3], name="input")

        def const(name, shape, scale=0.3, offset=0.0):
            return tf.constant((rng.standard_normal(shape) * scale + offset).astype(np.float32),
                               name=name)
        y = tf.nn.conv2d(x, const("conv1/weights", [3, 3, 3, 24]), 1, "SAME",
                         name="conv1/Conv2D")
        y = tf.nn.bias_add(y, const("conv1/bias", [24], 0.1), name="conv1/BiasAdd")
        y, _, _ = tf1.nn.fused_batch_norm(
            y, const("bn1/gamma", [24], 0.1, 1.0), const("bn1/beta", [24], 0.1),
            const("bn1/mean", [24], 0.1), tf.constant(
                rng.uniform(0.5, 1.5, 24).astype(np.float32), name="bn1/var"),
            is_training=False, name="bn1/FusedBatchNormV3")
        y = tf.nn.relu(y, name="relu1")
        y = tf.nn.depthwise_conv2d(y, const("dw/weights", [3, 3, 24, 1]), [1, 1, 1, 1], "SAME",
                                   name="dw/depthwise")
        y = tf.nn.relu(tf.nn.bias_add(y, const("dw/bias", [24], 0.1)), name="relu2")
        y = tf.nn.conv2d(y, const("pw/weights", [1, 1, 24, 32], 0.2), 1, "SAME",
                         name="pw/Conv2D")
        y = tf.nn.relu(tf.nn.bias_add(y, const("pw/bias", [32], 0.1)), name="relu3")
        y = tf.reduce_mean(y, [1, 2], name="gap")
        y = tf.matmul(y, const("fc/weights", [32, 10]), name="fc/MatMul")
        tf.identity(tf.nn.bias_add(y, const("fc/bias", [10], 0.1)), name="output")
    path.write_bytes(g.as_graph_def().SerializeToString())


def _run_pb(path: Path, x):
    gd = tf.compat.v1.GraphDef()
    gd.ParseFromString(path.read_bytes())
    g = tf.Graph()
    with g.as_default():
        tf.compat.v1.import_graph_def(gd, name="")
    with tf.compat.v1.Session(graph=g) as s:
        return s.run("output:0", {"input:0": x})


def _images(n, seed=1):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16] / 16
    out = []
    for _ in range(n):
        a = rng.uniform(0, 6, 4)
        img = np.stack([np.sin(a[0] * xx + a[1] * yy), np.cos(a[2] * xx * yy), xx * a[3] % 1], -1)
        out.append(((img - img.min()) / (np.ptp(img) + 1e-6) * 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from PIL import Image
    from dopt.calib import sets as calibset
    d = tmp_path_factory.mktemp("tfcli")
    _build_pb(d / "m.pb")
    shutil.copy(ROOT / "dopt_so.py", d / "dopt_so.py")
    imgs = _images(N_CAL)
    (d / "images").mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(d / "images" / f"img_{i:03d}.png")
    mean = np.array([120.0, 110.0, 100.0], np.float32)
    nhwc = ((np.stack(imgs).astype(np.float32) - mean) / 60.0).astype(np.float32)
    np.save(d / "nhwc.npy", nhwc)
    calibset.write_bin610(d / "cal610.bin", nhwc)                             # as is (NHWC)
    calibset.write_bin510(d / "cal510.bin", nhwc.transpose(0, 3, 1, 2).copy())  # NCHW, reordered
    (d / "conf610.prototxt").write_text(BIN_CONF.format(path="cal610.bin", extra=""))
    (d / "conf510.prototxt").write_text(BIN_CONF.format(path="cal510.bin", extra=""))
    (d / "confimg.prototxt").write_text(IMAGE_CONF.format(path="images"))
    return d


def _so(args, cwd):
    return subprocess.run([sys.executable, "-W", "ignore", "./dopt_so.py", *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def _cmd(conf, out, model="./m.pb", shape="input:1,16,16,3", nodes="output"):
    return ["--mode", "0", "--framework", "3", "--model", model, "--cal_conf", f"./{conf}",
            "--output", f"./{out}.pb", "--input_format", "NHWC", "--input_shape", shape,
            "--out_nodes", nodes, "--compress_conf", f"./{out}_param"]


@pytest.mark.parametrize("conf", ["conf610.prototxt", "conf510.prototxt", "confimg.prototxt"])
def test_reference_tf_flow_compiles_and_runs(work, conf):
    out = f"q_{conf.split('.')[0]}"
    r = _so(_cmd(conf, out), work)
    assert r.returncode == 0, r.stderr
    doc = json.loads((work / f"{out}_param").read_text())
    # keyed by the TF op names of the frozen graph
    assert {"dw/depthwise", "pw/Conv2D", "fc/MatMul"} <= set(doc["layers"]), doc["layers"].keys()
    assert "conv1/Conv2D" in doc["float_layers"]  # Cin = 3 <= 16: the NPU runs it in FP16
    assert doc["layers"]["pw/Conv2D"]["op_type"] == "Conv2D"
    x = np.load(work / "nhwc.npy")
    # the .pb written is the float graph (bias correction may move biases slightly)
    ref, got = _run_pb(work / "m.pb", x), _run_pb(work / f"{out}.pb", x)
    assert np.abs(ref - got).max() <= 0.05 * np.abs(ref).max()
    r = dopt("omg", "--framework", "3", "--model", str(work / f"{out}.pb"), "--input_shape",
             "input:1,16,16,3", "--out_nodes", "output:0", "--compress_conf",
             str(work / f"{out}_param"), "--output", str(work / out))
    assert r.returncode == 0, r.stderr
    assert "3 INT8 layers" in r.stdout
    from dopt import runtime
    from dopt.formats.qdq import ort_session
    npu = runtime.load(str(work / f"{out}.om")).predict(x)
    qdq = ort_session(str(work / f"{out}_qdq.onnx")).run(None, {"input:0": x})[0]
    assert (npu.argmax(1) == qdq.argmax(1)).mean() >= 0.9
    assert np.abs(npu - qdq).max() <= 0.1 * np.abs(qdq).max() + 1e-3


def test_same_result_from_610_510_and_image(work):
    """510 data are NCHW and reordered for NHWC; 610 data are used as they are; IMAGE RGB
    folders give the same pixels: all three calibrate identically."""
    docs = [json.loads((work / f"q_{c}_param").read_text())
            for c in ("conf610", "conf510", "confimg")]
    if len(docs) < 3:
        pytest.skip("needs the flow test first")
    ranges = [{k: v["input"]["range"] for k, v in d["layers"].items()} for d in docs]
    for k in ranges[0]:
        np.testing.assert_allclose(ranges[1][k], ranges[0][k], rtol=1e-6)
        np.testing.assert_allclose(ranges[2][k], ranges[0][k], rtol=1e-4, atol=1e-5)


def test_omg_fp16_and_precheck_from_pb(work):
    r = dopt("omg", "--mode", "3", "--framework", "3", "--model", str(work / "m.pb"),
             "--input_shape", "input:1,16,16,3", "--out_nodes", "output:0",
             "--check_report", str(work / "check.json"))
    assert r.returncode == 0, r.stderr
    rep = json.loads((work / "check.json").read_text())
    assert rep["summary"]["cpu"] == 0 and rep["summary"]["npu"] > 0
    r = dopt("omg", "--framework", "3", "--model", str(work / "m.pb"), "--input_shape",
             "input:1,16,16,3", "--out_nodes", "output:0", "--output", str(work / "fp16"))
    assert r.returncode == 0, r.stderr
    from dopt import runtime
    x = np.load(work / "nhwc.npy")
    got = runtime.load(str(work / "fp16.om")).predict(x)
    ref = _run_pb(work / "m.pb", x)
    assert np.abs(got - ref).max() <= 2e-2 * np.abs(ref).max()


def test_keras_file_compiles(work):
    import keras
    inp = keras.Input((16, 16, 3), name="image")
    y = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="c1")(inp)
    y = keras.layers.BatchNormalization(name="bn")(y)
    y = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(y)
    y = keras.layers.GlobalAveragePooling2D()(y)
    out = keras.layers.Dense(10, name="fc")(y)
    m = keras.Model(inp, out)
    m.save(work / "k.keras")
    r = dopt("omg", "--framework", "3", "--model", str(work / "k.keras"), "--input_shape",
             "image:1,16,16,3", "--output", str(work / "k_fp16"))
    assert r.returncode == 0, r.stderr
    from dopt import runtime
    x = np.load(work / "nhwc.npy")[:8]
    got = runtime.load(str(work / "k_fp16.om")).predict(x)
    ref = m.predict(x, verbose=0)
    assert np.abs(got - ref).max() <= 2e-2 * np.abs(ref).max() + 1e-3


def _nothing_new(work, before):
    assert sorted(p.name for p in work.iterdir()) == before


@pytest.mark.parametrize("case", ["out_nodes", "input_shape", "not_pb", "input_name"])
def test_dopt_so_bad_inputs(work, case):
    before = sorted(p.name for p in work.iterdir())
    kw = {}
    needles = []
    conf = "conf610.prototxt"
    if case == "out_nodes":
        kw["nodes"] = "output;logits_missing"
        needles = ["--out_nodes", "logits_missing"]
    elif case == "input_shape":
        # a calibration set of the asked shape, so the graph check is what fails
        from dopt.calib import sets as calibset
        calibset.write_bin610(work / "cal32.bin", np.zeros((4, 32, 32, 3), np.float32))
        (work / "conf32.prototxt").write_text(BIN_CONF.format(path="cal32.bin", extra=""))
        before = sorted(p.name for p in work.iterdir())
        conf = "conf32.prototxt"
        kw["shape"] = "input:1,32,32,3"
        needles = ["--input_shape", "32,32,3", "16,16,3"]
    elif case == "input_name":
        kw["shape"] = "images:1,16,16,3"
        needles = ["--input_shape", "images", "input"]
    elif case == "not_pb":
        (work / "junk.pb").write_bytes(b"\x0a\xff\xff\xff not a graph")
        before = sorted(p.name for p in work.iterdir())
        kw["model"] = "./junk.pb"
        needles = ["junk.pb", "GraphDef"]
    r = _so(_cmd(conf, f"bad_{case}", **kw), work)
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("dopt_so: error:")]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in err[0], err[0]
    _nothing_new(work, before)


def test_omg_bad_inputs(work):
    before = sorted(p.name for p in work.iterdir())
    base = ["omg", "--framework", "3", "--model", str(work / "m.pb"), "--output",
            str(work / "bad")]
    r = dopt(*base, "--input_shape", "input:1,16,16,3", "--out_nodes", "nothere:0")
    one_paragraph_error(r, "--out_nodes", "nothere")
    r = dopt(*base, "--input_shape", "input:1,16,16,4", "--out_nodes", "output:0")
    one_paragraph_error(r, "--input_shape", "16,16,4")
    # a parameter-file record for an op the graph does not have
    r = _so(_cmd("conf610.prototxt", "good"), work)
    assert r.returncode == 0, r.stderr
    doc = json.loads((work / "good_param").read_text())
    doc["layers"]["ghost/Conv2D"] = doc["layers"].pop("pw/Conv2D")
    (work / "ghost_param").write_text(json.dumps(doc))
    before = sorted(p.name for p in work.iterdir())
    r = dopt(*base, "--input_shape", "input:1,16,16,3", "--out_nodes", "output:0",
             "--compress_conf", str(work / "ghost_param"))
    one_paragraph_error(r, "ghost/Conv2D", "ghost_param")
    _nothing_new(work, before)


@pytest.mark.slow   # the whole shell demo; test_reference_tf_flow_compiles_and_runs covers
# dopt_so --framework 3 -> omg -> NPU in the default set
def test_tf_no_training_demo(tmp_path):
    """The reference's tensorflow_mnist demo shape: frozen .pb + image folder + run_release.sh."""
    r = subprocess.run(["bash", str(ROOT / "demos" / "tf_no_training" / "run_release.sh"),
                        str(tmp_path), "image"], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["float_top1"] > 80
    assert res["npu_int8_top1"] >= res["float_top1"] - 1.0
    assert res["npu_vs_qdq_agreement"] >= 99.0


def test_fixed_batch_model_runs_any_batch(tmp_path):
    """tf2onnx bakes a fixed batch into its NHWC->NCHW Reshape; the compiled model still runs N."""
    from dopt import runtime
    from dopt.errors import DoptError
    tf1 = tf.compat.v1
    g = tf.Graph()
    with g.as_default():
        x = tf1.placeholder(tf.float32, [1, 8, 8, 1], name="input")
        w = tf.constant(np.ones((3, 3, 1, 16), np.float32), name="w")
        tf.identity(tf.nn.conv2d(x, w, 1, "SAME"), name="output")
    (tmp_path / "b1.pb").write_bytes(g.as_graph_def().SerializeToString())
    r = dopt("omg", "--framework", "3", "--model", str(tmp_path / "b1.pb"), "--out_nodes",
             "output:0", "--output", str(tmp_path / "b1"))
    assert r.returncode == 0, r.stderr
    s = runtime.load(str(tmp_path / "b1.om"))
    assert s.run(np.ones((1, 8, 8, 1), np.float32))
    # N samples are N inferences of the compiled batch-1 model: the reshape's fixed batch is
    # freed at compile time (or the samples run one by one), never a wrong answer
    x = np.random.default_rng(0).standard_normal((4, 8, 8, 1)).astype(np.float32)
    name = s.outputs[0]
    whole = s.run(x)[name]
    one_by_one = np.concatenate([s.run(x[i:i + 1])[name] for i in range(4)])
    assert whole.shape[0] == 4
    np.testing.assert_array_equal(whole, one_by_one)
    with pytest.raises(DoptError, match="shape"):
        s.run(np.ones((4, 8, 9, 1), np.float32))   # a wrong sample shape stays an error


def test_keras_application_mobilenetv2_fp16_and_int8(tmp_path):
    """keras.applications.MobileNetV2 (weights=None): FP16 from .keras, INT8 from a
    calibration-only parameter file, no CPU fallback, reports written."""
    from bench import bench_keras_applications as b
    b.SIZES["MobileNetV2"] = 96  # the architecture at a smaller input, to keep CI fast
    try:
        r = b.run_model("MobileNetV2", tmp_path)
    finally:
        b.SIZES["MobileNetV2"] = 224
    assert r["int8_layers"] >= 40
    for key in ("fp16", "int8"):
        assert r[key]["summary"]["cpu"] == len(r[key]["cpu_fallbacks"]) == 0
        # on the NPU, at its best or degraded: the untrained network's activations shrink
        # below the smallest normal half in its later blocks, which the FP16 range rule flags
        assert r[key]["summary"]["npu"] + r[key]["summary"]["npu_degraded"] > 50
    assert r["int8"]["om_mb"] < 0.6 * r["fp16"]["om_mb"]


@pytest.mark.slow
def test_keras_applications_all_compile():
    from bench import bench_keras_applications as b
    assert b.main([]) == 0
