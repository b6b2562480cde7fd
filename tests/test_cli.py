"""The ``dopt`` command line: exit codes and one-paragraph errors."""
import json

import pytest

from tests.cli import ROOT, dopt, one_paragraph_error as _one_paragraph_error

NET = f"{ROOT / 'tests' / 'tiny_net.py'}:build"


def test_cli_config_and_final(tmp_path):
    pytest.importorskip("torch")
    import torch
    r = dopt("torch-config", "--model", NET, "--input_shape", "x:1,3,16,16", "--output",
             str(tmp_path / "c.json"))
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "c.json").read_text())
    cfg["layer_strategy"]["conv1"]["quant_strategy"] = "Quant_INT8-8"
    (tmp_path / "q.json").write_text(json.dumps(cfg))
    from dopt.dopt_torch.opt_main import optimize_model, set_calibrate_state
    from tests.tiny_net import build
    q = optimize_model(build(), str(tmp_path / "q.json"))
    set_calibrate_state(q, True)
    with torch.no_grad():
        q(torch.randn(8, 3, 16, 16))
    set_calibrate_state(q, False)
    torch.save(q.state_dict(), tmp_path / "quant.pth")
    r = dopt("torch-final", "--model", NET, "--config", str(tmp_path / "q.json"), "--weight",
             str(tmp_path / "quant.pth"), "--output_dir", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    r = dopt("check-params", str(tmp_path / "out" / "quant_param.json"), "--model",
             str(tmp_path / "out" / "model_fused.onnx"))
    assert r.returncode == 0 and '"valid": true' in r.stdout


def test_cli_bad_inputs(tmp_path):
    pytest.importorskip("torch")
    _one_paragraph_error(dopt("torch-config", "--model", NET, "--input_shape", "x:1,3,a",
                              "--output", str(tmp_path / "c.json")), "input_shape")
    assert not (tmp_path / "c.json").exists()
    _one_paragraph_error(dopt("torch-config", "--model", "nope.py:Net", "--input_shape",
                              "x:1,3,8,8"), "nope.py")
    bad = tmp_path / "quant.pth"
    bad.write_bytes(b"garbage")
    r = dopt("torch-config", "--model", NET, "--input_shape", "x:1,3,16,16", "--output",
             str(tmp_path / "c.json"))
    assert r.returncode == 0
    _one_paragraph_error(dopt("torch-final", "--model", NET, "--config", str(tmp_path / "c.json"),
                              "--weight", str(bad), "--output_dir", str(tmp_path / "out")),
                         str(bad))
    assert not (tmp_path / "out").exists()
    _one_paragraph_error(dopt("check-params", str(tmp_path / "c.json")), "not a dopt quantization")


def test_cli_unwritable_output_dir(tmp_path):
    pytest.importorskip("torch")
    _one_paragraph_error(dopt("torch-config", "--model", NET, "--input_shape", "x:1,3,16,16",
                              "--output", str(tmp_path / "no" / "such" / "c.json")),
                         "output directory does not exist")
