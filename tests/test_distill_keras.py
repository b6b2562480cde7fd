"""The Keras distillation loss for ``model.fit`` (same settings and schedule as PyTorch)."""
import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")

import dopt.distill  # noqa: E402
from dopt.errors import DoptError  # noqa: E402


def _net(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                             keras.layers.Dense(4)])


@pytest.mark.slow
def test_keras_distiller_matches_the_formula_and_trains_the_student():
    from dopt_adapters.tensorflow.distill import kd_kl
    teacher, student = _net(0), _net(1)
    d = dopt.distill.loss(teacher, student, temperature=2.0, ce_weight=0.0,
                          schedule="linear", final=0.5)
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    y = np.random.default_rng(1).integers(0, 4, 64)
    s, t = student(x).numpy(), teacher(x).numpy()

    def ref(a, b, temp):
        la = a / temp - np.log(np.exp(a / temp).sum(1, keepdims=True))
        lb = b / temp - np.log(np.exp(b / temp).sum(1, keepdims=True))
        return float((np.exp(lb) * (lb - la)).sum(1).mean() * temp * temp)
    assert float(kd_kl(s, t, 2.0)) == pytest.approx(ref(s, t, 2.0), rel=1e-4)
    assert float(d.compute_loss(x, y, d(x))) == pytest.approx(ref(s, t, 2.0), rel=1e-4)
    t_before = [w.copy() for w in teacher.get_weights()]
    first = float(d.compute_loss(x, y, d(x)))
    d.compile(optimizer=keras.optimizers.Adam(1e-2))
    cb = d.schedule_callback(40)
    d.fit(x, y, batch_size=16, epochs=10, verbose=0, callbacks=[cb])
    assert float(d.progress.numpy()) == pytest.approx(39 / 40)
    assert float(kd_kl(student(x), teacher(x), 2.0)) < 0.5 * first
    assert all(np.array_equal(a, b) for a, b in zip(t_before, teacher.get_weights()))


def test_keras_features_are_refused_by_name():
    with pytest.raises(DoptError, match="PyTorch models only"):
        dopt.distill.loss(_net(0), _net(1), features={"a": "b"}, feature_weight=1.0)
