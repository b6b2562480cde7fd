"""Knowledge-distillation loss for Keras ``model.fit`` (``dopt.distill``; the settings and
schedule are the core's ``DistillConfig``, the same as the PyTorch loss).

A Keras loss sees only ``(y_true, y_pred)``, so the teacher's logits come from a model
wrapper: ``Distiller`` runs the frozen teacher on each batch inside ``compute_loss``.

    d = dopt.distill.loss(teacher, student, temperature=4.0)   # a Distiller
    d.compile(optimizer="adam", metrics=["accuracy"])
    d.fit(x, y, epochs=2, callbacks=[d.schedule_callback(total_steps)])
    student                     # trained in place; save or quantize it as usual

``loss = ce_weight * sparse CE(labels) + kd_weight * T**2 * KL(teacher_T || student_T)``,
``kd_weight`` on the config's schedule. Intermediate-feature matching is PyTorch-only.
"""
from __future__ import annotations

import math

import keras
from keras import ops

from dopt.distill import DistillConfig
from dopt.errors import DoptError


def kd_kl(student_logits, teacher_logits, temperature: float):
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over the batch."""
    t = float(temperature)
    log_q = ops.log_softmax(ops.cast(student_logits, "float32") / t, axis=-1)
    log_p = ops.log_softmax(ops.cast(teacher_logits, "float32") / t, axis=-1)
    kl = ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)
    return ops.mean(kl) * (t * t)


class Distiller(keras.Model):
    """``student`` trained with distillation from the frozen ``teacher`` by ``fit``."""

    def __init__(self, teacher: keras.Model, student: keras.Model, config: DistillConfig):
        super().__init__()
        config = config.check()
        if config.features:
            raise DoptError("feature distillation is available for PyTorch models only",
                            field="features", hint="distil the logits (leave features empty)")
        teacher.trainable = False
        self.teacher, self.student, self.config = teacher, student, config
        self.progress = keras.Variable(0.0, trainable=False, dtype="float32", name="progress")
        self.last_parts = {}

    def call(self, x, training=False):
        return self.student(x, training=training)

    def _factor(self):
        c, p = self.config, ops.clip(self.progress, 0.0, 1.0)
        if c.schedule == "constant":
            return 1.0
        if c.schedule == "linear":
            return 1.0 + (c.final - 1.0) * p
        return c.final + (1.0 - c.final) * 0.5 * (1.0 + ops.cos(math.pi * p))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        c = self.config
        if y_pred is None:
            y_pred = self.student(x, training=training)
        teacher_logits = ops.stop_gradient(self.teacher(x, training=False))
        total = c.kd_weight * self._factor() * kd_kl(y_pred, teacher_logits, c.temperature)
        if y is not None and c.ce_weight > 0:
            ce = keras.losses.sparse_categorical_crossentropy(y, y_pred, from_logits=True)
            total = total + c.ce_weight * ops.mean(ce)
        return total

    def schedule_callback(self, total_steps: int) -> keras.callbacks.Callback:
        """Moves the schedule's progress from 0 to 1 over ``total_steps`` training batches."""
        if total_steps <= 0:
            raise DoptError("the distillation schedule needs the number of training steps",
                            field="total_steps", found=repr(total_steps))
        distiller = self

        class _Schedule(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.step = 0

            def on_train_batch_begin(self, batch, logs=None):
                distiller.progress.assign(min(self.step / total_steps, 1.0))
                self.step += 1
        return _Schedule()
