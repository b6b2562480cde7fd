"""The fast engine's production graph: ONNX Runtime's blocked layout kept across the FP16
rounding, no inexact fusions, split biases and a saturating accumulator, each bit for bit
equal to the unfused debug graph that the kernel-by-kernel verification checks."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from dopt.npu.compiler import compile_onnx  # noqa: E402
from dopt.npu.profile import load_profile  # noqa: E402
from dopt.quant import numerics as nm  # noqa: E402
from dopt.runtime import blocked, fast  # noqa: E402
from dopt.runtime.verify import kernel_agreement  # noqa: E402
from tests.npu_models import BLOCKED_RANGES, blocked_net, params_for  # noqa: E402

X = np.random.default_rng(7).uniform(-2, 3, (8, 16, 14, 14)).astype(np.float32)


def _om(int8: bool, big_bias: float = 0.0):
    model = blocked_net(big_bias)
    params = params_for(model, BLOCKED_RANGES) if int8 else None
    return compile_onnx(model, load_profile(), params=params)[0]


def _reorders(model) -> int:
    return sum(n.domain == blocked.NCHWC and n.op_type.startswith("Reorder")
               for n in model.graph.node)


@pytest.mark.parametrize("int8", [False, True])
def test_production_graph_equals_the_debug_graph_bit_for_bit(int8):
    om = _om(int8)
    prod, debug = fast.FastEngine(om), fast.FastEngine(om, debug=True)
    got, want = prod.run({"x": X})["y"], debug.run({"x": X})["y"]
    assert np.array_equal(got, want)
    # the rewrite really happened: ONNX Runtime's own graph converts layouts around the casts
    opt = blocked.optimized_model(prod.model.SerializeToString(), fast._options(0),
                                  fast.INEXACT_FUSIONS)
    before = _reorders(opt)
    removed = blocked.keep_blocked(opt, blocked.shapes_of(prod.model))
    assert removed > 0 and _reorders(opt) == before - removed
    rows = kernel_agreement(om, {"x": X})
    assert all(r["within_bound"] for r in rows)
    assert all(r["exact"] for r in rows if r["precision"] == "int8")


def test_int8_layers_run_as_float_ops_on_their_input_range():
    # q - o lies in [-128 - o, 127 - o]: the bound on partial sums uses that range, so
    # every layer here runs as one float32 op (no ConvInteger, no channel chunks)
    om = _om(True)
    eng = fast.FastEngine(om)
    assert {"expand", "dw", "project", "side", "fc"} <= eng.float_int and not eng.chunks
    assert not any(n.op_type in ("ConvInteger", "MatMulInteger") for n in eng.model.graph.node)
    # the bound is tight enough to matter and still safe: all weights at +127 on inputs
    # of 0..255 reach 255 * 127 * K, which must stay below 2**24
    w = np.full((1, 600, 1, 1), 127, np.int8)
    assert fast.acc_bound(w, (0, 255))[0] == 255 * 127 * 600
    assert fast.exact_in_float(w[:, :500], None, (0, 255))
    assert not fast.exact_in_float(w[:, :600], None, (0, 255))
    assert fast.acc_bound(np.array([[1, -1]], np.int8), (0, 255))[0] == 255


def test_a_bias_too_large_for_float32_is_split_and_stays_exact():
    # 3e4 in real units is ~1e9 in int32 units: over 2**24, so the integer op cannot run as
    # one float32 op with its bias; the bias's large part is added after it
    om = _om(True, big_bias=3e4)
    eng = fast.FastEngine(om)
    assert "project" in eng.split
    rows = kernel_agreement(om, {"x": X})
    assert all(r["exact"] for r in rows if r["precision"] == "int8"), \
        [r for r in rows if r["precision"] == "int8" and not r["exact"]]
    assert np.array_equal(eng.run({"x": X})["y"], fast.FastEngine(om, debug=True)
                          .run({"x": X})["y"])


def test_the_int32_accumulator_saturates_like_the_numerics():
    # a bias past the int32 range is stored saturated; the products can push the sum past
    # it: numerics.int8_linear clamps the accumulator, and so do both engines
    om = _om(True, big_bias=1e6)
    bq = om.tensors["project.bias_q"]
    assert bq.min() == nm.INT32_MIN or bq.max() == nm.INT32_MAX
    rows = kernel_agreement(om, {"x": X})
    assert all(r["exact"] for r in rows if r["precision"] == "int8")
    acc = fast.FastEngine(om, debug=True).run({"x": X})["project/acc"]
    assert acc.min() >= nm.INT32_MIN and acc.max() <= float(nm.INT32_MAX) + 1


def test_batch_slices_on_one_thread_each_give_the_whole_batch_bit_for_bit():
    for int8 in (True, False):
        om = _om(int8)
        sliced, whole = fast.FastEngine(om, lanes=3), fast.FastEngine(om, threads=1)
        assert (sliced.lanes, whole.lanes) == (3, 1)
        assert fast.SLICE_MIN <= sliced.slice <= fast.SLICE_MAX
        sliced.slice = 3                   # 8 samples: slices of 2, 3 and 3 on three threads
        got = sliced.run({"x": X})["y"]
        assert got.shape[0] == len(X) and np.array_equal(got, whole.run({"x": X})["y"])
        # a batch of one slice or less runs on all the threads, in the second session
        assert np.array_equal(sliced.run({"x": X[:2]})["y"], got[:2])
        assert sliced._whole is not None and sliced._whole is not sliced.sess


def test_a_batch_is_cut_into_equal_slices_a_multiple_of_the_workers():
    # 32 samples at about 13 a slice on two workers: two slices of 16, not 13 + 13 + 6
    assert fast.slice_bounds(32, 13, 2) == [0, 16, 32]
    assert fast.slice_bounds(32, 4, 2) == [0, 4, 8, 12, 16, 20, 24, 28, 32]
    for n in range(1, 70):
        for target in (1, 2, 3, 5, 16):
            for lanes in (1, 2, 3, 4):
                b = fast.slice_bounds(n, target, lanes)
                sizes = np.diff(b)
                assert b[0] == 0 and b[-1] == n and sizes.min() >= 1, (n, target, lanes)
                assert sizes.max() - sizes.min() <= 1, (n, target, lanes)
                assert len(sizes) % lanes == 0 or len(sizes) == n, (n, target, lanes)
                assert sizes.max() <= 1.5 * target + 1, (n, target, lanes)  # about target


def test_slices_where_they_pay_one_whole_batch_where_they_do_not():
    # INT8 depthwise layers: sliced (DequantizeLinear runs on one thread); a small float model:
    # one batch on all the threads; a float model whose sample fills the cache: sliced
    int8, small_float = fast.FastEngine(_om(True), threads=3), fast.FastEngine(_om(False),
                                                                                threads=3)
    assert int8.lanes == 3 and int8.slice <= fast.SLICE_MAX
    assert small_float.lanes == 1 and small_float.slice > len(X)
    assert np.array_equal(small_float.run({"x": X})["y"],
                          fast.FastEngine(_om(False), lanes=3).run({"x": X})["y"])
    assert fast.slices_pay(_om(False), fast.CACHE_SLICE_SAMPLES)
    assert not fast.slices_pay(_om(False), fast.CACHE_SLICE_SAMPLES + 1)
    # the rule reads the kernels: INT8 depthwise layers, not INT8 layers as such
    from types import SimpleNamespace
    kinds = [k["op"] for k in _om(True).graph["kernels"]]
    assert "QuantizedConvolutionDepthwise" in kinds
    no_dw = SimpleNamespace(graph={"kernels": [{"op": o} for o in kinds
                                               if o != "QuantizedConvolutionDepthwise"]})
    assert not fast.slices_pay(no_dw, fast.CACHE_SLICE_SAMPLES + 1)
