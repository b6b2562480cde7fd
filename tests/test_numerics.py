"""Golden vectors of docs/numerics.md and the rules they illustrate."""
import numpy as np
import pytest

from dopt.quant import numerics as nm


def test_round_half_even_and_clamp():
    s, o = np.float32(0.5), -3
    x = np.array([-100.0, -0.25, 0.25, 0.75, 1.25, 61.0, 100.0], np.float32)
    # x/s = -200, -0.5, 0.5, 1.5, 2.5, 122, 200 -> rint: -200, -0, 0, 2, 2, 122, 200; + o; clamp
    assert nm.quantize_activation(x, s, o).tolist() == [-128, -3, -3, -1, -1, 119, 127]
    # non-finite inputs (an FP16 overflow upstream): +-inf saturate, NaN is the lowest code
    special = np.array([np.inf, -np.inf, np.nan], np.float32)
    assert nm.quantize_activation(special, s, o).tolist() == [127, -128, -128]


def test_activation_qparams_golden():
    s, o = nm.activation_qparams(-1.0, 3.0)
    assert s == np.float32(4.0) / np.float32(255.0)
    assert o == -64  # rint(-128 + 1 / (4/255)) = rint(-64.25)
    s, o = nm.activation_qparams(0.5, 6.0)  # widened to include 0
    assert o == -128 and s == np.float32(6.0) / np.float32(255.0)
    s, o = nm.activation_qparams(0.0, 0.0)
    assert s == np.float32(nm.MIN_SCALE) and o == -128
    assert nm.fake_quant_activation(np.float32(0.0), *nm.activation_qparams(-0.3, 2.9)) == 0.0


def test_weight_per_channel_golden():
    w = np.array([[0.5, -1.27, 0.0], [0.0, 0.0, 0.0], [2.54, 1.0, -0.01]], np.float32)
    s = nm.weight_scales(w)
    assert s.tolist() == [np.float32(1.27) / np.float32(127), 1.0, np.float32(2.54) / np.float32(127)]
    q = nm.quantize_weight(w, s)
    assert q.tolist() == [[50, -127, 0], [0, 0, 0], [127, 50, 0]]
    assert q.dtype == np.int8 and q.min() >= -127
    # a channel of denormal-size weights is a zero channel, not a 1e-36 scale
    tiny = np.array([[1e-34, -1e-35, 0.0]], np.float32)
    assert nm.weight_scales(tiny).tolist() == [1.0]
    assert nm.quantize_weight(tiny, nm.weight_scales(tiny)).tolist() == [[0, 0, 0]]


def test_bias_int32_golden():
    assert nm.quantize_bias(np.array([0.1, -3e9], np.float32), 0.01,
                            np.array([0.1, 1.0], np.float32)).tolist() \
        == [100, -2147483648]
    # positive saturation: 2**31 - 1 (as a float32 it is 2**31, which would wrap)
    assert nm.quantize_bias(np.array([3e9], np.float32), 0.01,
                            np.array([1.0], np.float32)).tolist() == [2147483647]


def test_int8_linear_golden():
    x = np.array([[0.0, 1.0, -0.5, 2.0]], np.float32)
    w = np.array([[1.0, -1.0, 0.5, 0.25], [0.0, 2.0, 0.0, -2.0]], np.float32)
    b = np.array([0.5, -1.0], np.float32)
    s_d, o_d = nm.activation_qparams(-0.5, 2.0)
    s_w = nm.weight_scales(w)
    y = nm.int8_linear(x, w, b, s_d, o_d, s_w)
    assert y.dtype == np.float16
    # hand-checked: q-o = [0, 102, -51, 204]; w_q = [[127,-127,64,32],[0,127,0,-127]];
    # acc = [-9690 + 6477, -12954 - 6477] = [-3213, -19431]
    assert y.tolist() == [[-0.248046875, -3.0]]
    ref = x @ w.T + b
    assert np.allclose(y.astype(np.float32), ref, atol=0.02)


def test_offset_form_equivalence():
    """rint(x/s) + o == rint(x/s + o) for the integer offsets we produce (bar float ties)."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, 100000).astype(np.float32)
    s, o = nm.activation_qparams(-4.0, 9.0)
    a = nm.quantize_activation(x, s, o)
    b = np.clip(np.rint(x / s + np.float32(o)), -128, 127).astype(np.int8)
    assert (a != b).mean() < 1e-4


@pytest.mark.parametrize("lo,hi", [(-1.0, 1.0), (0.0, 6.0), (-0.01, 100.0)])
def test_zero_exact(lo, hi):
    s, o = nm.activation_qparams(lo, hi)
    assert nm.dequantize_activation(nm.quantize_activation(0.0, s, o), s, o) == 0.0


def test_fp16_rounding_golden():
    """docs/numerics.md, 'FP16 everywhere else': the runtime's rounding."""
    from dopt.runtime.reference import fp16
    x = np.array([0.1, 65519.0, 65520.0, 1 + 2 ** -11, 1 + 3 * 2 ** -11], np.float32)
    with np.errstate(over="ignore"):
        got = fp16(x)
    assert got.tolist() == [0.0999755859375, 65504.0, float("inf"), 1.0, 1.001953125]


def test_batchnorm_fold_golden():
    # k = gamma / sqrt(var + eps), shift = beta - mean * k, float32; a running variance FP16
    # cannot hold folds to an ordinary scale
    k, shift = nm.bn_scale_shift(np.float32([2.0, 1.0]), np.float32([5.0, 0.0]),
                                 np.float32([4.0, 1e3]), np.float32([3.0, 1e8]), 1.0)
    assert k.dtype == shift.dtype == np.float32
    assert k[0] == 1.0 and shift[0] == 1.0
    assert k[1] == np.float32(1.0) / np.sqrt(np.float32(1e8 + 1.0))
    assert np.isfinite(k[1].astype(np.float16))
