"""``dopt deploy``: deploy.yaml validation, the pipeline on a small ONNX net (pass, a
tightened gate that fails, mixed precision), the search's budget and resume, reports."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from dopt.calib.sets import write_bin610  # noqa: E402
from dopt.deploy import mixed  # noqa: E402
from dopt.deploy.cli import deploy_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def small_net(path: Path, seed: int = 0, outlier: float = 0.0) -> None:
    """conv(1->32) relu, conv(32->32) relu, conv(32->32) relu, mean, Gemm(32->10): three
    layers INT8 (the first stays float: Cin <= 16), input 'x' 1x8x8, batch free.
    ``outlier``: one channel of conv1's output offset by that much, the classic INT8
    failure (a per-tensor input range that one channel dominates)."""
    rng = np.random.default_rng(seed)
    b1 = np.zeros(32, np.float32)
    b1[0] = outlier

    def w(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale / np.sqrt(np.prod(shape[1:]))).astype(
            np.float32)
    inits = [numpy_helper.from_array(w(32, 1, 3, 3, scale=2), "c1.w"),
             numpy_helper.from_array(b1, "c1.b"),
             numpy_helper.from_array(w(32, 32, 3, 3, scale=2), "c2.w"),
             numpy_helper.from_array(rng.uniform(-.1, .1, 32).astype(np.float32), "c2.b"),
             numpy_helper.from_array(w(32, 32, 3, 3, scale=2), "c3.w"),
             numpy_helper.from_array(w(10, 32, scale=3), "fc.w"),
             numpy_helper.from_array(np.zeros(10, np.float32), "fc.b")]
    nodes = [helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["y1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["y1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["y2"], name="conv2", pads=[1] * 4),
             helper.make_node("Relu", ["y2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "c3.w"], ["y3"], name="conv3", pads=[1] * 4),
             helper.make_node("Relu", ["y3"], ["r3"], name="relu3"),
             helper.make_node("GlobalAveragePool", ["r3"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "small", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 1, 8, 8])], [helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    # centre the logits on the input distribution, so that every class is predicted and
    # some samples sit near a decision boundary (as in a trained classifier)
    from dopt.formats.qdq import ort_session
    x = rng.standard_normal((512, 1, 8, 8)).astype(np.float32)
    logits = ort_session(m.SerializeToString()).run(None, {"x": x})[0]
    fc_b = next(i for i in m.graph.initializer if i.name == "fc.b")
    fc_b.CopyFrom(numpy_helper.from_array((-logits.mean(0)).astype(np.float32), "fc.b"))
    onnx.save(m, str(path))


CONFIG = """strategy: "Quant_INT8-8"
device: USE_CPU
preprocess_parameter:
{
    input_type: BINARY
    input_file_path: "calib.bin"
}
"""


def make_project(d: Path, *, gates: str = "", extra: str = "", n_eval: int = 300,
                 outlier: float = 0.0) -> Path:
    """model.onnx, calib.bin + config.prototxt, test.bin + labels (the float model's own
    top-1: the metric is agreement with float), deploy.yaml."""
    from dopt.formats.qdq import ort_session
    d.mkdir(parents=True, exist_ok=True)
    small_net(d / "model.onnx", outlier=outlier)
    rng = np.random.default_rng(1)
    write_bin610(d / "calib.bin", rng.standard_normal((64, 1, 8, 8)).astype(np.float32))
    (d / "config.prototxt").write_text(CONFIG)
    x = rng.standard_normal((n_eval, 1, 8, 8)).astype(np.float32)
    write_bin610(d / "test.bin", x)
    y = ort_session(str(d / "model.onnx")).run(None, {"x": x})[0].argmax(1)
    (d / "labels.txt").write_text("\n".join(map(str, y)) + "\n")
    (d / "deploy.yaml").write_text(f"""model: model.onnx
input_shape: "x:1,1,8,8"
calibration: config.prototxt
evaluation:
  binary: test.bin
  labels: labels.txt
output: out
{extra}gates:
{gates or '  size: {max_mb: 10}'}
""")
    return d / "deploy.yaml"


# --- deploy.yaml: every mistake is one paragraph, exit 2, nothing written ------------

@pytest.mark.parametrize("edit,needle", [
    (lambda t: t + "colour: blue\n", "unknown key 'colour'"),
    (lambda t: t.replace("calibration: config.prototxt", "calibration: nope.prototxt"),
     "does not exist"),
    (lambda t: t.replace("  size: {max_mb: 10}", "  size: {max_mb: big}"), "must be a number"),
    (lambda t: t.replace("  size: {max_mb: 10}", "  regression: {latency_tolerance: 0.1}"),
     "needs the report of an earlier run"),
    (lambda t: t.replace("  size: {max_mb: 10}", "  regression: {baseline: old/report.json}"),
     "baseline report does not exist"),
    (lambda t: t.replace("  labels: labels.txt\n", ""), "needs its labels"),
    (lambda t: t.replace('"x:1,1,8,8"', "[1, 2]"), "must be a non-empty string"),
    (lambda t: t + "mixed_precision: {ranking: magic}\n", "unknown ranking"),
])
def test_bad_deploy_yaml(tmp_path, capsys, edit, needle):
    cfg = make_project(tmp_path)
    cfg.write_text(edit(cfg.read_text()))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert deploy_main(["-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "deploy.yaml" in err
    assert len(err.strip().splitlines()) == 1          # one paragraph
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before   # nothing written


def test_bad_yaml_names_the_line(tmp_path, capsys):
    cfg = make_project(tmp_path)
    cfg.write_text(cfg.read_text().replace("output: out\n", "output: out\noutptu: x\n"))
    assert deploy_main(["-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "outptu (line 8)" in err


def test_bad_calibration_data_is_exit_2_and_nothing_written(tmp_path, capsys):
    cfg = make_project(tmp_path)
    (tmp_path / "calib.bin").write_bytes(b"\x00" * 7)
    assert deploy_main(["-c", str(cfg)]) == 2
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dopt-")]


# --- the pipeline ---------------------------------------------------------------------

GATES = """  accuracy: {max_drop: 5.0}
  agreement: {min: 90}
  latency: {max_ms: 100, fp16_max_ms: 100}
  size: {max_mb: 5}
  memory: {max_mb: 50}
  placement: {max_cpu_nodes: 0}
"""


@pytest.fixture(scope="module")
def passed(tmp_path_factory):
    d = tmp_path_factory.mktemp("deploy_pass")
    cfg = make_project(d, gates=GATES)
    rc = deploy_main(["-c", str(cfg)])
    return d, rc


def test_deploy_passes_and_writes_everything(passed):
    d, rc = passed
    assert rc == 0
    out = d / "out"
    for f in ("build/model.om", "build/model_fp16.om", "build/quant_param.json",
              "build/report.json", "report.html", "junit.xml", "work/model_qdq.onnx"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "build/report.json").read_text())
    assert rep["status"] == "passed"
    r = rep["results"]
    assert r["float"]["metric"] == 100.0        # labels are the float model's own top-1
    assert 90 <= r["deployed"]["metric"] <= 100
    assert r["agreement"] is not None and r["agreement"] >= 90
    assert r["latency_ms"]["deployed"] > 0 and r["latency_ms"]["fp16"] > 0
    assert rep["quantization"]["int8_layers"] == ["conv2", "conv3", "fc"]
    # INT8 only where the estimate says it pays (here every layer is faster in INT8)
    lat = rep["per_layer_latency"]
    assert rep["quantization"]["fp16_where_int8_is_slower"] == [
        x["layer"] for x in lat if x["int8_ms"] > x["fp16_ms"]] == []
    assert all(x["int8_ms"] < x["fp16_ms"] for x in lat if x["in_build"] == "int8")
    assert {g["gate"] for g in rep["gates"]} == {
        "accuracy.max_drop", "agreement.min", "latency.max_ms", "latency.fp16_max_ms",
        "size.max_mb", "memory.max_mb", "placement.max_cpu_nodes"}
    assert rep["signing"]["signed"] is False
    # the deployed build runs in the emulated runtime and matches the recorded metric
    from dopt import runtime
    from dopt.calib.sets import open_calibration
    from dopt.calib.prototxt import Preprocess
    r_ = open_calibration(Preprocess("t", "BINARY", path=d / "test.bin"), input_name="x",
                          input_shape=(1, 1, 8, 8))
    x = np.concatenate(list(r_.batches(300)))
    y = np.array([int(v) for v in (d / "labels.txt").read_text().split()])
    top = runtime.load(str(out / "build/model.om")).predict(x).argmax(1)
    assert abs((top == y).mean() * 100 - r["deployed"]["metric"]) < 1e-9


def test_junit_and_html(passed):
    d, _ = passed
    root = ET.parse(d / "out/junit.xml").getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == 7 and not root.findall(".//failure")
    html = (d / "out/report.html").read_text()
    assert "data:image/png;base64," in html and "<script" not in html
    assert "float &rarr; simulated &rarr; deployed" in html


def test_tightened_gate_fails_with_exit_1(tmp_path, capsys):
    cfg = make_project(tmp_path, gates="  latency: {max_ms: 0.000001}\n  size: {max_mb: 5}\n")
    assert deploy_main(["-c", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "latency.max_ms" in err
    rep = json.loads((tmp_path / "out/build/report.json").read_text())
    assert rep["status"] == "failed"
    bad = [g for g in rep["gates"] if not g["passed"]]
    assert [g["gate"] for g in bad] == ["latency.max_ms"]
    root = ET.parse(tmp_path / "out/junit.xml").getroot()
    fails = [c.get("name") for c in root.findall(".//testcase") if c.find("failure") is not None]
    assert fails == ["latency.max_ms"]
    # a regression gate against that run's report: accuracy/size equal, latency equal -> pass
    base = tmp_path / "base.json"
    base.write_text((tmp_path / "out/build/report.json").read_text())
    cfg.write_text(cfg.read_text().replace(
        "  latency: {max_ms: 0.000001}\n",
        f"  regression: {{baseline: {base}, latency_tolerance: 0.01}}\n"))
    assert deploy_main(["-c", str(cfg), "--output", str(tmp_path / "out2")]) == 0
    rep2 = json.loads((tmp_path / "out2/build/report.json").read_text())
    assert {g["gate"] for g in rep2["gates"]} >= {"regression.accuracy", "regression.latency",
                                                  "regression.size"}


def test_mixed_precision_keeps_layers_fp16_to_meet_max_drop(tmp_path):
    """All INT8 loses more than max_drop (0.5 points of agreement with float): the search
    keeps layers FP16 (as float_layers in the parameter file) until the build meets it."""
    from dopt.deploy import run
    cfg = make_project(tmp_path, gates="  accuracy: {max_drop: 0.5}\n", n_eval=600,
                       extra="mixed_precision: {max_evaluations: 6}\n")
    rep = run(cfg, log=lambda s: None)
    r = rep["results"]
    assert r["simulated_all_int8"]["drop"] > 0.5, "the test needs INT8 to lose accuracy"
    assert rep["status"] == "passed" and r["deployed"]["drop"] <= 0.5
    mp = rep["mixed_precision"]
    assert mp is not None and mp["full_evaluations"] <= 6
    fp16 = rep["quantization"]["fp16_layers"]
    assert fp16 and set(fp16) <= {"conv2", "conv3", "fc"}
    params = json.loads((tmp_path / "out/build/quant_param.json").read_text())
    assert set(fp16) <= set(params["float_layers"])
    assert not set(fp16) & set(params["layers"])
    assert [c["layer"] for c in mp["chosen"]] == fp16
    assert r["simulated"]["drop"] <= r["simulated_all_int8"]["drop"]
    assert rep["sensitivity"]["table"][0]["rank"] == 1


# --- the search itself ----------------------------------------------------------------

def _ranking(n):
    return mixed.rank([f"l{i}" for i in range(n)], {f"l{i}": float(n - i) for i in range(n)},
                      {f"l{i}": 1.0 for i in range(n)})


def test_search_is_logarithmic_and_minimal(tmp_path):
    # metric rises with the number of float layers; the shortest passing prefix is 37
    calls = []

    def evaluate(fs):
        calls.append(len(fs))
        return 90.0 + min(len(fs), 40) * 0.25

    st = mixed.State(tmp_path / "s.json", "fp")
    res = mixed.search(_ranking(64), evaluate, float_metric=100.0, max_drop=0.75,
                       max_evaluations=20, state=st, log=lambda s: None)
    assert res.passed and len(res.float_layers) == 37
    assert res.float_layers == [f"l{i}" for i in range(37)]
    assert len(calls) <= 7                     # log2(64) + the all-INT8 evaluation


def test_search_budget_keeps_best_so_far_and_resumes(tmp_path):
    def evaluate(fs):
        return 90.0 + min(len(fs), 40) * 0.25

    path = tmp_path / "s.json"
    r1 = mixed.search(_ranking(64), evaluate, float_metric=100.0, max_drop=0.75,
                      max_evaluations=3, state=mixed.State(path, "fp"), log=lambda s: None)
    assert r1.budget_exhausted and r1.evaluations == 3
    assert r1.passed and len(r1.float_layers) == 48       # the best passing prefix seen
    # resumed: the three evaluations are reused, the search finishes at the minimum
    r2 = mixed.search(_ranking(64), evaluate, float_metric=100.0, max_drop=0.75,
                      max_evaluations=20, state=mixed.State(path, "fp"), log=lambda s: None)
    assert r2.cached >= 1 and len(r2.float_layers) == 37
    assert r1.evaluations + r2.evaluations <= 8
    # another problem (fingerprint) does not reuse them
    r3 = mixed.search(_ranking(64), evaluate, float_metric=100.0, max_drop=0.75,
                      max_evaluations=20, state=mixed.State(path, "other"), log=lambda s: None)
    assert r3.cached == 0


def test_ranking_is_gain_per_ms():
    r = mixed.rank(["a", "b", "c"], {"a": 4.0, "b": 3.0, "c": 1.0}, {"a": 4.0, "b": 1.0,
                                                                    "c": 0.0})
    assert [x["layer"] for x in r] == ["c", "b", "a"]    # c: free to keep FP16


def test_repair_spends_no_more_than_the_trim_saved():
    # layers kept FP16 to restore accuracy must not cost what the FP16 trim saved
    r = mixed.rank(["a", "b", "c", "d"], {"a": 8.0, "b": 3.0, "c": 2.0, "d": 1.0},
                   {"a": 0.0, "b": 0.3, "c": 0.4, "d": 0.1})
    assert [x["layer"] for x in r] == ["a", "b", "d", "c"]
    assert [x["layer"] for x in mixed.affordable(r, 0.45)] == ["a", "b", "d"]
    assert [x["layer"] for x in mixed.affordable(r, 0.4)] == ["a", "b"]    # 0.4 is not below
    assert mixed.affordable(r, 0.0) == []


def test_sensitivity_command(tmp_path, capsys):
    from dopt.deploy.cli import sensitivity_main
    cfg = make_project(tmp_path, n_eval=120)
    assert sensitivity_main(["-c", str(cfg), "--output", str(tmp_path / "sens"), "--full"]) == 0
    doc = json.loads((tmp_path / "sens/sensitivity.json").read_text())
    rows = doc["layers"]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert {r["layer"] for r in rows} == {"conv2", "conv3", "fc"}
    for r in rows:
        assert np.isfinite(r["sqnr_only_int8_db"]) and np.isfinite(r["sqnr_only_float_db"])
        assert 0 <= r["metric_only_int8"] <= 100 and 0 <= r["metric_only_float"] <= 100
        assert r["fp16_extra_ms"] >= 0
    noise = [r["noise_only_int8"] for r in rows]
    assert noise == sorted(noise, reverse=True)
    assert (tmp_path / "sens/sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 1 | " in (tmp_path / "sens/sensitivity.md").read_text()


@pytest.mark.slow
def test_demo_script(tmp_path):
    """demos/deploy/run_demo.sh: a passing signed run, a tampered copy refused, a tightened
    gate failing with exit 1 (about 3 minutes: the 10k test set, several times)."""
    import subprocess
    r = subprocess.run(["bash", str(ROOT / "demos/deploy/run_demo.sh")], capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "size.max_mb" in r.stdout + r.stderr
    rep = json.loads((ROOT / "demos/deploy/out/build/report.json").read_text())
    assert rep["status"] == "passed" and rep["signing"]["signed"]
    assert json.loads((ROOT / "demos/deploy/out_tight/build/report.json").read_text())[
        "status"] == "failed"
