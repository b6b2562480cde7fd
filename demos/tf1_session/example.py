"""The reference's "TensorFlow Quant_INT8-8 plugin quantization demo", on Fashion-MNIST.

    python -m demos.tf1_session.example            # or: python demos/tf1_session/example.py
    python -m demos.tf1_session.example --out /tmp/tf1_demo --epochs 1

Same program structure as the reference (generate_config -> train_model / calibrate_model
-> generate_params), same API (``dopt.dopt_tf.opt_main``), a small depthwise CNN written
with ``tf.compat.v1`` variables and ``tf.nn`` ops. Lines changed because TensorFlow 2.21
forces it are marked ``# TF 2.21:``. Step 0 (a float baseline checkpoint) is a
prerequisite in the reference; here it is trained in a few seconds if missing. Step 4 is
dopt's: compile the result with ``dopt omg --framework 3`` and run the emulated NPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))   # the reference: sys.path.append(".../dopt_tf_py3")

import tensorflow as tf  # noqa: E402

from demos.fashion_mnist import data  # noqa: E402

# TF 2.21: the TF1 API lives under tf.compat.v1 (tf.Session, tf.placeholder, tf.train.Saver)
v1 = tf.compat.v1
config = v1.ConfigProto(intra_op_parallelism_threads=2, inter_op_parallelism_threads=2)
BATCH = 64


def build_tf_model(training=False):
    """The float graph: input ``input`` (N, 28, 28, 1), output ``output`` (N, 10) logits.

    # TF 2.21: tf.compat.v1.layers is gone with Keras 3; layers are get_variable + tf.nn ops.
    # TF 2.21: BatchNorm is tf.compat.v1.nn.fused_batch_norm; the graph that is quantized
    # uses is_training=False (statistics frozen during QAT) so that dopt folds it into the
    # convolution; training=True is only for the float baseline (step 0).
    """
    x = v1.placeholder(tf.float32, [None, 28, 28, 1], name="input")
    updates = []

    def conv_bn_relu(name, y, k, cout, stride=1, depthwise=False):
        with v1.variable_scope(name):
            cin = y.shape[-1]
            if depthwise:
                w = v1.get_variable("depthwise_kernel", [k, k, cin, 1])
                y = tf.nn.depthwise_conv2d(y, w, [1, stride, stride, 1], "SAME")
                cout = cin
            else:
                w = v1.get_variable("kernel", [k, k, cin, cout])
                y = tf.nn.conv2d(y, w, stride, "SAME")
            gamma = v1.get_variable("gamma", [cout], initializer=v1.ones_initializer())
            beta = v1.get_variable("beta", [cout], initializer=v1.zeros_initializer())
            mean = v1.get_variable("moving_mean", [cout], trainable=False,
                                   initializer=v1.zeros_initializer())
            var = v1.get_variable("moving_variance", [cout], trainable=False,
                                  initializer=v1.ones_initializer())
            if training:
                y, m, v = v1.nn.fused_batch_norm(y, gamma, beta, is_training=True)
                updates.append(mean.assign(0.9 * mean + 0.1 * m))
                updates.append(var.assign(0.9 * var + 0.1 * v))
            else:
                y, _, _ = v1.nn.fused_batch_norm(y, gamma, beta, mean, var, is_training=False)
            return tf.nn.relu(y)

    with v1.variable_scope("model"):
        y = conv_bn_relu("conv1", x, 3, 32)
        y = conv_bn_relu("dw1", y, 3, 0, 2, depthwise=True)            # 14 x 14
        y = conv_bn_relu("pw1", y, 1, 64)
        y = conv_bn_relu("dw2", y, 3, 0, 2, depthwise=True)            # 7 x 7
        y = conv_bn_relu("pw2", y, 1, 128)
        y = tf.reduce_mean(y, axis=[1, 2])
        with v1.variable_scope("fc"):
            w = v1.get_variable("kernel", [128, 10])
            b = v1.get_variable("bias", [10], initializer=v1.zeros_initializer())
            y = tf.nn.bias_add(tf.matmul(y, w), b)
    out = tf.identity(y, name="output")
    return x, out, updates


def load(split, limit=None):
    x, y = data.load(split, limit=limit)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y      # NCHW -> NHWC


def batches(x, y, rng, epochs):
    steps = int(len(x) * epochs) // BATCH
    order = np.concatenate([rng.permutation(len(x)) for _ in range(int(np.ceil(epochs)) or 1)])
    for i in range(steps):
        idx = order[i * BATCH:(i + 1) * BATCH]
        yield x[idx], y[idx]


def predict(sess, x, out, images, feed=None):
    return np.concatenate([sess.run(out, {x: images[i:i + 1000], **(feed or {})}).argmax(1)
                           for i in range(0, len(images), 1000)])


def evaluate_output(sess, x, out, images, labels, feed=None):
    return 100.0 * float((predict(sess, x, out, images, feed) == labels).mean())


def loss_of(out):
    labels = v1.placeholder(tf.int64, [None], name="labels")
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels,
                                                                         logits=out))
    return labels, loss


def train_float(ckpt, train, test, epochs):
    """Step 0 (a prerequisite in the reference): the float baseline checkpoint."""
    with tf.Graph().as_default(), v1.Session(config=config) as sess:
        v1.set_random_seed(0)
        x, out, updates = build_tf_model(training=True)
        labels, loss = loss_of(out)
        with tf.control_dependencies(updates):
            train_op = v1.train.AdamOptimizer(2e-3).minimize(loss)
        sess.run(v1.global_variables_initializer())
        for bx, by in batches(*train, np.random.default_rng(0), epochs):
            sess.run(train_op, {x: bx, labels: by})
        v1.train.Saver().save(sess, ckpt)
    with tf.Graph().as_default(), v1.Session(config=config) as sess:
        x, out, _ = build_tf_model()
        v1.train.Saver().restore(sess, ckpt)
        return evaluate_output(sess, x, out, *test)


def generate_config(cfg_path):
    with v1.Session(graph=tf.Graph(), config=config) as sess:   # TF 2.21: tf.compat.v1.Session
        with sess.graph.as_default():
            build_tf_model()  # the user's float graph: topology only, no weights
            from dopt.dopt_tf.opt_main import generate_config_file
            generate_config_file(sess, dst_path=str(cfg_path))
            narrow = npu_fp16_convs(sess.graph)
    # the developer's edit of the configuration: quantize every listed op the NPU runs in
    # INT8 (a convolution with Cin <= 16 runs in FP16 on the NPU whatever the file says)
    doc = json.loads(Path(cfg_path).read_text())
    for name, entry in doc["layer_strategy"].items():
        entry["quant_strategy"] = "float" if name in narrow else "Quant_INT8-8"
    Path(cfg_path).write_text(json.dumps(doc, indent=4))
    return doc, narrow


def npu_fp16_convs(graph) -> list[str]:
    """Conv2D ops the NPU would run in FP16 even if asked for INT8 (the profile's rule)."""
    from dopt.npu.profile import load_profile
    from dopt.npu.rules import int8_skipped
    profile = load_profile()
    return sorted(op.name for op in graph.get_operations() if op.type == "Conv2D"
                  and int8_skipped(int(op.inputs[1].shape[2]), 1, profile))


def train_model(cfg_path, float_ckpt, train_ckpt_path, train, test, epochs):
    with v1.Session(graph=tf.Graph(), config=config) as sess:
        with sess.graph.as_default():
            x, out, _ = build_tf_model()
            from dopt.dopt_tf.opt_main import get_quant_loss, optimize_model
            quant_flag = v1.placeholder(tf.int32)
            is_train_flag = v1.placeholder(tf.bool, name="is_train")
            ## model quantization: rewrites tf.get_default_graph() in place
            optimize_model(sess, str(cfg_path), is_train_flag, quant_flag)
            labels, loss = loss_of(out)
            # dopt addition: the weight-rounding regularizer, about 1:20 to the task loss
            optimizer = v1.train.AdamOptimizer(1e-4)
            train_op = optimizer.minimize(loss + get_quant_loss(sess) / 20)
            ## after optimize_model, load the float weights
            saver = v1.train.Saver()   # TF 2.21: tf.compat.v1.train.Saver, restore(sess, path)
            # TF 2.21: initialize BEFORE restoring; the reference's order (restore, then
            # global_variables_initializer) would reset the restored weights
            tf.compat.v1.global_variables_initializer().run()
            saver.restore(sess, float_ckpt)   # a float checkpoint: dopt ranges start unset
            ## train model
            for bx, by in batches(*train, np.random.default_rng(1), epochs):
                feed_dict = {x: bx, labels: by}
                feed_dict[is_train_flag] = True
                feed_dict[quant_flag] = 1
                sess.run(train_op, feed_dict)
            ## eval model
            pred = predict(sess, x, out, test[0], {is_train_flag: False, quant_flag: 1})
            saver.save(sess, str(train_ckpt_path))
            return 100.0 * float((pred == test[1]).mean()), pred


def calibrate_model(cfg_path, float_ckpt, calib_ckpt_path, train, test, n_calib=512):
    with v1.Session(graph=tf.Graph(), config=config) as sess:
        with sess.graph.as_default():
            x, out, _ = build_tf_model()
            from dopt.dopt_tf.opt_main import optimize_model, set_calibrate_state
            quant_flag = v1.placeholder(tf.int32)
            is_train_flag = v1.placeholder(tf.bool, name="is_train")
            optimize_model(sess, str(cfg_path), is_train_flag, quant_flag)
            saver = v1.train.Saver()
            # TF 2.21: the reference restores without initializing; dopt's own variables
            # are then initialized by dopt during the float-checkpoint restore
            saver.restore(sess, float_ckpt)
            calibration_mode = True
            set_calibrate_state(sess, calibration_mode)
            flags = {is_train_flag: False, quant_flag: 1}
            for i in range(0, n_calib, 128):
                sess.run(out, {x: train[0][i:i + 128], **flags})
            set_calibrate_state(sess, False)   # the observed ranges become the ranges
            ## eval model
            acc = evaluate_output(sess, x, out, *test, flags)
            saver.save(sess, str(calib_ckpt_path))
            return acc


def generate_params(cfg_path, ckpt, output_dir):
    with v1.Session(graph=tf.Graph(), config=config) as sess:
        with sess.graph.as_default():
            build_tf_model()
            from dopt.dopt_tf.opt_main import generate_final_model
            return generate_final_model(sess, config_file=str(cfg_path),
                                        output_name_list=["output"], ckpt_file=str(ckpt),
                                        output_dir=str(output_dir))


def compile_and_run(final: dict, out: Path, test, pred_fq) -> dict:
    """Not in the reference demo: ``dopt omg --framework 3`` with the parameter file, then the
    emulated NPU on the test set, compared with the fake-quant model's predictions."""
    from dopt import runtime
    from dopt.npu import omg
    om = out / "output_dir" / "model_int8"
    args = ["--mode", "0", "--framework", "3", "--model", final["frozen_pb"],
            "--output", str(om), "--input_shape", "input:1,28,28,1", "--out_nodes", "output:0",
            "--compress_conf", final["param_file"]]
    print(f"$ dopt omg {' '.join(args)}")
    omg.main(args)
    pred = runtime.load(f"{om}.om").predict(test[0], batch_size=500).argmax(1)
    return {"acc": 100.0 * float((pred == test[1]).mean()),
            "agree": 100.0 * float((pred == pred_fq).mean())}


def frozen_accuracy(pb, test):
    gd = v1.GraphDef()
    gd.ParseFromString(Path(pb).read_bytes())
    with tf.Graph().as_default() as g:
        tf.import_graph_def(gd, name="")
        with v1.Session(graph=g, config=config) as sess:
            return evaluate_output(sess, g.get_tensor_by_name("input:0"),
                                   g.get_tensor_by_name("output:0"), *test)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "out"), help="working folder")
    ap.add_argument("--float-epochs", type=float, default=8.0,
                    help="epochs of the float baseline (step 0, only if missing)")
    ap.add_argument("--epochs", type=float, default=1.0, help="QAT epochs")
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--no-npu", action="store_true", help="skip dopt omg + emulated NPU")
    args = ap.parse_args(argv)
    out = Path(args.out)
    (out / "output_dir").mkdir(parents=True, exist_ok=True)   # the reference: must exist
    train, test = load("train", args.train_limit), load("test", args.test_limit)
    t0 = time.time()
    res = {}
    float_ckpt = out / "float" / "model.ckpt"
    if not (out / "float" / "model.ckpt.index").is_file():
        res["float"] = train_float(str(float_ckpt), train, test, args.float_epochs)
    else:
        with tf.Graph().as_default(), v1.Session(config=config) as sess:
            x, o, _ = build_tf_model()
            v1.train.Saver().restore(sess, str(float_ckpt))
            res["float"] = evaluate_output(sess, x, o, *test)
    print(f"float accuracy                 {res['float']:.2f} %")
    cfg = out / "config_gen.json"
    ## step 1: integration, configuration edit
    doc, narrow = generate_config(cfg)
    print(f"configuration: {len(doc['layer_strategy']) - len(narrow)} ops set to Quant_INT8-8 "
          f"in {cfg}" + (f" ({', '.join(narrow)} float: Cin <= 16)" if narrow else ""))
    ## step 2: calibrate (no training) and/or train (QAT) the quantized model
    res["calibrated"] = calibrate_model(cfg, str(float_ckpt), out / "calib" / "model.ckpt",
                                        train, test)
    print(f"quantized, calibrated (PTQ)    {res['calibrated']:.2f} %")
    res["qat"], pred_fq = train_model(cfg, str(float_ckpt), out / "qat" / "model.ckpt", train,
                                      test, args.epochs)
    print(f"quantized, trained (QAT)       {res['qat']:.2f} %")
    ## step 3: extract the parameters for deployment
    final = generate_params(cfg, out / "qat" / "model.ckpt", out / "output_dir")
    res["frozen_float"] = frozen_accuracy(final["frozen_pb"], test)
    print(f"frozen .pb (float, BN folded)  {res['frozen_float']:.2f} %")
    print(f"wrote {final['frozen_pb']} and {final['param_file']}")
    ## step 4 (dopt): compile for the NPU and run the emulated NPU
    if not args.no_npu:
        res["npu"] = compile_and_run(final, out, test, pred_fq)
        print(f"INT8 .om on the emulated NPU   {res['npu']['acc']:.2f} %, top-1 agreement with "
              f"the fake-quant model {res['npu']['agree']:.2f} %")
    print(f"({time.time() - t0:.0f} s)")
    res.update(final)
    return res


if __name__ == "__main__":
    main()
