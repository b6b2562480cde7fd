"""Keras 3 quantization-aware training path: config, fake-quant numerics, calibration, QAT,
BN folding, save/load, export, and the compiled model on the emulated NPU."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
onnx = pytest.importorskip("onnx")
pytest.importorskip("tf2onnx")
pytest.importorskip("onnxruntime")
if keras.backend.backend() != "tensorflow":
    pytest.skip("Keras runs on another backend", allow_module_level=True)

from dopt import DoptError  # noqa: E402
from dopt.quant import numerics as nm  # noqa: E402
from dopt.formats import param_file as P  # noqa: E402
from dopt.quant.observers import MinMaxObserver, PercentileObserver  # noqa: E402
from dopt_adapters.tensorflow import fake_quant as fq  # noqa: E402
from dopt_adapters.tensorflow import keras_api as KA, keras_export as KE  # noqa: E402
from dopt_adapters.tensorflow import keras_layers as KL  # noqa: E402

from tests.cli import ROOT  # noqa: E402

L = keras.layers
INT8 = "Quant_INT8-8"


def tiny(seed=0, cin=20):
    """Every pattern the adapter handles: Conv+BN, depthwise+BN, a float conv,
    SeparableConv2D+BN (depth multiplier 2), a residual add, Dense. With ``cin`` >= 17 the
    NPU runs every layer in INT8; ``cin=3`` makes c1 a convolution it runs in FP16."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, cin), name="image")
    x = L.Conv2D(24, 3, padding="same", use_bias=False, name="c1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(6.0, name="r1")(x)
    h = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    h = L.BatchNormalization(name="bn_dw")(h)
    h = L.ReLU(name="r2")(h)
    h = L.Conv2D(24, 1, name="pw")(h)
    x = L.Add(name="add")([x, h])
    x = L.SeparableConv2D(32, 3, strides=2, padding="same", depth_multiplier=2, name="sep")(x)
    x = L.BatchNormalization(name="bn_sep")(x)
    x = L.ReLU(name="r3")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dense(5, name="fc")(x)
    m = keras.Model(inp, x, name="tiny")
    rng = np.random.default_rng(seed)
    for layer in m.layers:  # non-trivial BN statistics and biases so folding matters
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape
            layer.moving_mean.assign(rng.uniform(-0.5, 0.5, n))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n))
            layer.gamma.assign(rng.uniform(0.5, 1.5, n))
            layer.beta.assign(rng.uniform(-0.2, 0.2, n))
        elif getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.uniform(-0.2, 0.2, layer.bias.shape))
    return m


def data(n=64, seed=1, shape=(8, 8, 20)):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def write_cfg(tmp_path, model, quantize="all", name="config.json", **extra):
    gen = tmp_path / "config_gen.json"
    doc = KA.generate_config_file(model, str(gen))
    for k, e in doc["layer_strategy"].items():
        if quantize == "all" or k in quantize:
            e["quant_strategy"] = INT8
    doc.update(extra)
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def optimize(model, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # narrow convolutions warn; tested separately
        return KA.optimize_model(model, str(cfg))


def calibrate(q, x, batch_size=16):
    KA.set_calibrate_state(q, True)
    out = q.predict(x, batch_size=batch_size, verbose=0)
    KA.set_calibrate_state(q, False)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A calibrated tiny model, its saved weights and the exported files (shared)."""
    tmp = tmp_path_factory.mktemp("keras_export")
    cfg = write_cfg(tmp, tiny(), quantize=["c1", "dw", "sep", "fc"])  # pw stays float
    q = optimize(tiny(), cfg)
    calibrate(q, data(64))
    q.save_weights(str(tmp / "quant.weights.h5"))
    files = KE.generate_final_model(q, str(cfg), None, str(tmp / "out"))
    return q, cfg, tmp, files


def _err(fn, *a, **k):
    with pytest.raises(DoptError) as ei:
        fn(*a, **k)
    msg = str(ei.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# ---- configuration ------------------------------------------------------------------

def test_config_matches_reference_format(tmp_path):
    doc = KA.generate_config_file(tiny(), str(tmp_path / "c.json"))
    on_disk = json.loads((tmp_path / "c.json").read_text())
    assert doc == on_disk
    for op in ("Conv2D", "DepthwiseConv2D", "Dense", "SeparableConv2D"):
        assert on_disk[f"quant_strategy_for op '{op}'"] == [INT8]
    assert on_disk["input_shape"] == "image:1,8,8,20"
    assert list(on_disk["layer_strategy"]) == ["c1", "dw", "pw", "sep", "fc"]
    assert on_disk["layer_strategy"]["sep"] == {"op_type": "SeparableConv2D",
                                                "quant_strategy": "float"}
    assert list(on_disk)[-1] == "layer_strategy"
    doc = KA.generate_config_file(tiny(), str(tmp_path / "d.json"), input_shape="image:4,8,8,20")
    assert doc["input_shape"] == "image:4,8,8,20"
    msg = _err(KA.generate_config_file, tiny(), str(tmp_path / "e.json"), "x:1,8,8,20")
    assert "'x'" in msg and "image" in msg and not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("edit,needles", [
    (lambda d: d["layer_strategy"].__setitem__("c9", {"op_type": "Conv2D",
                                                      "quant_strategy": INT8}), ["c9"]),
    (lambda d: d["layer_strategy"]["dw"].__setitem__("quant_strategy", "Quant_INT4-4"),
     ["dw", "Quant_INT4-4"]),
    (lambda d: d["layer_strategy"]["fc"].__setitem__("op_type", "Conv2D"), ["fc", "Dense"]),
])
def test_bad_config_names_the_layer_and_writes_nothing(tmp_path, edit, needles):
    cfg = write_cfg(tmp_path, tiny())
    doc = json.loads(cfg.read_text())
    edit(doc)
    cfg.write_text(json.dumps(doc))
    msg = _err(KA.optimize_model, tiny(), str(cfg))
    for n in needles:
        assert n in msg
    assert str(cfg) in msg
    out = tmp_path / "out"
    _err(KE.generate_final_model, tiny(), str(cfg), str(tmp_path / "missing.weights.h5"),
         str(out))
    assert not out.exists()


def test_subclassed_and_non_models_are_refused(tmp_path):
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.c = L.Conv2D(4, 3)

        def call(self, x):
            return self.c(x)
    m = Sub()
    m(np.zeros((1, 8, 8, 3), np.float32))
    assert "functional" in _err(KA.generate_config_file, m, str(tmp_path / "c.json"))
    assert "Keras model" in _err(KA.optimize_model, object(), str(tmp_path / "c.json"))
    assert not (tmp_path / "c.json").exists()


def test_narrow_conv_warns_like_torch(tmp_path):
    from dopt.npu.profile import load_profile
    from dopt.npu.rules import int8_skip_reason
    cfg = write_cfg(tmp_path, tiny(cin=3), quantize=["c1"])
    reason = int8_skip_reason(3, load_profile())
    with pytest.warns(UserWarning) as rec:
        KA.optimize_model(tiny(cin=3), str(cfg))
    msg = " ".join(str(w.message) for w in rec)
    assert f"c1 ({reason})" in msg and "training and inference" in msg


# ---- numerics -----------------------------------------------------------------------

def _single(layer, shape, lo, hi, tmp_path):
    inp = keras.Input(shape, name="x")
    m = keras.Model(inp, layer(inp))
    rng = np.random.default_rng(7)
    for v in layer.weights:
        v.assign(rng.standard_normal(v.shape).astype(np.float32) * 0.3)
    q = optimize(m, write_cfg(tmp_path, m))
    w = next(KL.quant_wrappers(q))
    w.acts[0].lo.assign(lo)
    w.acts[0].hi.assign(hi)
    w.acts[0].initialized.assign(1.0)
    return q, w


def test_dense_inference_is_the_npu_int8_layer_bit_for_bit(tmp_path):
    q, w = _single(L.Dense(24, name="fc"), (40,), -2.5, 3.0, tmp_path)
    x = data(50, shape=(40,)) * 1.5
    x[:3] = [[0.5 * 5.5 / 255] * 40, [-100.0] * 40, [100.0] * 40]  # a tie, clamps
    kernel, bias = w.layer.kernel.numpy(), w.layer.bias.numpy()
    s, o = nm.activation_qparams(-2.5, 3.0)
    s_w = nm.weight_scales(kernel, axis=1)
    want = nm.int8_linear(x.astype(np.float16).astype(np.float32), kernel.T, bias, s, o, s_w)
    got = q.predict(x, verbose=0)
    assert np.array_equal(got, want.astype(np.float32))
    assert np.array_equal(q(x).numpy(), got)
    # float32 fake-quant (what QDQ computes): the core's quantizers, float arithmetic
    KL.set_switch(q, "npu_edges", False)
    xf = nm.fake_quant_activation(x, s, o)
    ref = xf @ nm.fake_quant_weight(kernel, s_w, axis=1) \
        + nm.quantize_bias(bias, s, s_w) * nm.bias_scales(s, s_w)
    np.testing.assert_allclose(q(x).numpy(), ref, rtol=1e-5, atol=1e-5)
    assert [float(v) for v in w.quantized_params(w.parts[0], s)[2].numpy()] == \
        [float(v) for v in s_w]


def _int_conv(xi, wi):
    """Valid, stride-1 NHWC convolution on integers (int64)."""
    kh, kw = wi.shape[:2]
    win = np.lib.stride_tricks.sliding_window_view(xi, (kh, kw), axis=(1, 2))
    return np.einsum("nijcab,abco->nijo", win.astype(np.int64), wi.astype(np.int64))


def test_conv_inference_is_the_npu_int8_layer_bit_for_bit(tmp_path):
    q, w = _single(L.Conv2D(8, 3, name="conv"), (6, 6, 20), -1.0, 4.0, tmp_path)
    x = data(6, shape=(6, 6, 20)) * 2
    kernel, bias = w.layer.kernel.numpy(), w.layer.bias.numpy()
    s, o = nm.activation_qparams(-1.0, 4.0)
    s_w = nm.weight_scales(kernel, axis=3)
    qx = nm.quantize_activation(x.astype(np.float16), s, o).astype(np.int64) - o
    acc = _int_conv(qx, nm.quantize_weight(kernel, s_w, axis=3)) + nm.quantize_bias(bias, s, s_w)
    want = (acc.astype(np.int32).astype(np.float32) * nm.bias_scales(s, s_w)).astype(np.float16)
    assert np.array_equal(q.predict(x, verbose=0), want.astype(np.float32))
    # the tf quantizers are the core's
    wq = fq.fake_quant_weight(kernel, fq.weight_scales(kernel)).numpy()
    assert np.array_equal(wq, nm.fake_quant_weight(kernel, s_w, axis=3))
    xs = fq.fake_quant_activation(tf.constant(x), tf.constant(-1.0), tf.constant(4.0)).numpy()
    assert np.array_equal(xs, nm.fake_quant_activation(x, s, o))


# ---- calibration and QAT ------------------------------------------------------------

def test_calibration_with_predict_sets_the_observer_ranges(tmp_path):
    model = tiny()
    q = optimize(tiny(), write_cfg(tmp_path, model, dopt_options={"activation_range":
                                                                   "percentile"}))
    x = data(48)
    out = calibrate(q, x, batch_size=16)
    # calibration passes are the float network (BN with moving statistics)
    np.testing.assert_allclose(out, model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    feats = keras.Model(model.inputs, model.get_layer("r3").output).predict(x, verbose=0)
    want = {}
    for key, batches in (("c1", x), ("fc", feats.mean((1, 2)))):
        obs = PercentileObserver()
        for i in range(0, len(x), 16):
            obs.update(batches[i:i + 16])
        want[key] = obs.range()
    got = KA.ranges(q)
    for key, (lo, hi) in want.items():
        assert got[key] == pytest.approx((lo, hi), rel=1e-6, abs=1e-7), key
    assert all(v is not None for v in got.values()) and "sep/pointwise" in got
    # model(x) collects too, with no retracing needed between modes
    KA.set_calibrate_state(q, True)
    q(x * 3)
    KA.set_calibrate_state(q, False)
    assert KA.ranges(q)["c1"][1] > got["c1"][1]


def test_qat_with_fit_initializes_and_moves_ranges(tmp_path):
    q = optimize(tiny(), write_cfg(tmp_path, tiny()))
    assert KA.ranges(q)["fc"] is None
    x, y = data(64), np.random.default_rng(2).integers(0, 5, 64)
    first = q.get_layer("c1")
    obs = MinMaxObserver()
    obs.update(x[:32])
    q.compile(optimizer=keras.optimizers.SGD(0.5),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.train_on_batch(x[:32], y[:32])  # no calibration: the first batch sets the range
    lo, hi = obs.range()
    c1_lo = float(first.acts[0].lo.numpy())
    assert c1_lo != 0.0 and c1_lo == pytest.approx(lo, abs=0.05)
    before = KA.ranges(q)
    mm = q.get_layer("sep").bn.moving_mean.numpy().copy()
    q.fit(x * 4, y, batch_size=32, epochs=2, verbose=0)
    after = KA.ranges(q)
    assert all(v is not None for v in after.values())
    assert any(after[k] != before[k] for k in after)
    assert not np.array_equal(mm, q.get_layer("sep").bn.moving_mean.numpy())  # BN updates
    KA.freeze_bn_stats(q)
    mm = q.get_layer("sep").bn.moving_mean.numpy().copy()
    q.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert np.array_equal(mm, q.get_layer("sep").bn.moving_mean.numpy())


def test_qat_with_a_gradient_tape_loop(tmp_path):
    q = optimize(tiny(), write_cfg(tmp_path, tiny()))
    x, y = data(32), np.random.default_rng(3).integers(0, 5, 32)
    calibrate(q, x)
    opt = keras.optimizers.SGD(0.5)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = 100 * loss_fn(yb, q(xb, training=True)) + 0.05 * KA.get_quant_loss(q)
        grads = tape.gradient(loss, q.trainable_weights)
        opt.apply_gradients(zip(grads, q.trainable_weights))
        return loss

    fc = q.get_layer("fc")
    hi0, k0 = float(fc.acts[0].hi.numpy()), fc.layer.kernel.numpy().copy()
    for _ in range(2):
        step(x, y)
    assert float(fc.acts[0].hi.numpy()) != hi0
    assert not np.array_equal(fc.layer.kernel.numpy(), k0)


def test_quant_loss(tmp_path):
    q0 = optimize(tiny(), write_cfg(tmp_path, tiny(), quantize=[]))
    assert float(KA.get_quant_loss(q0)) == 0.0
    q = optimize(tiny(), write_cfg(tmp_path, tiny(), name="c2.json"))
    w = q.get_layer("sep").layer.pointwise_kernel
    with tf.GradientTape() as tape:
        ql = KA.get_quant_loss(q)
    assert 0 < float(ql) < 0.25
    assert tape.gradient(ql, w) is not None


def test_bn_folding_in_inference_is_the_folded_conv(tmp_path):
    model = tiny()
    q = optimize(tiny(), write_cfg(tmp_path, model))
    calibrate(q, data(32))
    w = q.get_layer("c1")
    x = data(8)
    kernel = model.get_layer("c1").kernel.numpy()
    bn = model.get_layer("bn1")
    f = (bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)).astype(np.float32)
    wf, bf = w.folded(w.parts[0])
    np.testing.assert_allclose(wf.numpy(), kernel * f, rtol=1e-6)
    np.testing.assert_allclose(bf.numpy(), bn.beta.numpy() - bn.moving_mean.numpy() * f,
                               rtol=1e-6, atol=1e-7)
    # float32 inference of the wrapper = the folded conv with its fake-quant weight and bias
    lo, hi = w.acts[0].lo.numpy(), w.acts[0].hi.numpy()
    s, o = nm.activation_qparams(lo, hi)
    s_w = nm.weight_scales(wf.numpy(), axis=3)
    conv = L.Conv2D(24, 3, padding="same")
    conv.build((None, 8, 8, 20))
    conv.kernel.assign(nm.fake_quant_weight(wf.numpy(), s_w, axis=3))
    conv.bias.assign(nm.quantize_bias(bf.numpy(), s, s_w) * nm.bias_scales(s, s_w))
    KL.set_switch(q, "npu_edges", False)
    got = w(x, training=False).numpy()
    want = conv(nm.fake_quant_activation(x, s, o)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sequential_model(tmp_path):
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((8, 8, 20)), L.Conv2D(20, 3, name="a"),
                          L.BatchNormalization(name="a_bn"), L.ReLU(),
                          L.Conv2D(24, 3, name="b"), L.Flatten(), L.Dense(4, name="d")])
    q = optimize(m, write_cfg(tmp_path, m))
    assert isinstance(q.get_layer("a"), KL.QuantWrapper) and q.get_layer("a").bn_name == "a_bn"
    x = data(16)
    calibrate(q, x)
    assert KA.ranges(q)["a"] == (float(x.min()), float(x.max()))  # minmax: exactly the data's
    assert q.predict(data(4), verbose=0).shape == (4, 4)


# ---- convolutions the NPU runs in FP16 although INT8 is asked (Cin too small) ----------

def narrow_net(seed=0):
    """c1 (Cin 3) + BN and the pointwise half of sep (Cin 12) + BN run in FP16 on the NPU;
    sep's depthwise half (exempt), wide (Cin 24) and fc run in INT8."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(6, 3, padding="same", use_bias=False, name="c1")(inp)
    x = L.ReLU(name="r1")(L.BatchNormalization(name="bn1")(x))
    x = L.SeparableConv2D(24, 3, padding="same", depth_multiplier=2, name="sep")(x)
    x = L.ReLU(name="r2")(L.BatchNormalization(name="bn_sep")(x))
    x = L.Conv2D(24, 1, activation="relu", name="wide")(x)
    x = L.Dense(5, name="fc")(L.GlobalAveragePooling2D(name="gap")(x))
    m = keras.Model(inp, x, name="narrow")
    rng = np.random.default_rng(seed)
    for layer in m.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape
            layer.moving_mean.assign(rng.uniform(-0.5, 0.5, n))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n))
            layer.gamma.assign(rng.uniform(0.5, 1.5, n))
    return m


@pytest.fixture(scope="module")
def narrow_q(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keras_narrow")
    cfg = write_cfg(tmp, narrow_net())
    with pytest.warns(UserWarning) as rec:
        q = KA.optimize_model(narrow_net(), str(cfg))
    msg = " ".join(str(w.message) for w in rec)
    assert "c1 (Cin=3" in msg and "sep/pointwise (Cin=12" in msg
    calibrate(q, data(64, shape=(8, 8, 3)))
    return q, cfg, tmp


def test_narrow_parts_have_no_quantizer_and_run_the_npu_fp16_kernel(narrow_q):
    q, _, _ = narrow_q
    c1, sep = q.get_layer("c1"), q.get_layer("sep")
    assert [p.npu_fp16 for p in c1.parts] == [True] and c1.acts == []
    assert [p.npu_fp16 for p in sep.parts] == [False, True] and len(sep.acts) == 1
    assert set(KA.ranges(q)) == {"sep", "wide", "fc"}
    ref = narrow_net()
    bn = ref.get_layer("bn1")
    f = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    wf = ref.get_layer("c1").kernel.numpy() * f
    bf = bn.beta.numpy() - bn.moving_mean.numpy() * f
    h = lambda a: np.asarray(a, np.float32).astype(np.float16).astype(np.float32)  # noqa: E731
    x = data(8, shape=(8, 8, 3)) * 3
    want = h(tf.nn.conv2d(h(x), h(wf), 1, "SAME").numpy() + h(bf))
    np.testing.assert_array_equal(c1(x, training=False).numpy(), want)


def test_narrow_parts_train_as_fp16_with_straight_through_gradients(narrow_q):
    q, _, _ = narrow_q
    c1 = q.get_layer("c1")
    x = tf.constant(data(8, shape=(8, 8, 3)))
    mm = c1.bn.moving_mean.numpy().copy()
    with tf.GradientTape() as tape:
        y = c1(x, training=True)
        loss = tf.reduce_sum(y) * 1e-12  # far below FP16's smallest subnormal
    g = tape.gradient(loss, c1.layer.kernel)
    np.testing.assert_array_equal(y.numpy(), y.numpy().astype(np.float16).astype(np.float32))
    assert g is not None and np.abs(g.numpy()).min() > 0
    assert not np.array_equal(mm, c1.bn.moving_mean.numpy())  # BN statistics update
    c1.bn.moving_mean.assign(mm)


def test_narrow_parts_export_as_float_and_compile_to_fp16(narrow_q):
    from dopt.npu.compiler import compile_onnx
    from dopt.npu.profile import load_profile
    from dopt.runtime import Session
    q, cfg, tmp = narrow_q
    files = KE.generate_final_model(q, str(cfg), None, str(tmp / "out"))
    doc = P.read_params(files["param_file"])
    assert set(doc["layers"]) == {"sep/depthwise", "wide", "fc"}
    assert {"c1", "sep/pointwise"} <= set(doc["float_layers"])
    om, report = compile_onnx(onnx.load(files["float_onnx"]), load_profile(), params=doc)
    assert om.quant["int8_layers"] == ["fc", "sep/depthwise", "wide"]
    assert "int8_min_cin" not in [f["rule"] for r in report["nodes"] for f in r["findings"]]
    x = data(512, seed=4, shape=(8, 8, 3))
    got = Session(om).run(x)[om.graph["outputs"][0]["name"]]
    want = q.predict(x, verbose=0)
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.999
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()


# ---- save / load and export ----------------------------------------------------------

def test_keras_file_round_trip_gives_identical_outputs(exported, tmp_path):
    q, cfg, tmp, _ = exported
    q.save(str(tmp_path / "q.keras"))
    q2 = keras.saving.load_model(str(tmp_path / "q.keras"), safe_mode=True)
    x = data(16, seed=9)
    assert np.array_equal(q(x).numpy(), q2(x).numpy())
    assert KA.ranges(q2) == KA.ranges(q)
    q3 = optimize(tiny(), cfg)
    q3.load_weights(str(tmp / "quant.weights.h5"))
    assert np.array_equal(q(x).numpy(), q3(x).numpy())


def test_generate_final_model_writes_four_checked_files(exported):
    q, _, tmp, files = exported
    assert sorted(os.listdir(tmp / "out")) == ["model_fused.keras", "model_fused.onnx",
                                               "model_qdq.onnx", "quant_param.json"]
    doc = P.read_params(files["param_file"])
    assert doc["producer"]["framework"] == "keras"
    assert set(doc["layers"]) == {"c1", "dw", "sep/depthwise", "sep/pointwise", "fc"}
    assert "pw" in doc["float_layers"]
    dw, pw = doc["layers"]["sep/depthwise"], doc["layers"]["sep/pointwise"]
    assert dw["source_layer"] == pw["source_layer"] == "sep"
    assert len(dw["weight"]["scales"]) == 48 and len(pw["weight"]["scales"]) == 32
    assert dw["folded_bn"] is None and pw["folded_bn"] == "bn_sep"
    assert doc["layers"]["c1"]["folded_bn"] == "bn1"
    fused = onnx.load(files["float_onnx"])
    nodes = {n.name: n for n in fused.graph.node}
    assert "BatchNormalization" not in [n.op_type for n in fused.graph.node]
    for name, rec in doc["layers"].items():
        assert rec["input"]["tensor"] == nodes[name].input[0]
        assert rec["weight"]["tensor"] == nodes[name].input[1]
    s, o = q.get_layer("dw").acts[0].qparams()
    assert doc["layers"]["dw"]["input"]["scale"] == s and doc["layers"]["dw"]["input"]["offset"] == o
    assert nodes["fc"].op_type == "Gemm" and doc["layers"]["fc"]["bias"] is not None
    # the fused Keras model is a plain float model (no dopt layers needed to load it)
    fk = keras.saving.load_model(files["float_keras"], safe_mode=True)
    assert not KA.is_quantized(fk) and "bn1" not in [type(x).__name__ for x in fk.layers]


def _numbers(param_file):
    """Records without tensor names (those carry the traced model's scope name)."""
    layers = P.read_params(param_file)["layers"]
    return {k: (v["input"]["scale"], v["input"]["offset"], v["input"]["range"],
                v["weight"]["scales"], v["bias"] is None, v["folded_bn"])
            for k, v in layers.items()}


def test_float_model_plus_weights_gives_the_same_export(exported, tmp_path):
    q, cfg, tmp, files = exported
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = KE.generate_final_model(tiny(), str(cfg), str(tmp / "quant.weights.h5"),
                                        str(tmp_path / "o"))
    assert _numbers(again["param_file"]) == _numbers(files["param_file"])
    q.save(str(tmp_path / "q.keras"))
    third = KE.generate_final_model(tiny(), str(cfg), str(tmp_path / "q.keras"),
                                    str(tmp_path / "o3"))
    assert _numbers(third["param_file"]) == _numbers(files["param_file"])


def test_compiled_model_on_the_emulated_npu_agrees_with_fake_quant(exported):
    q, _, tmp, files = exported
    om = tmp / "m"
    r = subprocess.run([sys.executable, "-W", "ignore", "-m", "dopt", "omg", "--mode", "0",
                        "--framework", "5", "--model", files["float_onnx"],
                        "--compress_conf", files["param_file"], "--output", str(om)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    from dopt.runtime import load
    sess = load(str(om) + ".om")
    x = data(200, seed=11)
    got = sess.run(x)[sess.outputs[0]]
    want = q.predict(x, verbose=0)  # inference mode: NPU edges on
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.99
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def test_export_errors_leave_nothing(exported, tmp_path):
    q, cfg, tmp, _ = exported
    out = tmp_path / "out"
    fresh = optimize(tiny(), cfg)
    assert "no activation range" in _err(KE.generate_final_model, fresh, str(cfg), None, str(out))
    tiny().save_weights(str(tmp_path / "float.weights.h5"))
    _err(KE.generate_final_model, tiny(), str(cfg), str(tmp_path / "float.weights.h5"), str(out))
    assert "weights file" in _err(KE.generate_final_model, tiny(), str(cfg), None, str(out))
    other = write_cfg(tmp_path, tiny(), quantize=["fc"], name="other.json")
    assert "disagree" in _err(KE.generate_final_model, q, str(other), None, str(out))
    assert not out.exists()
