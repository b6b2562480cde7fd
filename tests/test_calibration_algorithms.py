"""Core calibration algorithms: histogram, percentile/entropy/mse ranges, CLE, bias correction."""
import json
import pickle

import numpy as np
import pytest

from dopt import plugin_manager
from dopt.quant.bias_correction import ChannelMeanObserver, corrected_bias, weight_bias_shift
from dopt.quant.equalize import channel_ranges, equalize_chain, equalize_pair, input_channel_ranges
from dopt.quant.histogram import BINS, Histogram
from dopt.quant.numerics import (activation_qparams, fake_quant_activation, fake_quant_weight,
                           weight_scales)
from dopt.quant.observers import (BUILTIN_RANGE_ALGORITHMS, MIN_WIDTH, EntropyObserver,
                            MSEObserver, PercentileObserver, expected_mse)

SEARCHED = ("percentile", "entropy", "mse")


def qmse(x, lo, hi):
    """The real thing: mean squared error of the core's INT8 fake quant with range [lo, hi]."""
    s, o = activation_qparams(lo, hi)
    return float(np.mean((fake_quant_activation(x, s, o) - x).astype(np.float64) ** 2))


def observe(name, *batches):
    o = BUILTIN_RANGE_ALGORITHMS[name]()
    for b in batches:
        o.update(b)
    return o


@pytest.fixture(scope="module")
def heavy():
    """Laplace(0, 1) with two far outliers: min-max wastes most of the grid on them."""
    x = np.random.default_rng(0).laplace(0, 1, 1_000_000).astype(np.float32)
    x[:2] = [60.0, -60.0]
    return x


# -- histogram ------------------------------------------------------------------------
def test_histogram_merges_exactly_across_growth():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, 5000).astype(np.float32)
    b = rng.normal(3, 40, 5000).astype(np.float32)  # forces R to grow 2**3 -> 2**8
    b[:10] = 0.0
    one = Histogram()
    one.update(a)
    one.update(b)
    cat = Histogram()
    cat.update(np.concatenate([a, b]))
    x, y = Histogram(), Histogram()
    x.update(a)
    y.update(b)
    y.merge(json.loads(json.dumps(x.state())))  # the other order, through JSON
    for h in (cat, y):
        assert h.exp == one.exp and np.array_equal(h.counts, one.counts)
        assert (h.min, h.max, h.zeros) == (one.min, one.max, one.zeros)
    assert one.total == 10000 and one.zeros >= 10 and one.radius > max(-one.min, one.max)


def test_histogram_binning_is_consistent_at_every_scale():
    # values right next to bin edges, denormals, -0.0: a value's bin at 2R must be the
    # pair-merge of its bin at R, or merges would not be exact
    tiny = np.float32([1e-45, -1e-45, -0.0, 2 ** -20, -(2 ** -20), np.nextafter(1, 0, dtype=np.float32)])
    small = Histogram()
    small.update(tiny)
    big = Histogram()
    big.update(np.float32([1000.0]))
    merged = big.copy()
    merged.merge(small)
    direct = Histogram()
    direct.update(np.concatenate([tiny, np.float32([1000.0])]))
    assert np.array_equal(merged.counts, direct.counts) and merged.zeros == direct.zeros == 1


def test_histogram_drops_non_finite_and_quantiles_are_precise():
    rng = np.random.default_rng(1)
    h = Histogram()
    h.update(np.float32([np.nan, np.inf, -np.inf]))
    assert h.empty
    x = rng.normal(0, 1, 200_000).astype(np.float32)
    h.update(np.append(x, np.float32([np.nan])))
    assert h.total == x.size and (h.min, h.max) == (x.min(), x.max())
    for q in (0.001, 0.5, 0.999):
        assert h.quantile(q) == pytest.approx(np.quantile(x, q), abs=2 * h.width)
    assert h.quantile(0.0) == x.min() and h.quantile(1.0) == x.max()


def test_histogram_memory_is_independent_of_samples():
    rng = np.random.default_rng(2)
    h = Histogram()
    sizes = []
    for n in (1000, 10_000_000):  # 10M values also exercises the chunked update
        h.update(rng.standard_normal(n, dtype=np.float32))
        sizes.append(len(json.dumps(h.state())))
    assert h.total == 10_001_000
    assert h.counts.nbytes == BINS * 8 <= 256 * 1024 and len(h.counts) == BINS
    assert max(sizes) < 200_000 and len(pickle.dumps(h.state())) < 300_000


def test_histogram_bad_arguments():
    with pytest.raises(ValueError, match="power of two"):
        Histogram(1000)
    h = Histogram(1024)
    h.update([1.0])
    with pytest.raises(ValueError, match="bins"):
        Histogram().merge(h.state())
    with pytest.raises(ValueError, match="empty"):
        Histogram().quantile(0.5)


# -- range observers ------------------------------------------------------------------
def test_algorithms_are_registered():
    algs = plugin_manager.range_algorithms()
    for name, cls in (("percentile", PercentileObserver), ("entropy", EntropyObserver),
                      ("mse", MSEObserver)):
        assert BUILTIN_RANGE_ALGORITHMS[name] is cls and algs[name] is cls
        assert cls().name == name
    assert {"minmax", "ema_minmax"} <= set(algs)


@pytest.mark.parametrize("name", SEARCHED)
def test_batches_one_pass_and_merged_ranks_agree_exactly(name):
    rng = np.random.default_rng(3)
    batches = [rng.laplace(0.5, s, 20_000).astype(np.float32) for s in (0.5, 1.0, 8.0)]
    seq = observe(name, *batches)
    one = observe(name, np.concatenate(batches))
    ranks = [observe(name, b) for b in batches]
    merged = BUILTIN_RANGE_ALGORITHMS[name]()
    for r in ranks[::-1]:
        merged.merge(json.loads(json.dumps(r.state())))
    assert seq.state() == one.state() == merged.state()
    assert seq.range() == one.range() == merged.range()


@pytest.mark.parametrize("name", SEARCHED)
def test_empty_constant_and_degenerate_inputs(name):
    o = observe(name, np.zeros((0, 3), np.float32), np.float32([np.nan]))
    assert o.empty
    with pytest.raises(ValueError, match="no finite data"):
        o.range()
    assert observe(name, np.zeros(100, np.float32)).range() == (0.0, MIN_WIDTH)
    assert observe(name, np.full(100, 2.5, np.float32)).range() == (0.0, 2.5)
    assert observe(name, np.full(100, -2.0, np.float32)).range() == (-2.0, 0.0)
    lo, hi = observe(name, np.full(10, 1e-12, np.float32)).range()
    assert lo == 0.0 and hi == MIN_WIDTH
    o = observe(name, np.float32([0.0, 3.0]))
    assert not o.empty and o.range() == (0.0, 3.0)


@pytest.mark.parametrize("name", SEARCHED)
def test_ranges_contain_zero_and_stay_within_the_data(name, heavy):
    rng = np.random.default_rng(4)
    cases = [heavy, rng.uniform(2, 5, 100_000).astype(np.float32),
             -rng.exponential(2, 100_000).astype(np.float32),
             np.concatenate([rng.normal(-5, .3, 50_000), rng.normal(3, .3, 50_000)])]
    for x in cases:
        lo, hi = observe(name, x).range()
        assert min(x.min(), 0) <= lo <= 0 <= hi <= max(x.max(), 0) and hi - lo >= MIN_WIDTH
        assert str(lo) != "-0.0" and str(hi) != "-0.0"


@pytest.mark.parametrize("name", SEARCHED)
def test_one_sided_relu_data_gives_lo_zero(name):
    x = np.maximum(np.random.default_rng(5).normal(0, 1, (64, 8, 16, 16)), 0).astype(np.float32)
    lo, hi = observe(name, x).range()
    assert lo == 0.0 and 2.0 < hi <= x.max()


def test_percentile_clips_outliers():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, 200_000)
    x[:3] = [500.0, -400.0, 300.0]
    lo, hi = observe("percentile", x).range()
    assert -4.5 < lo < -3.3 and 3.3 < hi < 4.5  # 99.99 %: about 3.7 sigma
    o = PercentileObserver(99.0)
    o.update(x)
    assert o.range() == pytest.approx((-2.33, 2.33), abs=0.05)
    for bad in (50, 100.5):
        with pytest.raises(ValueError, match="percentile"):
            PercentileObserver(bad)


def test_entropy_and_mse_beat_minmax_on_heavy_tails(heavy):
    err = {n: qmse(heavy, *observe(n, heavy).range()) for n in ("minmax",) + SEARCHED}
    assert err["entropy"] < 0.5 * err["minmax"] and err["mse"] < 0.5 * err["minmax"]
    assert err["mse"] <= 1.01 * min(err.values())  # it minimizes this very quantity


def test_entropy_and_mse_do_not_lose_on_uniform_data():
    x = np.random.default_rng(6).uniform(-1, 3, 1_000_000).astype(np.float32)
    ref = qmse(x, *observe("minmax", x).range())
    for name in ("entropy", "mse"):
        assert qmse(x, *observe(name, x).range()) <= 1.02 * ref


def test_entropy_never_collapses_shifted_data():
    # KL alone would squeeze all of [2, 5] into the top step of [0, 1.9] at no cost
    x = np.random.default_rng(7).uniform(2, 5, 100_000).astype(np.float32)
    assert observe("entropy", x).range()[1] > 4.9


def test_mse_objective_is_the_real_int8_error(heavy):
    h = observe("mse", heavy).hist
    for lo, hi in ((-60, 60), (-10, 10), (-3, 5), (0, 8)):
        assert expected_mse(h, lo, hi) == pytest.approx(qmse(heavy, lo, hi), rel=0.01)
    # data on the grid (8-bit images): the aligned range is error free, the grid is real
    img = (np.random.default_rng(8).integers(0, 256, 100_000) / 255).astype(np.float32)
    o = observe("mse", img)
    assert expected_mse(o.hist, 0, 1) < 1e-7 and expected_mse(o.hist, 0, 0.98) > 4e-6
    assert qmse(img, *o.range()) < 1e-12


# -- cross-layer equalization ---------------------------------------------------------
def conv2d(x, w, b=None, groups=1, pad=0):
    """Tiny NCHW convolution (stride 1), float64."""
    n, _, _, _ = x.shape
    c, cpg, kh, kw = w.shape
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    ho, wo = win.shape[2:4]
    win = win.reshape(n, groups, cpg, ho, wo, kh, kw)
    wg = np.asarray(w, np.float64).reshape(groups, c // groups, cpg, kh, kw)
    out = np.einsum("ngchwij,gocij->ngohw", win, wg).reshape(n, c, ho, wo)
    return out if b is None else out + np.asarray(b, np.float64)[None, :, None, None]


def relu(x):
    return np.maximum(x, 0)


def test_cle_keeps_the_float_function_and_equalizes_ranges():
    rng = np.random.default_rng(9)
    scales = np.float32(10.0 ** rng.uniform(-2, 1, 8))
    w1 = (rng.normal(0, 1, (8, 3, 3, 3)) * scales[:, None, None, None]).astype(np.float32)
    b1 = rng.normal(0, 1, 8).astype(np.float32)
    w2 = rng.normal(0, 1, (5, 8, 3, 3)).astype(np.float32)
    x = rng.normal(0, 1, (2, 3, 9, 9)).astype(np.float32)
    f = conv2d(relu(conv2d(x, w1, b1, pad=1)), w2)
    w1e, b1e, w2e, s = equalize_pair(w1, b1, w2)
    assert w1e.dtype == b1e.dtype == w2e.dtype == np.float32 and s.shape == (8,)
    np.testing.assert_allclose(conv2d(relu(conv2d(x, w1e, b1e, pad=1)), w2e), f,
                               rtol=1e-5, atol=1e-5 * np.abs(f).max())
    np.testing.assert_allclose(channel_ranges(w1e), input_channel_ranges(w2e, 8), rtol=1e-6)
    assert channel_ranges(w1).max() / channel_ranges(w1).min() > 50
    assert channel_ranges(w1e).max() / channel_ranges(w1e).min() < 10

    # depthwise layer 2 (groups2 == C: channel i is axis 0 of w2), linear, no bias
    wd = rng.normal(0, 1, (8, 1, 3, 3)).astype(np.float32)
    w1e, b1e, wde, _ = equalize_pair(w1, None, wd, groups2=8)
    assert b1e is None
    f = conv2d(relu(conv2d(x, w1, pad=1)), wd, groups=8)
    np.testing.assert_allclose(conv2d(relu(conv2d(x, w1e, pad=1)), wde, groups=8), f,
                               rtol=1e-5, atol=1e-5 * np.abs(f).max())
    np.testing.assert_allclose(channel_ranges(w1e), channel_ranges(wde), rtol=1e-6)
    lin1, lin2 = w1.reshape(8, -1), rng.normal(0, 1, (4, 8)).astype(np.float32)
    l1, _, l2, _ = equalize_pair(lin1, None, lin2)
    xl = rng.normal(0, 1, (16, 27))
    np.testing.assert_allclose(relu(xl @ l1.T) @ l2.T, relu(xl @ lin1.T) @ lin2.T, rtol=1e-5,
                               atol=1e-5)


def test_cle_zero_channels_clamping_and_bad_arguments():
    w1 = np.ones((3, 2), np.float32)
    w1[1] = 0.0
    w2 = np.ones((2, 3), np.float32)
    w2[:, 2] = 1e-12
    _, _, _, s = equalize_pair(w1, None, w2, scale_range=(1e-3, 1e3))
    assert s[1] == 1.0 and s[2] == 1e3 and s[0] == 1.0
    with pytest.raises(ValueError, match="input channels"):
        equalize_pair(np.ones((4, 2)), None, np.ones((2, 3)))
    with pytest.raises(ValueError, match="groups2"):
        equalize_pair(np.ones((4, 2)), None, np.ones((2, 2)), groups2=3)
    with pytest.raises(ValueError, match="bias"):
        equalize_pair(np.ones((4, 2)), np.ones(3), np.ones((2, 4)))
    with pytest.raises(ValueError, match="scale_range"):
        equalize_pair(np.ones((4, 2)), None, np.ones((2, 4)), scale_range=(2, 3))
    with pytest.raises(ValueError, match="several consumers"):
        equalize_chain([np.ones((2, 2))] * 3, [None] * 3, pairs=[(0, 1), (0, 2)])


def test_cle_chain_converges_and_keeps_the_function():
    rng = np.random.default_rng(10)
    sizes = [3, 6, 6, 4]
    ws = [(rng.normal(0, 1, (sizes[k + 1], sizes[k])) * 10.0 ** rng.uniform(-1.5, 1.5, (sizes[k + 1], 1)))
          .astype(np.float32) for k in range(3)]
    bs = [rng.normal(0, 1, sizes[k + 1]).astype(np.float32) for k in range(3)]
    x = rng.normal(0, 1, (32, 3))

    def f(ws, bs):
        h = x
        for k, (w, b) in enumerate(zip(ws, bs)):
            h = h @ np.asarray(w, np.float64).T + b
            h = relu(h) if k < 2 else h
        return h

    ws2, bs2, scales = equalize_chain(ws, bs, max_iter=200, tol=1e-7)
    assert len(scales) == 2 and bs2[2] is bs[2]
    np.testing.assert_allclose(f(ws2, bs2), f(ws, bs), rtol=1e-4, atol=1e-4)
    for k in range(2):  # every pair is balanced at once: the sweep converged
        np.testing.assert_allclose(channel_ranges(ws2[k]), channel_ranges(ws2[k + 1], 1),
                                   rtol=1e-4)


def test_cle_reduces_int8_error_of_a_depthwise_separable_pair():
    rng = np.random.default_rng(11)
    c = 16
    ranges = 10.0 ** rng.uniform(-2, 1, c)
    wd = (rng.normal(0, 1, (c, 1, 3, 3)) * ranges[:, None, None, None]).astype(np.float32)
    bd = (rng.normal(0, 0.1, c) * ranges).astype(np.float32)
    wp = rng.normal(0, 1, (24, c, 1, 1)).astype(np.float32)
    x = rng.normal(0, 1, (8, c, 12, 12)).astype(np.float32)

    def int8_error(wd, bd, wp):
        """Per-channel INT8 weights, per-tensor INT8 activation between the layers."""
        ref = conv2d(relu(conv2d(x, wd, bd, groups=c, pad=1)), wp)
        a = relu(conv2d(x, fake_quant_weight(wd, weight_scales(wd)), bd, groups=c, pad=1))
        s, o = activation_qparams(0.0, a.max())
        a = fake_quant_activation(a, s, o)
        out = conv2d(a, fake_quant_weight(wp, weight_scales(wp)))
        return float(np.mean((out - ref) ** 2)), float(np.mean(ref ** 2))

    before, power = int8_error(wd, bd, wp)
    wde, bde, wpe, _ = equalize_pair(wd, bd, wp)
    after, power_e = int8_error(wde, bde, wpe)
    assert power_e == pytest.approx(power, rel=1e-5)  # same function
    assert after < 0.5 * before


# -- bias correction ------------------------------------------------------------------
def test_bias_shift_matches_monte_carlo_for_conv_depthwise_and_linear():
    rng = np.random.default_rng(12)
    mean = np.array([4.0, -2.0, 1.0, 3.0])
    x = (mean[None, :, None, None] + rng.normal(0, 1, (64, 4, 10, 10))).astype(np.float32)
    for w, groups in ((rng.normal(0, 0.3, (6, 4, 3, 3)), 1), (rng.normal(0, 0.3, (4, 1, 3, 3)), 4),
                      (rng.normal(0, 0.3, (6, 2, 3, 3)), 2)):
        w = w.astype(np.float32)
        w_fq = fake_quant_weight(w, weight_scales(w) * 8)  # coarse: a visible shift
        mc = (conv2d(x, w_fq, groups=groups) - conv2d(x, w, groups=groups)).mean(axis=(0, 2, 3))
        shift = weight_bias_shift(w, w_fq, mean, groups=groups)
        np.testing.assert_allclose(shift, mc, atol=0.02 * np.abs(mc).max())
        b = rng.normal(0, 1, w.shape[0]).astype(np.float32)
        fixed = conv2d(x, w_fq, corrected_bias(b, w, w_fq, mean, groups=groups), groups=groups)
        resid = (fixed - conv2d(x, w, b, groups=groups)).mean(axis=(0, 2, 3))
        assert np.abs(resid).max() < 0.05 * np.abs(mc).max()
    wl = rng.normal(0, 1, (5, 3)).astype(np.float32)
    wl_fq = fake_quant_weight(wl, weight_scales(wl) * 8)
    xl = np.array([2.0, -1.0, 0.5]) + rng.normal(0, 1, (200_000, 3))
    np.testing.assert_allclose(weight_bias_shift(wl, wl_fq, [2.0, -1.0, 0.5]),
                               ((wl_fq - wl) @ xl.T).mean(axis=1), atol=0.01)
    assert corrected_bias(None, wl, wl_fq, [2.0, -1.0, 0.5]).dtype == np.float32
    with pytest.raises(ValueError, match="input_channel_mean"):
        weight_bias_shift(wl, wl_fq, [1.0, 2.0])
    with pytest.raises(ValueError, match="groups"):
        weight_bias_shift(w, w, np.zeros(4), groups=3)


def test_channel_mean_observer_merges():
    rng = np.random.default_rng(13)
    batches = [(rng.normal(0, 1, (4, 3, 5, 5)) + np.arange(3)[None, :, None, None])
               .astype(np.float32) for _ in range(3)]
    seq, one = ChannelMeanObserver(), ChannelMeanObserver()
    for b in batches:
        seq.update(b)
    one.update(np.concatenate(batches))
    ranks = []
    for b in batches:
        r = ChannelMeanObserver()
        r.update(b)
        ranks.append(json.loads(json.dumps(r.state())))
    merged = ChannelMeanObserver()
    for s in ranks:
        merged.merge(s)
    assert seq.count == one.count == merged.count == 300
    np.testing.assert_allclose(merged.mean(), one.mean(), rtol=1e-12)
    np.testing.assert_allclose(seq.mean(), np.concatenate(batches).mean(axis=(0, 2, 3)),
                               rtol=1e-6)
    lin = ChannelMeanObserver()
    lin.update(np.array([[1.0, 2.0], [3.0, 6.0]]))
    np.testing.assert_allclose(lin.mean(), [2.0, 4.0])
    with pytest.raises(ValueError, match="channels"):
        lin.update(np.ones((2, 3)))
    with pytest.raises(ValueError, match="channel axis"):
        lin.update(np.ones(3))
    nhwc = ChannelMeanObserver(axis=-1)
    nhwc.update(batches[0].transpose(0, 2, 3, 1))
    np.testing.assert_allclose(nhwc.mean(), batches[0].mean(axis=(0, 2, 3)), rtol=1e-6)
    with pytest.raises(ValueError, match="no data"):
        ChannelMeanObserver().mean()
    assert ChannelMeanObserver().empty
