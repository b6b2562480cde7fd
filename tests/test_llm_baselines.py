"""RTN and GPTQ baselines of the LLM benchmark (``bench/llm_baselines.py``) on tiny random
Llama models: both must land exactly on the ``dopt.quant.lowbit`` grid, and GPTQ must be GPTQ."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bench.llm_baselines import (  # noqa: E402
    gptq_quantize_, gptq_quantize_weight, relative_output_error, rtn_quantize_)
from dopt.quant.lowbit import fake_quant_weight, group_bounds, qmax  # noqa: E402

GROUP = 48  # hidden 64 -> groups 48, 16; intermediate 160 -> 48, 48, 48, 16


def tiny_llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def token_batches(seed=1):
    """Calibration and held-out tokens from one distribution: 16 of the 128 tokens, so the
    layer inputs span a low-dimensional subspace, the situation where GPTQ's error feedback
    beats rounding by a wide margin."""
    g = torch.Generator().manual_seed(seed)
    vocab = torch.randperm(128, generator=g)[:16]
    return (vocab[torch.randint(0, 16, (24, 32), generator=g)],
            vocab[torch.randint(0, 16, (8, 32), generator=g)])


def linear_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.model.layers.named_modules()
            if isinstance(m, torch.nn.Linear)}


def logits_mse(model, ref, ids):
    with torch.no_grad():
        return float(((model(ids).logits - ref) ** 2).mean())


@pytest.fixture(scope="module")
def models():
    """The float model and its GPTQ (3 bit) and RTN (3 bit) copies, quantized once."""
    calib, held = token_batches()
    fp = tiny_llama()
    gptq, rtn = copy.deepcopy(fp), copy.deepcopy(fp)
    report = gptq_quantize_(gptq, calib, bits=3, group_size=GROUP, batch_size=5,
                            progress=False)
    rtn_quantize_(rtn, bits=3, group_size=GROUP)
    return fp, gptq, rtn, report, calib, held


def test_rtn_is_the_lowbit_specification():
    fp = tiny_llama()
    q = copy.deepcopy(fp)
    info = rtn_quantize_(q, bits=4, group_size=GROUP)
    before, after = linear_weights(fp), linear_weights(q)
    assert info["linears"] == len(before) == 14
    for name, w in before.items():
        np.testing.assert_array_equal(after[name].numpy(),
                                      fake_quant_weight(w.numpy(), 4, GROUP), err_msg=name)
    for attr in ("embed_tokens", "norm"):
        assert torch.equal(getattr(fp.model, attr).weight, getattr(q.model, attr).weight)
    assert torch.equal(fp.lm_head.weight, q.lm_head.weight)


def assert_on_grid(w, bits, group_size):
    """Each row-group of ``w`` is ``(q - zero) * scale`` with integer ``q`` in 0..qmax and an
    integer ``zero`` in 0..qmax: the step is the smallest gap between distinct values divided
    by some k in 1..qmax (a short group may skip codes); every value must then be an integer
    multiple m of it, with one zero point putting all ``m + zero`` in 0..qmax."""
    w = w.double().numpy()
    for a, b in group_bounds(w.shape[1], group_size):
        for row in w[:, a:b]:
            vals = np.unique(row)
            if len(vals) > 1:
                assert any(_fits_grid(row, np.diff(vals).min() / k, qmax(bits))
                           for k in range(1, qmax(bits) + 1)), row


def _fits_grid(row, scale, levels):
    m = np.rint(row / scale)
    return (np.abs(row / scale - m).max() < 1e-5
            and max(0, -m.min()) <= min(levels, levels - m.max()))


def test_gptq_lands_on_the_grid(models):
    fp, gptq, _, report, _, _ = models
    assert report["linears"] == 14 and len(report["layers"]) == 2
    weights = linear_weights(gptq)
    for name, w in weights.items():
        assert w.dtype == torch.float32
        assert_on_grid(w, 3, GROUP)
    assert not torch.equal(weights["0.mlp.down_proj"], linear_weights(fp)["0.mlp.down_proj"])
    assert torch.equal(fp.model.embed_tokens.weight, gptq.model.embed_tokens.weight)
    assert torch.equal(fp.lm_head.weight, gptq.lm_head.weight)


def test_gptq_beats_rtn(models):
    fp, gptq, rtn, _, calib, held = models
    for ids in (calib[:8], held):
        with torch.no_grad():
            ref = fp(ids).logits
        assert logits_mse(gptq, ref, ids) < 0.5 * logits_mse(rtn, ref, ids)


def test_gptq_equals_rtn_for_a_diagonal_hessian():
    """Uncorrelated inputs: the inverse-Hessian factor is diagonal, no error is fed forward,
    and GPTQ must reproduce rounding bit for bit, with and without activation order."""
    torch.manual_seed(0)
    w = torch.randn(24, 100)
    h = torch.diag(torch.rand(100, dtype=torch.float64) + 0.1)
    for act_order in (False, True):
        for block in (16, 128):
            q = gptq_quantize_weight(w, h, bits=3, group_size=GROUP, block_size=block,
                                     act_order=act_order)
            np.testing.assert_array_equal(q.numpy(), fake_quant_weight(w.numpy(), 3, GROUP))


def obs_reference(w, h, bits, group_size, damp):
    """The paper's unblocked form (its eq. 2-3): quantize columns left to right, spread each
    error over the remaining columns with the full inverse Hessian, then drop the column
    from the inverse by Gaussian elimination; a group's range is taken at its first column."""
    w = w.double().clone()
    h = h + damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    starts = dict(group_bounds(w.shape[1], group_size))
    levels = qmax(bits)
    for i in range(w.shape[1]):
        if i in starts:
            g = w[:, i:starts[i]].float()
            scale = (g.amax(1) - g.amin(1)).clamp_min(1e-5) / levels
            zero = torch.round(-g.amin(1) / scale).clamp(0, levels)
        q = ((torch.round(w[:, i].float() / scale) + zero).clamp(0, levels) - zero) * scale
        err = (w[:, i] - q.double()) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
        w[:, i] = q.double()
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    return w.float()


def test_gptq_matches_the_unblocked_obs_updates():
    """Cholesky factor and lazy batches are exact rewrites of the per-column OBS updates;
    floating-point order may flip a rare rounding tie, so allow a handful of mismatches."""
    torch.manual_seed(0)
    x = torch.randn(400, 100, dtype=torch.float64) @ torch.randn(100, 100, dtype=torch.float64)
    h = 2 / 400 * x.T @ x
    w = torch.randn(24, 100)
    ref = obs_reference(w, h, 3, GROUP, 0.01)
    for block in (16, 40, 128):
        q = gptq_quantize_weight(w, h, bits=3, group_size=GROUP, block_size=block)
        assert (~torch.isclose(q, ref, rtol=1e-4, atol=1e-6)).float().mean() < 0.01
        assert relative_output_error(w, q, h) <= 1.01 * relative_output_error(w, ref, h)
    assert relative_output_error(w, ref, h) < relative_output_error(
        w, torch.from_numpy(fake_quant_weight(w.numpy(), 3, GROUP)), h)


def test_gptq_dead_inputs_and_act_order():
    """Inputs that never fire get zero weight (as in the paper's code); activation order
    still lands on the grid with the format's consecutive-column groups."""
    torch.manual_seed(0)
    x = torch.randn(300, 100, dtype=torch.float64)
    x[:, [3, 70]] = 0
    h = 2 / 300 * x.T @ x
    w = torch.randn(24, 100)
    q = gptq_quantize_weight(w, h, bits=4, group_size=GROUP, act_order=True)
    assert torch.all(q[:, [3, 70]].abs() < 1e-6)
    assert_on_grid(q, 4, GROUP)


class _TupleLayer(torch.nn.Module):
    """A decoder layer with the pre-5.x return convention ``(hidden_states, ...)``."""

    def __init__(self, layer):
        super().__init__()
        self.inner = layer

    def forward(self, *args, **kwargs):
        return (self.inner(*args, **kwargs),)


def test_gptq_accepts_tuple_returning_layers(models):
    _, gptq, _, _, calib, _ = models
    wrapped = tiny_llama()
    layers = wrapped.model.layers
    for i in range(len(layers)):
        layers[i] = _TupleLayer(layers[i])
    gptq_quantize_(wrapped, calib, bits=3, group_size=GROUP, batch_size=5, progress=False)
    got, want = linear_weights(wrapped), linear_weights(gptq)
    for name, w in want.items():
        i, rest = name.split(".", 1)
        assert torch.equal(got[f"{i}.inner.{rest}"], w), name
