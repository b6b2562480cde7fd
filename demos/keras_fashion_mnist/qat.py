"""The Keras QAT recipe shared by the demo and the benchmark: ``model.fit`` with distillation.

The loss is cross-entropy on the labels plus ``T^2 * KL(teacher || student)`` at
temperature ``T`` against the float model's logits, computed once and carried in
``y_true`` next to the label, so a plain ``model.fit`` trains it. SGD with momentum and a
cosine learning rate; BatchNorm statistics are frozen half-way (a callback).
"""
from __future__ import annotations

import numpy as np

KD_TEMP = 2.0


def nhwc(x):
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def distill_loss(temp: float = KD_TEMP):
    import tensorflow as tf

    def loss(y_true, logits):
        label = tf.cast(y_true[:, 0], tf.int32)
        teacher = y_true[:, 1:]
        ce = tf.keras.losses.sparse_categorical_crossentropy(label, logits, from_logits=True)
        p_t = tf.nn.softmax(teacher / temp)
        log_p_s = tf.nn.log_softmax(logits / temp)
        kl = tf.reduce_sum(p_t * (tf.math.log(p_t + 1e-12) - log_p_s), axis=1)
        return ce + temp * temp * kl
    return loss


def fit_qat(qmodel, teacher, x, y, *, epochs=1.0, lr=1e-3, batch=64, seed=0,
            freeze_bn_at=0.5, verbose=0):
    """QAT of ``qmodel`` (from ``optimize_model``) with ``model.fit``; returns the history."""
    import keras
    from dopt.dopt_tf.opt_main import freeze_bn_stats

    rng = np.random.default_rng(seed)
    steps = max(1, int(epochs * len(x) / batch))
    idx = rng.integers(0, len(x), steps * batch)
    xb = x[idx].copy()
    flip = rng.random(len(xb)) < 0.5            # the float training's augmentation
    xb[flip] = xb[flip][:, :, ::-1, :]
    soft = teacher.predict(xb, batch_size=500, verbose=0)
    target = np.concatenate([y[idx][:, None].astype(np.float32), soft], axis=1)
    sched = keras.optimizers.schedules.CosineDecay(lr, steps)
    qmodel.compile(optimizer=keras.optimizers.SGD(sched, momentum=0.9), loss=distill_loss())
    freeze_step = int(freeze_bn_at * steps)

    class FreezeBN(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch_index, logs=None):
            if batch_index == freeze_step:
                freeze_bn_stats(qmodel)

    return qmodel.fit(xb, target, batch_size=batch, epochs=1, shuffle=False, verbose=verbose,
                      callbacks=[FreezeBN()])


def predict_top1(model, x, batch=500):
    return model.predict(x, batch_size=batch, verbose=0).argmax(1)
