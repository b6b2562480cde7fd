"""``dopt omg --mode 0/1/3`` and the runtime on small real ONNX graphs."""
import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from dopt.errors import DoptError  # noqa: E402
from dopt.npu import omfile  # noqa: E402
from dopt.npu.compiler import compile_onnx  # noqa: E402
from dopt.npu.profile import load_profile  # noqa: E402
from dopt.runtime import Session, fast, load  # noqa: E402
from dopt.runtime.verify import kernel_agreement  # noqa: E402
from tests.cli import dopt, one_paragraph_error as _err  # noqa: E402
from tests.npu_models import int8_net, mixed_placement_model, params_for  # noqa: E402

RANGES = {"c1": (-3, 3), "dw": (0, 4), "c2": (0, 3), "fc": (0, 2)}


def _ort(model, x):
    return ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _fp16_close(got, ref, ops=8):
    """Within the error of ``ops`` FP16 roundings of values of this size."""
    tol = ops * 2.0 ** -11 * np.abs(ref).max()
    assert np.abs(got - ref).max() <= tol, (np.abs(got - ref).max(), tol)


@pytest.fixture
def mixed(tmp_path):
    p = tmp_path / "mixed.onnx"
    onnx.save(mixed_placement_model(), p)
    return p


def test_mode3_reports_the_four_outcomes_and_strict_refuses(mixed, tmp_path):
    rep = tmp_path / "rep.json"
    r = dopt("omg", "--mode", "3", "--framework", "5", "--model", str(mixed),
             "--check_report", str(rep))
    assert r.returncode == 0, r.stderr
    nodes = {x["node"]: x for x in json.loads(rep.read_text())["nodes"]}
    want = {"conv24": ("npu_degraded", "conv_channel_alignment"), "bn": ("fused", "fused_into_conv"),
            "concat": ("npu_degraded", "concat_split_in_place"),
            "einsum": ("cpu", "unsupported_op")}
    for name, (outcome, rule) in want.items():
        assert nodes[name]["outcome"] == outcome
        assert [f["rule"] for f in nodes[name]["findings"]] == [rule]
        assert nodes[name]["findings"][0]["hint"]
    assert {n for n, x in nodes.items() if x["outcome"] == "npu"} == {"relu24", "conv_bn", "conv16"}
    assert nodes["conv24"]["findings"][0]["values"]["padding_waste"] == pytest.approx(0.25)
    assert nodes["concat"]["findings"][0]["values"]["offsets"] == [0, 24, 40]
    assert not (tmp_path / "m.om").exists()
    r = dopt("omg", "--mode", "3", "--framework", "5", "--model", str(mixed), "--strict",
             "--check_report", str(rep))
    _err(r, "einsum", "--strict")
    r = dopt("omg", "--mode", "0", "--framework", "5", "--model", str(mixed), "--strict",
             "--output", str(tmp_path / "m"))
    _err(r, "einsum")
    assert not (tmp_path / "m.om").exists()


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_default_mode_compiles_a_cpu_partition_and_matches_ort(mixed, tmp_path, engine):
    r = dopt("omg", "--mode", "0", "--framework", "5", "--model", str(mixed),
             "--output", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    om = omfile.read_om(tmp_path / "m.om")
    assert [p["device"] for p in om.graph["partitions"]] == ["npu", "cpu"]
    assert om.profile == load_profile().stamp()
    bn_host = next(k for k in om.graph["kernels"] if k["name"] == "conv_bn")
    assert bn_host["fused"] == ["bn"] and not any(k["name"] == "bn" for k in om.graph["kernels"])
    x = np.random.default_rng(3).standard_normal((1, 16, 8, 8)).astype(np.float32)
    y = load(tmp_path / "m.om", engine=engine).run(x)["y"]
    _fp16_close(y, _ort(mixed_placement_model(), x))
    # the NPU really rounds to FP16: the CPU device (FP32 weights) is closer still
    assert not np.array_equal(y, _ort(mixed_placement_model(), x))


def test_int8_kernels_bit_exact_in_both_fast_paths(monkeypatch):
    model = int8_net()
    om, _ = compile_onnx(model, load_profile(), params=params_for(model, RANGES))
    assert [k["op"] for k in om.graph["kernels"]][:3] == ["Quantize", "QuantizedConvolution",
                                                          "Dequantize"]
    x = np.random.default_rng(4).standard_normal((6, 32, 12, 12)).astype(np.float32) * 2
    # float-exact whole layers; float-exact channel chunks summed in int32; integer ONNX ops
    for bound, mode in ((fast.FLOAT_EXACT_BOUND, "whole"), (1 << 20, "chunked"), (0, "int")):
        monkeypatch.setattr(fast, "FLOAT_EXACT_BOUND", bound)
        eng = fast.FastEngine(om)
        assert bool(eng.float_int) == (mode != "int")
        assert bool(eng.chunks) == (mode == "chunked")
        rows = kernel_agreement(om, {"x": x})
        int8 = [r for r in rows if r["precision"] == "int8"]
        assert len(int8) == 12 and all(r["exact"] for r in int8), int8
        assert all(r["within_bound"] for r in rows)
        got = Session(om).run(x)["y"]
        assert np.array_equal(got, Session(om, engine="reference").run(x)["y"])


def test_int8_numerics_match_the_spec_on_one_layer():
    """The runtime's QuantizedFullyConnection equals numerics.int8_linear, bit for bit."""
    from onnx import TensorProto, helper, numpy_helper
    from dopt.quant import numerics as nm
    rng = np.random.default_rng(5)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
                          "fc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 40])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    om, _ = compile_onnx(model, load_profile(), params=params_for(model, {"fc": (-2.5, 3.0)}))
    x = rng.standard_normal((50, 40)).astype(np.float32)
    s, o = nm.activation_qparams(-2.5, 3.0)
    x16 = x.astype(np.float16).astype(np.float32)  # the NPU takes its input in FP16
    want = nm.int8_linear(x16, w, b, s, o, nm.weight_scales(w, 0)).astype(np.float32)
    for engine in ("fast", "reference"):
        assert np.array_equal(Session(om, engine=engine).run(x)["y"], want)


def test_int8_om_is_about_half_the_fp16_om(tmp_path):
    model = int8_net(width=4)  # ~0.6 M weights: metadata no longer dominates
    prof = load_profile()
    om8, _ = compile_onnx(model, prof, params=params_for(model, RANGES))
    om16, _ = compile_onnx(model, prof)
    omfile.write_om(tmp_path / "a.om", om8)
    omfile.write_om(tmp_path / "b.om", om16)
    ratio = (tmp_path / "a.om").stat().st_size / (tmp_path / "b.om").stat().st_size
    assert ratio <= 0.55, ratio
    k16 = next(k for k in om16.graph["kernels"] if k["name"] == "c1")
    k8 = next(k for k in om8.graph["kernels"] if k["name"] == "c1")
    assert [str(om16.tensors[t].dtype) for t in k16["inputs"][1:]] == ["float16", "float16"]
    assert [str(om8.tensors[t].dtype) for t in k8["inputs"][1:]] == ["int8", "int32"]


def test_mismatched_compress_conf_is_refused_naming_both_sides(tmp_path):
    model = int8_net()
    onnx.save(model, tmp_path / "m.onnx")
    doc = params_for(model, RANGES)
    doc["layers"]["ghost"] = dict(doc["layers"]["c1"])
    (tmp_path / "p.json").write_text(json.dumps(doc))
    base = ["omg", "--mode", "0", "--framework", "5", "--model", str(tmp_path / "m.onnx"),
            "--output", str(tmp_path / "o"), "--compress_conf", str(tmp_path / "p.json")]
    _err(dopt(*base), "ghost", "p.json")
    doc = params_for(model, {k: v for k, v in RANGES.items() if k != "c2"})
    doc["float_layers"] = []
    (tmp_path / "p.json").write_text(json.dumps(doc))
    _err(dopt(*base), "c2", "float_layers")
    doc = params_for(model, RANGES)
    doc["layers"]["c1"]["weight"]["tensor"] = "c2.weight"
    (tmp_path / "p.json").write_text(json.dumps(doc))
    _err(dopt(*base), "c1", "c2.weight")
    assert not (tmp_path / "o.om").exists()


@pytest.mark.parametrize("flag,value,needle", [
    ("--input_shape", "x:1,32,12", "3 dims"),
    ("--input_shape", "y:1,32,12,12", "'y'"),
    ("--input_shape", "x1,32", "--input_shape"),
    ("--out_nodes", "nowhere:0", "nowhere"),
    ("--out_nodes", "h3;;", "empty entry"),
])
def test_bad_shape_and_out_nodes_strings(tmp_path, flag, value, needle):
    onnx.save(int8_net(), tmp_path / "m.onnx")
    r = dopt("omg", "--mode", "0", "--framework", "5", "--model", str(tmp_path / "m.onnx"),
             "--output", str(tmp_path / "o"), flag, value)
    _err(r, needle)
    assert not list(tmp_path.glob("o*"))


def test_out_nodes_and_input_shape_cut_and_fix_the_graph(tmp_path):
    onnx.save(int8_net(), tmp_path / "m.onnx")
    r = dopt("omg", "--mode", "0", "--framework", "5", "--model", str(tmp_path / "m.onnx"),
             "--output", str(tmp_path / "o"), "--out_nodes", "c2:0",
             "--input_shape", "x:1,32,12,12")
    assert r.returncode == 0, r.stderr
    om = omfile.read_om(tmp_path / "o.om")
    assert [o["name"] for o in om.graph["outputs"]] == ["h3"]
    assert om.graph["inputs"][0]["shape"] == [1, 32, 12, 12]
    assert om.graph["kernels"][-1]["name"] == "c2"


@pytest.mark.parametrize("opset", [7, 11, 13, 18])
def test_old_and_new_opsets_lower(opset):
    model = int8_net(opset)
    om, _ = compile_onnx(model, load_profile())
    x = np.random.default_rng(6).standard_normal((2, 32, 12, 12)).astype(np.float32)
    _fp16_close(Session(om).run(x)["y"], _ort(int8_net(17), x), ops=16)


def test_mode1_dumps_and_rebuilds(tmp_path):
    model = int8_net()
    om, _ = compile_onnx(model, load_profile(), params=params_for(model, RANGES))
    omfile.write_om(tmp_path / "a.om", om)
    assert dopt("omg", "--mode", "1", "--om", str(tmp_path / "a.om"), "--json",
                str(tmp_path / "a.json")).returncode == 0
    r = dopt("omg", "--mode", "1", "--json", str(tmp_path / "a.json"), "--output",
             str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    back = omfile.read_om(tmp_path / "b.om")
    assert back.graph == om.graph and set(back.tensors) == set(om.tensors)
    assert all(np.array_equal(back.tensors[k], v) for k, v in om.tensors.items())
    onnx.save(model, tmp_path / "m.onnx")
    r = dopt("omg", "--mode", "1", "--framework", "5", "--model", str(tmp_path / "m.onnx"),
             "--json", str(tmp_path / "src.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "src.json").read_text())["graph"]["node"][0]["name"] == "c1"


def test_cpu_device_needs_fp32_weights():
    model = int8_net()
    om16, _ = compile_onnx(model, load_profile())
    with pytest.raises(DoptError, match="weight_data_type FP32"):
        Session(om16, device="cpu")
    om32, _ = compile_onnx(model, load_profile(), weight_data_type="FP32")
    x = np.random.default_rng(7).standard_normal((2, 32, 12, 12)).astype(np.float32)
    ref = _ort(model, x)
    np.testing.assert_allclose(Session(om32, device="cpu").run(x)["y"], ref, rtol=1e-5,
                               atol=1e-5)


def test_dopt_run_cli(tmp_path):
    model = int8_net()
    om, _ = compile_onnx(model, load_profile(), params=params_for(model, RANGES))
    omfile.write_om(tmp_path / "a.om", om)
    x = np.random.default_rng(8).standard_normal((3, 32, 12, 12)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = dopt("run", "--om", str(tmp_path / "a.om"), "--input", str(tmp_path / "x.npy"),
             "--output", str(tmp_path / "y.npz"), "--verify")
    assert r.returncode == 0, r.stderr
    assert "12/12 INT8 bit-exact" in r.stdout
    y = np.load(tmp_path / "y.npz")["y"]
    assert np.array_equal(y, Session(om).run(x)["y"])
    r = dopt("run", "--om", str(tmp_path / "a.om"), "--input", str(tmp_path / "x.npy"),
             "--output", str(tmp_path / "y1.npz"), "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(tmp_path / "y1.npz")["y"], y)
    _err(dopt("run", "--om", str(tmp_path / "a.om"), "--threads", "-2"), "threads", ">= 0")
    _err(dopt("run", "--om", str(tmp_path / "a.om"), "--input", str(tmp_path / "nope.npy")),
         "nope.npy")
    np.save(tmp_path / "bad.npy", x[:, :3])
    _err(dopt("run", "--om", str(tmp_path / "a.om"), "--input", str(tmp_path / "bad.npy")),
         "'x'", "32, 12, 12")


@pytest.mark.parametrize("mutate,needle", [
    (lambda g: g["kernels"][1]["inputs"].__setitem__(0, "ghost"), "ghost"),
    (lambda g: g["kernels"][0].pop("device"), "device"),
    (lambda g: g["kernels"][0].__setitem__("device", "gpu"), "unknown device"),
    (lambda g: g["outputs"].__setitem__(0, {"name": "nowhere"}), "graph.outputs[0]"),
    (lambda g: g["kernels"][1]["attrs"].__setitem__("group", {"kind": "code", "value": 1}),
     "group"),
    (lambda g: g.__setitem__("kernels", "x"), "graph.kernels"),
])
def test_well_signed_om_with_a_bad_graph_is_refused(tmp_path, mutate, needle):
    """A checksum-valid file whose graph was not written by the compiler: clear error."""
    import copy
    model = int8_net()
    om, _ = compile_onnx(model, load_profile(), params=params_for(model, RANGES))
    bad = omfile.OmModel(copy.deepcopy(om.graph), om.tensors, om.profile, om.quant, om.meta)
    mutate(bad.graph)
    omfile.write_om(tmp_path / "bad.om", bad)
    with pytest.raises(DoptError, match="corrupt") as e:
        load(tmp_path / "bad.om")
    assert needle in str(e.value) and "bad.om" in str(e.value)
    _err(dopt("run", "--om", str(tmp_path / "bad.om")), "bad.om")


@pytest.mark.parametrize("build", ["int8", "fp16", "mixed"])
def test_rounding_plan_is_bit_identical_to_rounding_every_op(build):
    """The fast engine skips provably redundant FP16 casts; with the same ORT kernels
    (optimizations off) the result equals rounding after every op."""
    model = mixed_placement_model() if build == "mixed" else int8_net()
    params = params_for(model, RANGES) if build == "int8" else None
    om, _ = compile_onnx(model, load_profile(), params=params)
    shape = [3] + om.graph["inputs"][0]["shape"][1:]
    x = np.random.default_rng(9).standard_normal(shape).astype(np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    outs = []
    for debug in (False, True):
        b = fast._GraphBuilder(om, True)
        m = b.build(debug=debug)
        assert bool(b.no_round) != debug
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs.append(s.run([om.graph["outputs"][0]["name"]], {"x": x})[0])
    assert np.array_equal(*outs)


def test_constant_shared_by_npu_and_cpu_kernels_keeps_each_devices_dtype():
    from onnx import TensorProto, helper, numpy_helper
    g = np.linspace(0.5, 1.5, 8).astype(np.float32) + np.float32(1e-4)  # not FP16-exact
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "g"], ["m"], name="mul"),
         helper.make_node("Einsum", ["x", "g"], ["e"], name="einsum", equation="abc,c->abc")],
        "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8])],
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(g, "g")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    om, _ = compile_onnx(model, load_profile())
    kern = {k["name"]: k for k in om.graph["kernels"]}
    assert kern["mul"]["device"] == "npu" and kern["einsum"]["device"] == "cpu"
    assert om.tensors[kern["mul"]["inputs"][1]].dtype == np.float16
    assert om.tensors[kern["einsum"]["inputs"][1]].dtype == np.float32
    x = np.random.default_rng(10).standard_normal((1, 2, 8)).astype(np.float32)
    out = Session(om).run(x)
    np.testing.assert_allclose(out["e"], x * g, rtol=1e-6)  # FP32 input, FP32 constant


@pytest.mark.parametrize("text,needle", [("DetectionOutput SSDDetectionOutput\n", "line 1"),
                                         ("Einsum:NoSuchOp\n", "NoSuchOp")])
def test_bad_op_name_map(tmp_path, text, needle):
    onnx.save(mixed_placement_model(), tmp_path / "m.onnx")
    (tmp_path / "map.txt").write_text(text)
    r = dopt("omg", "--mode", "0", "--framework", "5", "--model", str(tmp_path / "m.onnx"),
             "--output", str(tmp_path / "o"), "--op_name_map", str(tmp_path / "map.txt"))
    _err(r, needle, "map.txt")
    assert not (tmp_path / "o.om").exists()


def test_bad_json_dump_is_refused(tmp_path):
    (tmp_path / "d.json").write_text("{not json")
    _err(dopt("omg", "--mode", "1", "--json", str(tmp_path / "d.json"), "--output",
              str(tmp_path / "o")), "d.json")
    (tmp_path / "d.json").write_text('{"format": "other"}')
    _err(dopt("omg", "--mode", "1", "--json", str(tmp_path / "d.json"), "--output",
              str(tmp_path / "o")), "dopt.om.json")
    assert not (tmp_path / "o.om").exists()
