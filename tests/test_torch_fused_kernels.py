"""The one-pass activation fake-quant kernels (fused_kernels) against the eager path: the
forward output and the input gradient bit for bit, the range gradients to float rounding,
and the cases they leave to the eager path."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

from dopt.quant import numerics as nm  # noqa: E402
from dopt_adapters.torch import fake_quant as fq  # noqa: E402
from dopt_adapters.torch import fused_kernels as fk  # noqa: E402


@pytest.fixture
def eager(monkeypatch):
    """Switch the kernels off for the test's duration (as DOPT_TORCH_FUSED=0 does)."""
    def off():
        monkeypatch.setattr(fk, "_kernels", False)
    return off


def awkward(shape, s, o, seed=0, channels_last=False):
    """Random values with exact ties (half steps), both clamp ends, -0, inf and NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2
    flat = x.view(-1)
    flat[:600] = (torch.arange(600) - 300).float() * s * 0.5
    flat[600:610] = (fq.QMAX - o + 0.5) * s  # the upper clamp's tie
    flat[610:620] = (fq.QMIN - o - 0.5) * s
    flat[620:623] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    flat[623] = -0.0
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


CASES = [((64, 24, 14, 14), 0.0123, 3.0), ((8, 16, 33, 31), 0.5, -128.0),
         ((4, 64, 28, 28), 1e-3, 127.0)]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape,s,o", CASES)
def test_forward_is_bit_identical_to_the_eager_path(shape, s, o, channels_last):
    x = awkward(shape, s, o, channels_last=channels_last)
    ref = fq._quant_dequant(x, s, o)
    got = fk.quant_dequant(x, s, fq.QMIN - o, fq.QMAX - o)
    assert got is not None and got.stride() == ref.stride()
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    assert torch.equal(got[ok], ref[ok])
    assert torch.equal(torch.signbit(got[ok]), torch.signbit(ref[ok]))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape,s,o", CASES)
def test_backward_mask_is_bit_identical_and_sums_match(shape, s, o, channels_last):
    x = awkward(shape, s, o, channels_last=channels_last)
    out = fq._quant_dequant(x, s, o)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    a, b = fq.inside_bounds(s, o)
    gx, _, _, g_sum, gx_sum = fk.mask_and_sums(g, x, out, a, b)
    assert torch.equal(gx, torch.ops.aten.hardtanh_backward(g, x, a, b))  # NaN x gives 0
    assert g_sum == pytest.approx(float(g.double().sum()), rel=1e-5, abs=1e-3)
    assert gx_sum == pytest.approx(float(gx.double().sum()), rel=1e-5, abs=1e-3)
    # the dot products, on finite inputs (x above holds inf and NaN), against float64
    fin = torch.isfinite(x)
    xf = torch.where(fin, x, torch.zeros(()))
    outf = fq._quant_dequant(xf, s, o)
    gx, g_out, gx_x, _, _ = fk.mask_and_sums(g, xf, outf, a, b)
    assert g_out == pytest.approx(float((g.double() * outf.double()).sum()), rel=1e-5, abs=1e-3)
    assert gx_x == pytest.approx(float((gx.double() * xf.double()).sum()), rel=1e-5, abs=1e-3)


def test_training_step_is_the_eager_one(eager):
    """The autograd node with and without the kernels: the same output and input gradient
    bit for bit, the same range gradients to float rounding."""
    def step():
        x = (torch.randn(32, 24, 20, 20, generator=torch.Generator().manual_seed(3)) * 3)
        x.requires_grad_(True)
        lo = torch.tensor(-1.0, requires_grad=True)
        hi = torch.tensor(4.0, requires_grad=True)
        y = fq.fake_quant_activation(x, lo, hi)
        w = torch.linspace(-1, 1, y.numel()).view_as(y)
        (y * w).sum().backward()
        return y.detach(), x.grad, lo.grad, hi.grad
    fused = step()
    eager()
    ref = step()
    assert torch.equal(fused[0], ref[0]) and torch.equal(fused[1], ref[1])
    for a, b in zip(fused[2:], ref[2:]):
        assert float(a) == pytest.approx(float(b), rel=1e-4)
        assert float(a) != 0.0


def test_core_numerics_hold_with_the_kernels():
    x = torch.randn(40000, generator=torch.Generator().manual_seed(9)) * 3
    x[:4] = torch.tensor([0.5, 1.5, -2.5, 100.0]) * (8 / 255)
    s, o = nm.activation_qparams(-2.0, 6.0)
    got = fq.fake_quant_activation(x, torch.tensor(-2.0), torch.tensor(6.0)).numpy()
    assert np.array_equal(got, nm.fake_quant_activation(x.numpy(), s, o))


def test_left_to_the_eager_path():
    s, o = 0.1, 0.0
    big = torch.randn(64, 16, 32, 32)
    assert fk.quant_dequant(big[:, :, :, :16], s, -128, 127) is None  # not dense
    assert fk.quant_dequant(big.double(), s, -128, 127) is None
    assert fk.quant_dequant(torch.randn(16, 16), s, -128, 127) is None  # below MIN_NUMEL
    out = fq._quant_dequant(big, s, o)
    g_cl = torch.randn_like(big).contiguous(memory_format=torch.channels_last)
    assert fk.mask_and_sums(g_cl, big, out, -1.0, 1.0) is None  # strides differ
    # the eager path then gives what the kernel would have
    a, b = fq.inside_bounds(s, o)
    gx, *sums = fq._mask_and_sums(g_cl, big, out, a, b)
    ref = fk.mask_and_sums(g_cl.contiguous(), big, out, a, b)
    assert torch.equal(gx, ref[0])
    assert sums == pytest.approx(list(ref[1:]), rel=1e-4)


def test_the_kernels_follow_torch_thread_count():
    import numba
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        fk.quant_dequant(torch.randn(64, 16, 32, 32), 0.1, -128, 127)
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(fk.ENV, "0")
    monkeypatch.setattr(fk, "_kernels", None)
    assert fk.quant_dequant(torch.randn(64, 16, 32, 32), 0.1, -128, 127) is None
    assert fk._kernels is False


@pytest.mark.parametrize("shape", [(64, 16, 3, 3), (96, 1, 3, 3), (10, 256), (3, 3, 1, 1)])
def test_weight_kernel_is_bit_identical_to_the_eager_ops(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 0.1
    w[0] = 0  # a zero channel: scale 1
    w[1].view(-1)[0] = float("nan")  # NaN makes the channel's amax NaN: scale 1
    w[2] = w[2] * 1e-13  # below the zero threshold
    w.view(-1)[-1] = 0.05 * 127 / 127.5  # a tie after dividing by the last channel's scale
    wq, s = fq.fake_quant_weight_per_channel(w)
    s_ref = fq.weight_scales(w)
    wq_ref = fq.fake_quant_weight(w, s_ref)
    assert torch.equal(s, s_ref)
    assert torch.equal(torch.isnan(wq), torch.isnan(wq_ref))
    assert torch.equal(torch.nan_to_num(wq), torch.nan_to_num(wq_ref))
    ok = w[3:].detach().numpy()
    assert np.array_equal(wq[3:].numpy(), nm.fake_quant_weight(ok, nm.weight_scales(ok)))


def test_weight_kernel_gradient_is_straight_through(eager):
    def grads():
        w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(4), requires_grad=True)
        f = torch.linspace(0.5, 2.0, 8).reshape(-1, 1, 1, 1).requires_grad_(True)
        wq = fq.fake_quant_weight_per_channel(w * f)[0] / f
        (wq * torch.arange(wq.numel()).view_as(wq)).sum().backward()
        return wq.detach(), w.grad, f.grad
    fused = grads()
    eager()
    ref = grads()
    for a, b in zip(fused, ref):
        assert torch.equal(a, b)


def test_concurrent_training_threads_get_the_same_values():
    """Two Python threads running the kernels at once (serialized where Numba's thread pool
    needs it) give what one thread gives."""
    from concurrent.futures import ThreadPoolExecutor
    xs = [torch.randn(32, 24, 20, 20, generator=torch.Generator().manual_seed(i)) for i in range(8)]

    def run(x):
        x = x.clone().requires_grad_(True)
        lo, hi = torch.tensor(-1.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
        y = fq.fake_quant_activation(x, lo, hi)
        y.sum().backward()
        return y.detach(), x.grad
    alone = [run(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(run, xs))
    for (a, ga), (b, gb) in zip(alone, together):
        assert torch.equal(a, b) and torch.equal(ga, gb)


def test_a_forked_child_runs_the_eager_ops():
    """Numba's OpenMP layer terminates a forked child that launches a parallel kernel after
    its parent did: the child must fall back to the eager ops, and finish."""
    import multiprocessing as mp
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    x = torch.randn(64, 16, 32, 32, generator=torch.Generator().manual_seed(1))
    assert fk.quant_dequant(x, 0.1, -128, 127) is not None  # the parent has run them
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_fake_quant, args=(x, q))
    p.start()
    used_kernel, out = q.get(timeout=120)  # before join: the child flushes the queue at exit
    p.join(60)
    if p.exitcode is None:
        p.kill()
    assert p.exitcode == 0
    assert not used_kernel
    assert np.array_equal(out, fq._quant_dequant(x, 0.1, 0.0).numpy())


def _child_fake_quant(x, q):
    # one thread, as DataLoader workers do: PyTorch's own OpenMP ops hang in a forked child
    # of a process that ran them (checked with the kernels switched off)
    torch.set_num_threads(1)
    q.put((fk.quant_dequant(x, 0.1, -128, 127) is not None,
           fq.fake_quant_activation(x, torch.tensor(-12.8), torch.tensor(12.7)).numpy()))


def test_without_numba_or_a_failed_compile_the_eager_ops_run(monkeypatch):
    x = torch.randn(64, 16, 32, 32, generator=torch.Generator().manual_seed(6))
    ref = fq._quant_dequant(x, 0.1, 0.0)
    monkeypatch.setattr(fk.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(fk, "_kernels", None)
    assert fk.quant_dequant(x, 0.1, -128, 127) is None
    monkeypatch.undo()

    def broken(cache):
        raise RuntimeError("no LLVM target")
    monkeypatch.setattr(fk, "_warmed", broken)
    monkeypatch.setattr(fk, "_kernels", None)
    with pytest.warns(UserWarning, match="did not compile .*no LLVM target.*DOPT_TORCH_FUSED=0"):
        out = fq.fake_quant_activation(x, torch.tensor(-12.8), torch.tensor(12.7))
    assert torch.equal(out, ref)


def test_a_torchvision_network_trains_and_evaluates_as_with_the_eager_ops(tmp_path, eager):
    """torchvision's MobileNetV3-small (Hardswish, squeeze-excitation, dropout), every layer
    asked for INT8: one training step's output and weight gradients and the eval output are
    the eager path's bit for bit; the range gradients agree to float rounding."""
    import copy
    import json

    from bench import compat_models
    from dopt.dopt_torch.opt_main import (generate_config_file, optimize_model,
                                          set_calibrate_state)
    try:
        tvm = compat_models.torchvision_models_module()
    except ImportError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    net = tvm.mobilenet_v3_small(num_classes=10).eval()
    generate_config_file(net, "x:1,3,64,64", dst_path=str(tmp_path / "gen.json"))
    cfg = json.loads((tmp_path / "gen.json").read_text())
    for e in cfg["layer_strategy"].values():
        e["quant_strategy"] = "Quant_INT8-8"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning):  # the narrow layers the NPU runs in FP16
        q = optimize_model(net, str(tmp_path / "cfg.json"))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 64, 64, generator=g), torch.randint(0, 10, (8,), generator=g)
    set_calibrate_state(q, True)
    with torch.no_grad():
        q(x)
    set_calibrate_state(q, False)

    def step():
        m = copy.deepcopy(q).train()
        torch.manual_seed(2)  # the classifier's dropout
        out = m(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        with torch.no_grad():
            ev = m.eval()(x)
        return out.detach(), grads, ev
    assert fk.quant_dequant(x, 0.1, -128, 127) is not None  # this size takes the kernels
    fused = step()
    eager()
    ref = step()
    assert torch.equal(fused[0], ref[0]) and torch.equal(fused[2], ref[2])
    ranges = {n for n in ref[1] if n.endswith((".lo", ".hi"))}
    assert len(ranges) > 20 and set(fused[1]) == set(ref[1])
    for n, gr in ref[1].items():
        if n in ranges:
            assert float(fused[1][n]) == pytest.approx(float(gr), rel=1e-3, abs=1e-12)
        else:
            assert torch.equal(fused[1][n], gr), n
