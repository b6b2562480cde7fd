"""The reference's TensorFlow 1 session API (tf.compat.v1 graphs) end to end, fast.

One small CNN (conv + bias + fused BN + relu, depthwise + BN, matmul; 16x16x1 input) is
trained two float steps, then goes through the reference sequence: generate config ->
edit -> optimize_model + restore -> calibration and QAT -> save -> generate_final_model in a
fresh graph. Plus a one-MatMul graph checked bit for bit against dopt.quant.numerics, and the
bad inputs.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from dopt.quant import numerics as nm  # noqa: E402
from dopt.formats import param_file as P  # noqa: E402
from dopt.errors import DoptError  # noqa: E402
from dopt_adapters.tensorflow import tf1_api as api, tf1_export as ex  # noqa: E402

v1 = tf.compat.v1
INT8 = "Quant_INT8-8"
CONV, DW, FC = "model/conv1/Conv2D", "model/dw/depthwise", "model/fc/MatMul"


def _bn(y, c, training=False):
    g = v1.get_variable("gamma", [c], initializer=v1.ones_initializer())
    b = v1.get_variable("beta", [c], initializer=v1.zeros_initializer())
    m = v1.get_variable("moving_mean", [c], initializer=v1.zeros_initializer(), trainable=False)
    v = v1.get_variable("moving_variance", [c], initializer=v1.ones_initializer(),
                        trainable=False)
    if training:
        y, _, _ = v1.nn.fused_batch_norm(y, g, b, is_training=True)
    else:
        y, _, _ = v1.nn.fused_batch_norm(y, g, b, m, v, is_training=False)
    return y


def build_cnn(bn_training=False):
    """The user's float graph: tf.compat.v1 variables + tf.nn ops (no tf.layers in Keras 3)."""
    x = v1.placeholder(tf.float32, [None, 16, 16, 1], name="input")
    with v1.variable_scope("model"):
        with v1.variable_scope("conv1"):
            w = v1.get_variable("kernel", [3, 3, 1, 8])
            b = v1.get_variable("bias", [8], initializer=v1.constant_initializer(0.1))
            y = tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "SAME"), b)
            y = tf.nn.relu(_bn(y, 8, bn_training))
        with v1.variable_scope("dw"):
            w = v1.get_variable("kernel", [3, 3, 8, 1])
            y = tf.nn.depthwise_conv2d(y, w, [1, 2, 2, 1], "SAME")
            y = tf.nn.relu(_bn(y, 8))
        y = tf.reduce_mean(y, axis=[1, 2])
        with v1.variable_scope("fc"):
            w = v1.get_variable("kernel", [8, 10])
            b = v1.get_variable("bias", [10], initializer=v1.zeros_initializer())
            y = tf.matmul(y, w) + b      # an AddV2 bias (BiasAdd elsewhere)
    return x, tf.identity(y, name="output")


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 16, 16, 1)).astype(np.float32), rng.integers(0, 10, n)


def _loss(out):
    lab = v1.placeholder(tf.int64, [None], name="labels")
    return lab, tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=lab,
                                                                              logits=out))


def _ranges(sess):
    return {v.op.name: float(sess.run(v)) for v in v1.global_variables()
            if v.op.name.endswith(("dopt_act/lo", "dopt_act/hi"))}


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """The reference example's sequence, run once; the tests look at what it left."""
    d = tmp_path_factory.mktemp("tf1")
    X, Y = _data()
    res = {"dir": d, "X": X}
    # float model, trained two steps, saved. Every graph is seeded: the outcome (which ranges
    # a few LSQ steps move by more than a float32 ulp) must not depend on a random init
    with tf.Graph().as_default(), v1.Session() as sess:
        v1.set_random_seed(0)
        x, out = build_cnn()
        lab, loss = _loss(out)
        step = v1.train.AdamOptimizer(1e-2).minimize(loss)
        sess.run(v1.global_variables_initializer())
        for _ in range(2):
            sess.run(step, {x: X, lab: Y})
        res["float_out"] = sess.run(out, {x: X})
        res["float_ckpt"] = v1.train.Saver().save(sess, str(d / "float.ckpt"))
        api.generate_config_file(sess, str(d / "config_gen.json"))
    # the user edits the configuration
    res["config_gen"] = json.loads((d / "config_gen.json").read_text())
    cfg = json.loads((d / "config_gen.json").read_text())
    for entry in cfg["layer_strategy"].values():
        entry["quant_strategy"] = INT8
    (d / "config.json").write_text(json.dumps(cfg))
    # optimize + restore the float checkpoint, calibrate, QAT, save
    with tf.Graph().as_default() as g, v1.Session() as sess:
        v1.set_random_seed(1)
        x, out = build_cnn()
        quant_flag = v1.placeholder(tf.int32)
        is_train_flag = v1.placeholder(tf.bool, name="is_train")
        api.optimize_model(sess, str(d / "config.json"), is_train_flag, quant_flag)
        res["is_quantized"] = api.is_quantized(g)
        saver = v1.train.Saver()   # model + dopt variables (the global step comes later)
        lab, loss = _loss(out)
        qloss = api.get_quant_loss(sess)
        opt = v1.train.GradientDescentOptimizer(0.05)
        grads = opt.compute_gradients(loss + qloss / 20)
        gstep = v1.train.get_or_create_global_step()
        step = opt.apply_gradients(grads, global_step=gstep)
        sess.run(v1.global_variables_initializer())   # TF 2.21: before the restore
        saver.restore(sess, res["float_ckpt"])        # a float checkpoint: no dopt variables
        res["float_path"] = sess.run(out, {x: X, quant_flag: 0, is_train_flag: False})
        res["qloss_float"] = sess.run(qloss, {quant_flag: 0})
        api.set_calibrate_state(sess, True)
        res["calib_out"] = sess.run(out, {x: X, quant_flag: 1, is_train_flag: False})
        api.set_calibrate_state(sess, False)
        res["calibrated"] = _ranges(sess)
        feed = {x: X, lab: Y, quant_flag: 1}
        sess.run(step, {**feed, is_train_flag: False})
        res["after_frozen_step"] = _ranges(sess)
        rng = [(g_, v) for g_, v in grads if v.op.name.endswith(("dopt_act/lo", "dopt_act/hi"))]
        res["range_grads"] = {v.op.name: float(sess.run(g_, {**feed, is_train_flag: True}))
                              for g_, v in rng if g_ is not None}
        res["losses"] = [sess.run([loss, qloss, step], {**feed, is_train_flag: True})[:2]
                         for _ in range(3)]
        res["trained"] = _ranges(sess)
        res["quant_out"] = sess.run(out, {x: X, quant_flag: 1, is_train_flag: False})
        res["float_after"] = sess.run(out, {x: X, quant_flag: 0, is_train_flag: False})
        res["quant_ckpt"] = saver.save(sess, str(d / "quant.ckpt"))
        # every gradient is computed on both paths (none is a dead tensor of the path not
        # taken), so the user's train op and global step run whatever quant_flag says
        res["grads_none"] = [v.op.name for g_, v in grads if g_ is None]
        res["steps"] = []
        for mode in (0, 1):
            sess.run([g_ for g_, _ in grads], {**feed, quant_flag: mode, is_train_flag: True})
            sess.run(step, {**feed, quant_flag: mode, is_train_flag: True})
            res["steps"].append(int(sess.run(gstep)))
    # generate_final_model from a fresh float graph
    (d / "final").mkdir()
    with tf.Graph().as_default(), v1.Session() as sess:
        build_cnn()
        res["final"] = ex.generate_final_model(sess, config_file=str(d / "config.json"),
                                               output_name_list=["output"],
                                               ckpt_file=res["quant_ckpt"],
                                               output_dir=str(d / "final"))
    return res


def test_config_lists_quantizable_ops(flow):
    cfg = flow["config_gen"]
    assert cfg["layer_strategy"] == {
        CONV: {"op_type": "Conv2D", "quant_strategy": "float"},
        DW: {"op_type": "DepthwiseConv2dNative", "quant_strategy": "float"},
        FC: {"op_type": "MatMul", "quant_strategy": "float"}}
    assert cfg["quant_strategy_for op 'Conv2D'"] == [INT8]
    assert cfg["quant_strategy_for op 'MatMul'"] == [INT8]


def test_float_path_is_the_float_graph(flow):
    assert flow["is_quantized"]
    np.testing.assert_array_equal(flow["float_path"], flow["float_out"])
    np.testing.assert_array_equal(flow["calib_out"], flow["float_out"])  # calibration: float
    assert flow["qloss_float"] == 0.0


def test_calibration_sets_minmax_ranges(flow):
    X = flow["X"]
    r = flow["calibrated"]
    assert r[f"{CONV}/dopt_act/lo"] == pytest.approx(float(X.min()), abs=0)
    assert r[f"{CONV}/dopt_act/hi"] == pytest.approx(float(X.max()), abs=0)
    assert r[f"{DW}/dopt_act/lo"] == 0.0 and r[f"{DW}/dopt_act/hi"] > 0  # after a ReLU


def test_ranges_learn_only_with_is_train_flag(flow):
    assert flow["after_frozen_step"] == flow["calibrated"]  # SGD, is_train_flag False
    assert any(g != 0 for g in flow["range_grads"].values()), flow["range_grads"]
    moved = [k for k in flow["trained"] if flow["trained"][k] != flow["calibrated"][k]]
    assert moved, "no range moved in QAT"
    for loss, qloss in flow["losses"]:
        assert np.isfinite(loss) and 0.0 < qloss <= 0.25
    d = np.abs(flow["quant_out"] - flow["float_after"]).max()
    assert 0 < d < 0.1 * np.abs(flow["float_after"]).max()


def test_gradients_live_on_both_paths(flow):
    assert flow["grads_none"] == []
    assert flow["steps"][1] == flow["steps"][0] + 1 and flow["steps"][0] >= 1


def test_final_model_files(flow):
    final = flow["final"]
    doc = P.read_params(final["param_file"])
    assert doc["producer"]["framework"] == "tensorflow" and doc["model"] == "quant_model.pb"
    assert set(doc["layers"]) == {CONV, DW, FC}
    conv = doc["layers"][CONV]
    assert conv["op_type"] == "Conv2D" and conv["input"]["tensor"] == "input:0"
    assert conv["weight"]["tensor"] == f"{CONV}/weight:0" and len(conv["weight"]["scales"]) == 8
    assert conv["folded_bn"] == "model/conv1/FusedBatchNormV3"
    assert doc["layers"][DW]["op_type"] == "DepthwiseConv2dNative"
    assert doc["layers"][DW]["bias"] == {"tensor": f"{DW}/bias:0", "bits": 32}  # from the BN
    assert doc["layers"][FC]["folded_bn"] is None
    # ranges are the trained ones, scales are float32 values
    assert conv["input"]["range"] == [flow["trained"][f"{CONV}/dopt_act/lo"],
                                      flow["trained"][f"{CONV}/dopt_act/hi"]]
    for s in conv["weight"]["scales"]:
        assert float(np.float32(s)) == s

    gd = v1.GraphDef()
    with open(final["frozen_pb"], "rb") as f:
        gd.ParseFromString(f.read())
    ops = {n.name: n.op for n in gd.node}
    assert not any(o in ops.values() for o in ("FusedBatchNormV3", "VarHandleOp",
                                                "ReadVariableOp", "PyFunc", "If"))
    assert ops[CONV] == "Conv2D" and ops[f"{CONV}/weight"] == "Const"
    with tf.Graph().as_default(), v1.Session() as sess:
        tf.import_graph_def(gd, name="")
        got = sess.run("output:0", {"input:0": flow["X"]})
    np.testing.assert_allclose(got, flow["float_after"], rtol=1e-4, atol=1e-5)


def test_frozen_pb_converts_with_tf2onnx(flow):
    tf2onnx = pytest.importorskip("tf2onnx")
    ort = pytest.importorskip("onnxruntime")
    gd = v1.GraphDef()
    with open(flow["final"]["frozen_pb"], "rb") as f:
        gd.ParseFromString(f.read())
    model, _ = tf2onnx.convert.from_graph_def(gd, input_names=["input:0"],
                                              output_names=["output:0"], opset=17)
    inits = {i.name for i in model.graph.initializer}
    assert f"{CONV}/weight:0" in inits and f"{FC}/weight:0" in inits
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"input:0": flow["X"]})[0]
    np.testing.assert_allclose(got, flow["float_after"], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- bit exactness

def _fc_graph(k=16, c=4):
    x = v1.placeholder(tf.float32, [None, k], name="input")
    w = v1.get_variable("fc/kernel", [k, c])
    b = v1.get_variable("fc/bias", [c])
    return x, w, b, tf.identity(tf.nn.bias_add(tf.matmul(x, w), b), name="output")


def _quantized_fc(tmp_path, lo, hi, w_val, b_val, x_val):
    with tf.Graph().as_default() as g, v1.Session(graph=g) as sess:
        x, w, b, out = _fc_graph(*w_val.shape)
        cfg = tmp_path / "fc.json"
        api.generate_config_file(sess, str(cfg))
        doc = json.loads(cfg.read_text())
        doc["layer_strategy"]["MatMul"]["quant_strategy"] = INT8
        cfg.write_text(json.dumps(doc))
        qf, it = v1.placeholder(tf.int32), v1.placeholder(tf.bool)
        api.optimize_model(sess, str(cfg), it, qf)
        sess.run(v1.global_variables_initializer())
        sess.run(w.assign(w_val))
        sess.run(b.assign(b_val))
        api.set_calibrate_state(sess, True)
        sess.run(out, {x: np.array([[lo] * w_val.shape[0], [hi] * w_val.shape[0]],
                                   np.float32), qf: 1, it: False})
        api.set_calibrate_state(sess, False)
        ls = api.state_of(g, "test").layers["MatMul"]
        q = api.quant_params(ls.layer, ls.tensors, ls.lo.read_value(), ls.hi.read_value())
        used = sess.run({k: q[k] for k in ("scale", "offset", "s_w")})
        # is_train_flag true: plain fake-quant; false: with the NPU's FP16 edges
        return (sess.run(out, {x: x_val, qf: 1, it: True}),
                sess.run(out, {x: x_val, qf: 1, it: False}), used)


def _core_fc(lo, hi, w, b, x):
    s, o = nm.activation_qparams(lo, hi)
    s_w = nm.weight_scales(w, axis=1)
    xq = nm.fake_quant_activation(x, s, o)
    wq = nm.fake_quant_weight(w, s_w, axis=1)
    bq = nm.quantize_bias(b, s, s_w).astype(np.float32) * nm.bias_scales(s, s_w)
    return s, o, s_w, xq, wq, bq


def test_matmul_bit_exact_against_core_numerics(tmp_path):
    """Power-of-two scales make every float32 sum exact, so summation order cannot matter:
    the quantized path equals the integer reference of dopt.quant.numerics bit for bit, and with
    the NPU's FP16 edges (is_train_flag false) the core's QuantizedFullyConnection."""
    rng = np.random.default_rng(3)
    k, c = 16, 4
    lo, hi = np.float32(-1.0), np.float32(6.96875)        # scale 2**-5, offset -96
    w = rng.uniform(-1, 1, (k, c)).astype(np.float32) * np.float32(127 / 128)
    w[rng.integers(0, k, c), np.arange(c)] = np.float32(127 / 128) * np.sign(
        rng.standard_normal(c)).astype(np.float32)         # max|w_c| = 127 * 2**-7
    w[np.abs(w) > 127 / 128] = 0
    b = rng.uniform(-2, 2, c).astype(np.float32)
    x = rng.uniform(-3, 9, (64, k)).astype(np.float32)
    s, o, s_w, xq, wq, bq = _core_fc(lo, hi, w, b, x)
    assert s == np.float32(2 ** -5) and o == -96 and np.all(s_w == np.float32(2 ** -7))
    got, got_npu, used = _quantized_fc(tmp_path, lo, hi, w, b, x)
    assert (used["scale"], int(used["offset"])) == (s, o)
    np.testing.assert_array_equal(used["s_w"], s_w)
    q = nm.quantize_activation(x, s, o).astype(np.int64) - o
    acc = q @ nm.quantize_weight(w, s_w, axis=1).astype(np.int64) \
        + nm.quantize_bias(b, s, s_w).astype(np.int64)
    np.testing.assert_array_equal(got, (acc * 2.0 ** -12).astype(np.float32))
    x16 = x.astype(np.float16).astype(np.float32)   # the NPU's input data
    np.testing.assert_array_equal(got_npu, nm.int8_linear(x16, w.T, b, s, o, s_w)
                                  .astype(np.float32))


def test_matmul_random_ranges_match_core_numerics(tmp_path):
    """Arbitrary ranges and weights: the session's scales are the core's, bit for bit."""
    rng = np.random.default_rng(4)
    k, c = 12, 5
    lo, hi = np.float32(-3.8994217), np.float32(3.257199)
    w = rng.standard_normal((k, c)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    x = rng.uniform(-5, 5, (32, k)).astype(np.float32)
    s, o, s_w, xq, wq, bq = _core_fc(lo, hi, w, b, x)
    got, _, used = _quantized_fc(tmp_path, lo, hi, w, b, x)
    np.testing.assert_allclose(got, xq @ wq + bq, rtol=1e-5, atol=1e-5)
    assert (used["scale"], int(used["offset"])) == (s, o)
    np.testing.assert_array_equal(used["s_w"], s_w)


def test_matmul_transpose_b_equals_plain(tmp_path):
    """A weight stored [out, in] (transpose_b=True) quantizes per output channel too."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 3)).astype(np.float32)
    x = rng.standard_normal((10, 6)).astype(np.float32)
    outs = []
    for tb in (False, True):
        with tf.Graph().as_default() as g, v1.Session(graph=g) as sess:
            xp = v1.placeholder(tf.float32, [None, 6], name="input")
            wv = v1.get_variable("w", [3, 6] if tb else [6, 3])
            out = tf.matmul(xp, wv, transpose_b=tb)
            cfg = tmp_path / f"t{tb}.json"
            api.generate_config_file(sess, str(cfg))
            doc = json.loads(cfg.read_text())
            doc["layer_strategy"]["MatMul"]["quant_strategy"] = INT8
            cfg.write_text(json.dumps(doc))
            qf, it = v1.placeholder(tf.int32), v1.placeholder(tf.bool)
            api.optimize_model(sess, str(cfg), it, qf)
            sess.run(v1.global_variables_initializer())
            sess.run(wv.assign(w.T if tb else w))
            outs.append(sess.run(out, {xp: x, qf: 1, it: False}))
    # the MatMul kernels sum in another order with transpose_b: float32 rounding only
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- bad input

def _write_cfg(path, layers):
    path.write_text(json.dumps({"layer_strategy": layers}))
    return str(path)


def _optimize(cfg, **build):
    g = tf.Graph()
    with g.as_default(), v1.Session(graph=g) as sess:
        build_cnn(**build)
        api.optimize_model(sess, cfg, v1.placeholder(tf.bool), v1.placeholder(tf.int32))


def test_config_naming_a_missing_op(tmp_path):
    cfg = _write_cfg(tmp_path / "c.json", {"model/nope/Conv2D": {
        "op_type": "Conv2D", "quant_strategy": INT8}})
    with pytest.raises(DoptError, match="model/nope/Conv2D"):
        _optimize(cfg)


def test_unsupported_strategy(tmp_path):
    cfg = _write_cfg(tmp_path / "c.json", {CONV: {"op_type": "Conv2D",
                                                  "quant_strategy": "Quant_INT4-4"}})
    with pytest.raises(DoptError, match="Quant_INT4-4"):
        _optimize(cfg)


def test_wrong_op_type_and_training_bn(tmp_path):
    cfg = _write_cfg(tmp_path / "c.json", {CONV: {"op_type": "MatMul", "quant_strategy": INT8}})
    with pytest.raises(DoptError, match="op_type"):
        _optimize(cfg)
    cfg = _write_cfg(tmp_path / "d.json", {CONV: {"op_type": "Conv2D", "quant_strategy": INT8}})
    with pytest.raises(DoptError, match="is_training=False"):
        _optimize(cfg, bn_training=True)


def test_bad_placeholders_and_double_optimize(flow):
    cfg = str(flow["dir"] / "config.json")
    with tf.Graph().as_default() as g, v1.Session(graph=g) as sess:
        build_cnn()
        with pytest.raises(DoptError, match="quant_flag"):
            api.optimize_model(sess, cfg, v1.placeholder(tf.bool), v1.placeholder(tf.float32))
        api.optimize_model(sess, cfg, v1.placeholder(tf.bool), v1.placeholder(tf.int32))
        with pytest.raises(DoptError, match="already"):
            api.optimize_model(sess, cfg, v1.placeholder(tf.bool), v1.placeholder(tf.int32))
    with tf.Graph().as_default() as g, v1.Session(graph=g) as sess:
        build_cnn()
        with pytest.raises(DoptError, match="optimize_model"):
            api.set_calibrate_state(sess, True)
        assert not api.is_quantized(g)


def test_export_failures_write_nothing(flow, tmp_path):
    cfg = str(flow["dir"] / "config.json")
    out = tmp_path / "out"
    out.mkdir()
    cases = [(str(tmp_path / "missing.ckpt"), ["output"], "does not exist"),
             (flow["float_ckpt"], ["output"], "no activation range"),
             (flow["quant_ckpt"], ["logits"], "logits")]
    for ckpt, outputs, msg in cases:
        with tf.Graph().as_default() as g, v1.Session(graph=g) as sess:
            build_cnn()
            with pytest.raises(DoptError, match=msg):
                ex.generate_final_model(sess, cfg, outputs, ckpt, str(out))
        assert list(out.iterdir()) == []


def test_reference_order_warns_about_reinitialization(flow):
    """The reference restores, then runs global_variables_initializer(): that resets the
    restored weights, which dopt says (the documented TF 2.21 order initializes first)."""
    with tf.Graph().as_default() as g, v1.Session(graph=g) as sess:
        build_cnn()
        api.optimize_model(sess, str(flow["dir"] / "config.json"), v1.placeholder(tf.bool),
                           v1.placeholder(tf.int32))
        saver = v1.train.Saver()
        saver.restore(sess, flow["float_ckpt"])   # dopt variables initialized by dopt
        assert sess.run(v1.report_uninitialized_variables()).size == 0
        with pytest.warns(UserWarning, match="before saver.restore"):
            v1.global_variables_initializer().run()


def test_quant_loss_zero_when_nothing_quantized(flow, tmp_path):
    cfg = json.loads((flow["dir"] / "config_gen.json").read_text())
    path = tmp_path / "float.json"
    path.write_text(json.dumps(cfg))
    with tf.Graph().as_default() as g, v1.Session(graph=g) as sess:
        x, out = build_cnn()
        qf, it = v1.placeholder(tf.int32), v1.placeholder(tf.bool)
        api.optimize_model(sess, str(path), it, qf)
        loss = api.get_quant_loss(sess)
        assert sess.run(loss) == 0.0
        # float ops on the quantized path: the NPU's FP16 kernels in inference only
        sess.run(v1.global_variables_initializer())
        X = flow["X"]
        ref = sess.run(out, {x: X, qf: 0, it: False})
        np.testing.assert_array_equal(sess.run(out, {x: X, qf: 1, it: True}), ref)
        npu = sess.run(out, {x: X, qf: 1, it: False})
        np.testing.assert_array_equal(npu, npu.astype(np.float16).astype(np.float32))
        np.testing.assert_allclose(npu, ref, rtol=1e-2, atol=1e-2)
        assert not np.array_equal(npu, ref)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            api.set_calibrate_state(sess, True)
            api.set_calibrate_state(sess, False)


def test_mixed_config_export(flow, tmp_path):
    """Only the MatMul quantized: the convolutions stay float, folded in the .pb all the same,
    and listed as float_layers."""
    cfg = json.loads((flow["dir"] / "config_gen.json").read_text())
    cfg["layer_strategy"][FC]["quant_strategy"] = INT8
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(cfg))
    with tf.Graph().as_default() as g, v1.Session(graph=g) as sess:
        x, out = build_cnn()
        qf, it = v1.placeholder(tf.int32), v1.placeholder(tf.bool)
        api.optimize_model(sess, str(path), it, qf)
        saver = v1.train.Saver()
        saver.restore(sess, flow["float_ckpt"])     # the reference's calibrate_model order
        api.set_calibrate_state(sess, True)
        sess.run(out, {x: flow["X"], qf: 1, it: False})
        api.set_calibrate_state(sess, False)
        ckpt = saver.save(sess, str(tmp_path / "mixed.ckpt"))
        ref = sess.run(out, {x: flow["X"], qf: 0, it: False})
    (tmp_path / "final").mkdir()
    with tf.Graph().as_default() as g, v1.Session(graph=g) as sess:
        build_cnn()
        final = ex.generate_final_model(sess, str(path), ["output:0"], ckpt,
                                        str(tmp_path / "final"))
    doc = P.read_params(final["param_file"])
    assert set(doc["layers"]) == {FC} and doc["float_layers"] == sorted([CONV, DW])
    gd = v1.GraphDef()
    with open(final["frozen_pb"], "rb") as f:
        gd.ParseFromString(f.read())
    assert "FusedBatchNormV3" not in {n.op for n in gd.node}
    with tf.Graph().as_default() as g2, v1.Session(graph=g2) as s2:
        tf.import_graph_def(gd, name="")
        got = s2.run("output:0", {"input:0": flow["X"]})
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
