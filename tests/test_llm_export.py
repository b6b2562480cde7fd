"""ONNX export of causal LMs: dynamic shapes, tied embeddings, fake-quant Linears, and a file
that appears only when ONNX Runtime reproduces the PyTorch logits."""
import subprocess
import sys

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import torch.nn.functional as F  # noqa: E402

from dopt.errors import DoptError  # noqa: E402
from dopt_adapters.llm import export_onnx  # noqa: E402
from dopt_adapters.llm.export_onnx import export_causal_lm  # noqa: E402

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def llama(cls=None):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**SIZES, tie_word_embeddings=True)
    return (cls or transformers.LlamaForCausalLM)(cfg).eval()


def qwen2(**extra):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(**SIZES, tie_word_embeddings=False, **extra)
    return transformers.Qwen2ForCausalLM(cfg).eval()


class FakeQuantLinear(torch.nn.Module):
    """What a quantizer swaps in: cached dequantized weight, int16 fake-quant activations."""

    def __init__(self, lin: torch.nn.Linear):
        super().__init__()
        w = lin.weight.detach()
        ws = w.abs().amax(1, keepdim=True) / 7
        self.register_buffer("w_deq", torch.clamp(torch.round(w / ws), -8, 7) * ws)
        self.register_buffer("s", torch.tensor(1 / 4096))
        self.bias = lin.bias

    def forward(self, x):
        x_q = torch.clamp(torch.round(x / self.s), -32768, 32767) * self.s
        return F.linear(x_q, self.w_deq, self.bias)


class DriftingLlama(transformers.LlamaForCausalLM):
    """Traces like Llama but answers differently afterwards: the check must catch it."""
    drift = 1.0

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if not torch.jit.is_tracing():
            out.logits = out.logits + self.drift
        return out


class DiffNorm(torch.nn.Module):
    """Uses ``torch.diff``, which the TorchScript exporter cannot export."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x) + 0 * torch.diff(x, dim=-1, prepend=x[..., :1])


def _ops(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _assert_close(r, seq_lens):
    assert r["seq_lens_checked"] == seq_lens
    assert r["max_abs_diff"] <= r["atol"]
    assert r["max_rel_diff"] < 1e-5  # float32 reordering only: ~1e-7 measured
    assert r["argmax_agreement"] == 1.0


@pytest.mark.parametrize("build", [llama, qwen2], ids=["llama-tied", "qwen2"])
def test_export_matches_torch_at_two_lengths(tmp_path, build):
    model = build()
    impl = model.config._attn_implementation
    dest = tmp_path / "lm.onnx"
    r = export_causal_lm(model, dest, seq_len=12)
    _assert_close(r, [12, 6])
    assert dest.is_file() and r["bytes"] == dest.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.onnx"]  # no temporaries left
    assert model.config._attn_implementation == impl  # eager only while tracing
    g = onnx.load(str(dest)).graph
    assert [d.dim_param for d in g.input[0].type.tensor_type.shape.dim] == ["batch", "seq"]
    assert [d.dim_param or d.dim_value for d in g.output[0].type.tensor_type.shape.dim] == \
        ["batch", "seq", 128]
    assert r["initializers"] == len(g.initializer)
    assert r["tied_embedding_shared"] is (True if build is llama else None)
    # batch 3 and length 1 were never traced or checked: the axes are really dynamic
    import onnxruntime as ort
    ids = torch.randint(0, 128, (3, 1))
    got = ort.InferenceSession(str(dest)).run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.numpy()
    assert abs(got - ref).max() <= r["atol"]


def test_tied_embedding_stored_once(tmp_path):
    r = export_causal_lm(llama(), tmp_path / "lm.onnx", seq_len=8, check=False)
    assert r["max_abs_diff"] is None and r["seq_lens_checked"] is None
    g = onnx.load(str(tmp_path / "lm.onnx")).graph
    tables = [i for i in g.initializer if sorted(i.dims) == [64, 128]]
    assert r["tied_embedding_shared"] is True and len(tables) == 1
    assert any(n.op_type == "Transpose" and n.input[0] == tables[0].name for n in g.node)


def test_fake_quant_linears_export_as_plain_ops(tmp_path):
    model = llama()
    for layer in model.model.layers:
        for name, mod in list(layer.named_modules()):
            if isinstance(mod, torch.nn.Linear):
                parent, _, attr = name.rpartition(".")
                setattr(layer.get_submodule(parent), attr, FakeQuantLinear(mod))
    assert not any(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    dest = tmp_path / "q.onnx"
    r = export_causal_lm(model, dest, seq_len=10)
    assert r["max_abs_diff"] <= r["atol"] and r["seq_lens_checked"] == [10, 5]
    m = onnx.load(str(dest))
    assert {"Round", "Clip", "MatMul"} <= _ops(dest)
    assert {n.domain for n in m.graph.node} <= {""}  # standard ONNX only, no ATen fallback
    assert sum(n.op_type == "Round" for n in m.graph.node) == 14  # 7 Linears x 2 layers


def test_static_export(tmp_path):
    dest = tmp_path / "s.onnx"
    r = export_causal_lm(llama(), dest, seq_len=8, dynamic=False)
    assert r["seq_lens_checked"] == [8] and r["max_abs_diff"] <= r["atol"]
    dims = onnx.load(str(dest)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 8]


@pytest.mark.parametrize("drift", [1.0, float("nan")])
def test_failed_check_leaves_no_file(tmp_path, monkeypatch, drift):
    monkeypatch.setattr(DriftingLlama, "drift", drift)
    dest = tmp_path / "lm.onnx"
    with pytest.raises(DoptError, match="does not reproduce the PyTorch logits") as e:
        export_causal_lm(llama(DriftingLlama), dest, seq_len=8)
    assert e.value.file == str(dest) and "not written" in e.value.hint
    assert list(tmp_path.iterdir()) == []


def test_explicit_atol_is_absolute(tmp_path):
    r = export_causal_lm(llama(DriftingLlama), tmp_path / "lm.onnx", seq_len=8, atol=2.0)
    assert r["atol"] == 2.0 and r["max_abs_diff"] == pytest.approx(1.0, abs=1e-4)
    assert (tmp_path / "lm.onnx").is_file()


def test_unexportable_op_is_a_dopt_error(tmp_path):
    model = llama()
    model.model.norm = DiffNorm(model.model.norm)
    with pytest.raises(DoptError, match="could not be exported") as e:
        export_causal_lm(model, tmp_path / "lm.onnx", seq_len=8)
    assert "diff" in e.value.found and len(str(e.value)) < 1000
    assert list(tmp_path.iterdir()) == []


def test_large_models_use_one_external_data_file(tmp_path, monkeypatch):
    monkeypatch.setattr(export_onnx, "EXTERNAL_DATA_BYTES", 0)
    r = export_causal_lm(llama(), tmp_path / "lm.onnx", seq_len=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.onnx", "lm.onnx.data"]
    assert r["bytes"] == sum(p.stat().st_size for p in tmp_path.iterdir())
    assert r["max_abs_diff"] <= r["atol"]


@pytest.mark.parametrize("kwargs, field", [({"seq_len": 0}, "seq_len"), ({"opset": 11}, "opset"),
                                           ({"atol": -1.0}, "atol")])
def test_bad_arguments(tmp_path, kwargs, field):
    with pytest.raises(DoptError) as e:
        export_causal_lm(llama(), tmp_path / "lm.onnx", **kwargs)
    assert e.value.field == field


def test_sliding_window_is_refused(tmp_path):
    model = qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    with pytest.raises(DoptError, match="non-full attention"):
        export_causal_lm(model, tmp_path / "lm.onnx")
    assert list(tmp_path.iterdir()) == []


def test_module_imports_without_torch():
    code = ("import sys, dopt_adapters.llm.export_onnx; "
            "print(sorted({'torch', 'transformers', 'onnxruntime'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
