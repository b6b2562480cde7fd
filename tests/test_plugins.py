"""The extension path: entry points, a separately installed plugin, broken plugins, no framework."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "dopt-aciq"
sys.path.insert(0, str(PLUGIN))
from dopt_aciq.observer import ACIQObserver, optimal_clip  # noqa: E402


def run_py(code, env_extra=None, cwd=None):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=300)


def test_aciq_state_merges_exactly():
    rng = np.random.default_rng(0)
    a, b = rng.laplace(0, 1, 5000), rng.laplace(2, 40, 5000)
    one = ACIQObserver()
    one.update(a)
    one.update(b)
    x, y = ACIQObserver(), ACIQObserver()
    x.update(a)
    y.update(b)
    x.merge(json.loads(json.dumps(y.state())))  # JSON-able, as ranks exchange it
    sx, so = x.state(), one.state()
    assert {k: sx[k] for k in ("n", "n_pos", "n_neg", "lo", "hi")} == \
        {k: so[k] for k in ("n", "n_pos", "n_neg", "lo", "hi")}
    for k in ("sum", "sum_abs", "sum_sq"):
        assert sx[k] == pytest.approx(so[k], rel=1e-12)
    assert x.range() == pytest.approx(one.range(), rel=1e-9)
    assert len(sx) == 8 and sx["n"] == 10000  # memory independent of samples


def test_aciq_optimal_clipping_matches_the_paper():
    # Banner et al. 2019, 8 bits: alpha* = 9.89 b (Laplace), 3.92 sigma (Gaussian)
    assert optimal_clip("laplace") == pytest.approx(9.89, abs=0.01)
    assert optimal_clip("gauss") == pytest.approx(3.92, abs=0.01)
    assert optimal_clip("laplace", levels=16) == pytest.approx(5.03, abs=0.01)  # 2**4 levels
    with pytest.raises(ValueError, match="distribution"):
        ACIQObserver("cauchy")


def test_aciq_clips_outliers():
    rng = np.random.default_rng(1)
    x = rng.laplace(0, 1, 200000)
    x[:3] = [500.0, -400.0, 300.0]
    o = ACIQObserver()
    o.update(x)
    lo, hi = o.range()
    assert -11 < lo < -9 and 9 < hi < 11
    g = ACIQObserver("gauss")
    g.update(rng.normal(0, 1, 200000))
    assert g.range() == pytest.approx((-3.92, 3.92), abs=0.1)
    relu = ACIQObserver()
    relu.update(np.maximum(rng.laplace(0, 1, 200000), 0))  # one-sided: fit the tail only
    lo, hi = relu.range()
    assert lo == 0.0 and 10 < hi < 12.5
    empty = ACIQObserver()
    empty.update(np.zeros(0))
    assert empty.empty


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """Install plugins/dopt-aciq as its own distribution into a private folder."""
    target = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-build-isolation", "--no-index", "--target", str(target),
                        str(PLUGIN)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (target / "dopt_aciq").is_dir()
    return target


def test_installed_plugin_is_discovered(installed_plugin):
    code = ("from dopt import plugin_manager as pm; print(sorted(pm.range_algorithms())); "
            "m = pm.get_plugin_manager(); m.check_pending(); print('BROKEN', m.broken); "
            "print('ACIQ', m.get_plugin('aciq') is not None)")
    r = run_py(code, {"PYTHONPATH": str(installed_plugin)}, cwd=installed_plugin)
    assert r.returncode == 0, r.stderr
    assert "'aciq'" in r.stdout and "'aciq_gauss'" in r.stdout and "'minmax'" in r.stdout
    # it passed the registration check (hook names against dopt/hookspecs.py)
    assert "BROKEN {}" in r.stdout and "ACIQ True" in r.stdout
    r = run_py(code)  # without it: not there, while the core's own algorithms are
    assert "aciq" not in r.stdout
    for name in ("minmax", "ema_minmax", "percentile", "entropy", "mse"):
        assert f"'{name}'" in r.stdout


def test_installed_plugin_calibrates_through_config(installed_plugin, tmp_path):
    pytest.importorskip("torch")
    code = f"""
import json, torch
from dopt.dopt_torch.opt_main import generate_config_file, optimize_model, set_calibrate_state
from tests.tiny_net import WIDE_SHAPE, build_wide as build
generate_config_file(build(), WIDE_SHAPE, dst_path="{tmp_path}/g.json")
res = {{}}
for alg in ("minmax", "aciq"):
    cfg = json.load(open("{tmp_path}/g.json"))
    cfg["dopt_options"] = {{"activation_range": alg}}
    cfg["layer_strategy"]["conv1"]["quant_strategy"] = "Quant_INT8-8"
    json.dump(cfg, open("{tmp_path}/c.json", "w"))
    q = optimize_model(build(), "{tmp_path}/c.json")
    set_calibrate_state(q, True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 20, 16, 16, generator=g)
    x[0, 0, 0, 0] = 80.0   # one outlier
    with torch.no_grad():
        q(x)
    set_calibrate_state(q, False)
    res[alg] = [q.conv1.act.lo.item(), q.conv1.act.hi.item(), q.conv1.act.algorithm]
print(json.dumps(res))
"""
    r = run_py(code, {"PYTHONPATH": f"{installed_plugin}{os.pathsep}{ROOT}"})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["minmax"][1] == 80.0
    assert res["aciq"][2] == "aciq" and res["aciq"][1] < 10.0


def test_unknown_algorithm_names_the_plugin_gap(tmp_path):
    pytest.importorskip("torch")
    from dopt import DoptError
    from dopt.dopt_torch.opt_main import generate_config_file, optimize_model
    from tests.tiny_net import build
    generate_config_file(build(), "x:1,3,16,16", dst_path=str(tmp_path / "g.json"))
    cfg = json.loads((tmp_path / "g.json").read_text())
    cfg["layer_strategy"]["fc"].update(quant_strategy="Quant_INT8-8", activation_range="nope")
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    with pytest.raises(DoptError, match="unknown activation range algorithm 'nope'"):
        optimize_model(build(), str(tmp_path / "c.json"))


def test_broken_plugin_does_not_break_dopt(tmp_path):
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dopt]\nbroken = no_such_module_for_dopt\n")
    r = subprocess.run([sys.executable, "-W", "ignore", "-m", "dopt", "adapters"],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert "broken plugin broken: ModuleNotFoundError" in r.stdout
    assert "minmax" in r.stdout


def test_import_dopt_without_any_framework():
    code = """
import sys
for m in ("torch", "tensorflow", "onnx", "onnxruntime", "keras"):
    sys.modules[m] = None   # make every framework import fail
import dopt, dopt.formats.strategy_config, dopt.formats.param_file, dopt.quant.numerics
import dopt.plugin_manager, dopt.cli
from dopt.dopt_torch.opt_main import generate_config_file, optimize_model
try:
    dopt.generate_config_file(object(), "x:1,3,8,8")
except dopt.DoptError as e:
    print("ERR", e)
assert not any(sys.modules.get(m) for m in ("torch", "tensorflow", "onnx"))
print("OK")
"""
    r = run_py(code)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout and "no installed dopt adapter handles this model" in r.stdout


def test_missing_adapter_says_which_extra():
    pytest.importorskip("torch")
    code = """
import torch, dopt
try:
    dopt.optimize_model(torch.nn.Linear(2, 2), "c.json")
except dopt.DoptError as e:
    print(e)
"""
    r = run_py(code, {"DOPT_DISABLE_PLUGINS": "torch"})
    assert "pip install 'dopt[torch]'" in r.stdout, r.stdout + r.stderr
    r = run_py(code.replace("dopt.optimize_model(", "from dopt.dopt_torch.opt_main import "
                            "optimize_model; optimize_model("), {"DOPT_DISABLE_PLUGINS": "torch"})
    assert "the dopt 'torch' adapter is not installed" in r.stdout, r.stdout + r.stderr
