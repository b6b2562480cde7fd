"""Compatibility: networks nobody here wrote compile and run, or are refused with a reason.

The fast set: the Model Zoo networks of the ``onnx`` wheel that compile in seconds, small
graphs for each kind of fix (inference no-ops, Sum, folded constants, shape arithmetic, the
alias walk DenseNet's concatenations made endless, FP16 range), and a few torchvision
architectures when torchvision is installed where ``bench/compat_models.py`` finds it. The
whole suite (every zoo network, every torchvision family) is ``-m slow`` and
``python -m bench.bench_compat``.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bench import bench_compat, compat_models  # noqa: E402
from dopt import runtime  # noqa: E402
from dopt.npu.compiler import analyze, compile_onnx  # noqa: E402
from dopt.npu.profile import load_profile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST_ZOO = ["densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
            "squeezenet"]
SLOW_ZOO = ["bvlc_alexnet", "vgg19", "zfnet512"]


@contextmanager
def time_limit(seconds: int):
    """The compiler must never hang: a walk that does not end fails the test."""
    def stop(*_):
        raise TimeoutError(f"no result within {seconds} s")
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _accept(row):
    assert row["status"] in ("ok", "FP16 range (predicted)", "FP16 drift (predicted)"), row
    assert row["cpu_rel_err"] <= bench_compat.CPU_RTOL
    if row["status"] == "FP16 drift (predicted)":   # flagged at compile, the layer named
        assert row["npu_top1_agree"] >= 0.5 and not row["kernels_outside_bound"]
        assert row["fp16_drift"]["predicted"] > bench_compat.FP16_RTOL
    elif row["status"] == "ok":
        assert row["npu_rel_err"] <= bench_compat.FP16_RTOL and row["npu_top1_agree"] == 1.0
    else:  # the emulated NPU overflows, and the pre-check said where before compiling
        assert row["fp16_range"] and not row["npu_finite"]


@pytest.mark.parametrize("name", FAST_ZOO)
def test_model_zoo_network(name):
    model = onnx.load(str(compat_models.zoo_models()[name]))
    with time_limit(240):
        row = bench_compat.check(model, name)
    _accept(row)
    assert row["cpu"] == 0, row["cpu_ops"]          # Sum, Dropout, Constant: all handled


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_ZOO)
def test_model_zoo_network_large(name):
    with time_limit(600):
        row = bench_compat.check(onnx.load(str(compat_models.zoo_models()[name])), name)
    _accept(row)


# -- small graphs, one per fix -----------------------------------------------------------

def _model(nodes, inits, out_shape, opset=17, in_shape=(1, 4, 8, 8), outputs=None):
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8 if opset >= 13 else 6
    return m


def _w(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.3


def _run_both(m, x):
    import onnxruntime as ort
    ref = ort.InferenceSession(m.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    om, report = compile_onnx(m, load_profile(), weight_data_type="FP32")
    got = runtime.Session(om, device="cpu").run({"x": x})["y"]
    return ref, got, report


@pytest.mark.parametrize("opset", [9, 12, 17])
def test_inference_noops_are_removed(opset):
    """Dropout in every opset form (ratio attribute, ratio input, with a mask output) and
    Identity pass their input through; the mask leaves the graph."""
    drop = (helper.make_node("Dropout", ["c"], ["d", "mask"], ratio=0.5) if opset < 12 else
            helper.make_node("Dropout", ["c", "ratio"], ["d", "mask"]))
    inits = {"w": _w(8, 4, 3, 3)}
    if opset >= 12:
        inits["ratio"] = np.array(0.3, np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), drop,
             helper.make_node("Identity", ["d"], ["e"]), helper.make_node("Relu", ["e"], ["y"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL if opset >= 12
                                          else TensorProto.FLOAT, [1, 8, 8, 8])]
    m = _model(nodes, inits, None, opset=opset, outputs=outs)
    x = _w(1, 4, 8, 8, seed=1)
    ref, got, report = _run_both(m, x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    ops = {n["onnx_op"] for n in report["nodes"]}
    assert not ops & {"Dropout", "Identity"} and report["summary"]["cpu"] == 0


def test_dropout_mask_used_by_the_graph_is_a_named_error():
    from dopt.errors import DoptError
    nodes = [helper.make_node("Dropout", ["x"], ["d", "mask"], ratio=0.5),
             helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["d", "mf"], ["y"])]
    m = _model(nodes, {}, [1, 4, 8, 8], opset=9)
    with pytest.raises(DoptError, match="Dropout.*mask.*eval mode"):
        compile_onnx(m, load_profile())


def test_sum_and_constants_are_npu_work():
    """An old exporter's residual ``Sum`` is an Eltwise add; a ``Constant`` node is folded,
    never a CPU fallback."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Constant", [], ["k"],
                              value=numpy_helper.from_array(np.float32(0.5) * np.ones(
                                  (1, 4, 1, 1), np.float32))),
             helper.make_node("Mul", ["x", "k"], ["xs"]),
             helper.make_node("Sum", ["c", "xs", "x"], ["y"])]
    m = _model(nodes, {"w": _w(4, 4, 3, 3)}, [1, 4, 8, 8], opset=9)
    ref, got, report = _run_both(m, _w(1, 4, 8, 8, seed=2))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert report["summary"]["cpu"] == 0
    assert "Sum" not in {n["onnx_op"] for n in report["nodes"]}


def test_shape_arithmetic_folds_and_the_batch_stays_free(tmp_path):
    """``x.view(x.size(0), ...)`` and a channel shuffle: Shape/Gather/Concat fold at compile
    (no CPU partition), and the compiled model still runs N samples at once."""
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8 * 8 * 8, 5)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            n, c, h, w = y.shape
            y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # shuffle
            return self.fc(y.view(y.size(0), -1))

    net = Net().eval()
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (torch.zeros(1, 4, 8, 8),), str(path), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
                      opset_version=17, dynamo=False)
    m = onnx.load(str(path))
    assert {"Shape", "Gather", "Concat"} <= {n.op_type for n in m.graph.node}
    x = _w(3, 4, 8, 8, seed=3)
    ref, got, report = _run_both(m, x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert report["summary"]["cpu"] == 0
    assert not {"Shape", "Gather", "Concat"} & {n["onnx_op"] for n in report["nodes"]}


def test_densenet_style_concats_do_not_hang_the_cost_model():
    """One tensor in several in-place concatenations (DenseNet) made the alias walk loop."""
    nodes, inits, feats = [], {}, ["x"]
    for i in range(6):
        cat = f"cat{i}"
        nodes.append(helper.make_node("Concat", list(feats), [cat], axis=1))
        inits[f"w{i}"] = _w(16, 16 * (i + 1), 1, 1, seed=i)
        nodes.append(helper.make_node("Conv", [cat, f"w{i}"], [f"f{i}"]))
        feats.append(f"f{i}")
    nodes.append(helper.make_node("Concat", feats, ["y"], axis=1))
    m = _model(nodes, inits, [1, 16 * 7, 8, 8], in_shape=(1, 16, 8, 8))
    with time_limit(60):
        om, _ = compile_onnx(m, load_profile())
    est = om.meta["estimate"]
    assert est["estimate"] and est["summary"]["total_ms"] > 0


def _scaled_net(scale: float):
    inits = {"w1": _w(16, 4, 3, 3) * scale, "w2": _w(8, 16, 3, 3) * scale}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["a"], ["b"], name="relu1"),
             helper.make_node("Conv", ["b", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    return _model(nodes, inits, [1, 8, 8, 8])


def test_fp16_overflow_is_flagged_at_compile_with_the_layer(tmp_path):
    path = tmp_path / "big.onnx"
    onnx.save(_scaled_net(300.0), str(path))
    r = subprocess.run([sys.executable, "-m", "dopt", "omg", "--mode", "0", "--framework", "5",
                        "--model", str(path), "--output", str(tmp_path / "big"),
                        "--check_report", str(tmp_path / "report.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "FP16 range" in r.stderr and "conv2 (overflow" in r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    row = next(x for x in report["fp16_range"] if x["node"] == "conv2")
    assert row["kind"] == "overflow" and row["amax"] > 65504
    assert "conv1" not in {x["node"] for x in report["fp16_range"]}
    # the runtime's report names the kernel that first produced inf/NaN
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32))
    r = subprocess.run([sys.executable, "-m", "dopt", "run", "--om", str(tmp_path / "big.om"),
                        "--input", str(x), "--report"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "kernel 'conv2'" in r.stdout and "first produced inf/NaN" in r.stdout


def test_fp16_underflow_is_flagged_and_a_normal_net_is_not():
    _, _, tiny = analyze(_scaled_net(1e-4), load_profile())
    kinds = {x["node"]: x["kind"] for x in tiny["fp16_range"]}
    assert kinds.get("conv2") == "underflow"
    _, _, fine = analyze(_scaled_net(1.0), load_profile())
    assert fine["fp16_range"] == []


# -- torchvision (when installed where compat_models finds it) ---------------------------

def _torchvision():
    try:
        compat_models.torchvision_models_module()
    except ImportError as e:
        pytest.skip(str(e))


def test_torchvision_mobilenet_v2_precheck_has_no_cpu_node(tmp_path):
    _torchvision()
    m, shape = compat_models.export_torchvision("mobilenet_v2", tmp_path / "mbv2.onnx")
    r = subprocess.run([sys.executable, "-m", "dopt", "omg", "--mode", "3", "--framework", "5",
                        "--model", str(tmp_path / "mbv2.onnx"), "--input_shape",
                        "input:" + ",".join(map(str, shape)),
                        "--check_report", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["cpu"] == 0
    assert not any(x["onnx_op"] == "Constant" for x in report["nodes"])


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "squeezenet1_1"])
def test_torchvision_network(name):
    _torchvision()
    m, shape = compat_models.export_torchvision(name)
    with time_limit(600):
        row = bench_compat.check(m, name, shape)
    _accept(row)


@pytest.mark.slow
@pytest.mark.parametrize("name", compat_models.FAMILIES)
def test_torchvision_family(name):
    _torchvision()
    m, shape = compat_models.export_torchvision(name)
    with time_limit(900):
        row = bench_compat.check(m, name, shape)
    assert row["status"] != "crash", row
    if row["status"] != "refused":
        _accept(row)


def test_torchvision_network_through_the_int8_path():
    """dopt_so calibration, dopt omg INT8 and the emulated NPU on a public depthwise network
    (runs a batch as slices): every INT8 kernel bit-exact to the reference interpreter, and
    the outputs close to the QDQ model dopt_so wrote, on ONNX Runtime."""
    _torchvision()
    from bench import bench_compat_int8
    with time_limit(600):
        row = bench_compat_int8.check("mobilenet_v3_small")
    assert row["status"] == "ok", row
    exact, total = map(int, row["int8_kernels_exact"].split("/"))
    assert row["int8_layers"] > 40 and exact == total >= 2 * row["int8_layers"]
    assert row["finite"] and row["rel_err_vs_qdq"] < 0.2 and row["top1_agree_vs_qdq"] == 1.0
