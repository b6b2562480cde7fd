"""NASEA with TensorFlow (Keras 3) on real Fashion-MNIST images: the Keras weight-sharing
supernet, size/MACs against the built network, and the reference's command line end to end
(interrupt and resume, a result rebuilt alone into a ``.pb`` that ``dopt omg`` compiles,
bad inputs). A tiny skeleton, 384 images, 1 epoch, a population of 4 over 2 generations."""
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("optuna")
pytest.importorskip("tensorboardX")
pytest.importorskip("matplotlib")

from demos.fashion_mnist import data as fmnist  # noqa: E402
from dopt.nas.space import SearchSpace  # noqa: E402
from tests.nas_helpers import fmnist_subset, load_user_module  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demos" / "nas_fashion_mnist_tf"
N_IMAGES = 384

SCEN = """\
scenario:
  strategy:
    name: NASEA
    framework: Tensorflow
    batch_size: 32
    epochs: 1
    constraint:
      application_type: image_classification
      constraint_type: {ctype}
      constraint_value: {cval}
    supernet:
      input_shape: (28, 28, 1)
      data_format: "channels_last"
      filters: [16, 32, 32]
      strides: [2, 2, 1]
    optimizer:
      weights_optimizer:
        type: Adam
        learning_rate: 0.004
    dataset:
      train_dir: data
      val_dir: data
    searcher:
      generation_num: 2
      pop_size: 4
  resource:
    name: Tensorflow_standalone
    gpu_id: 0
"""


def _user_module():
    return load_user_module(DEMO / "user_module.py", "nas_tf_demo_um")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return fmnist_subset(tmp_path_factory.mktemp("fmnist_tf"), N_IMAGES)


def _project(tmp_path, images, ctype="size", cval=20000):
    shutil.copytree(images, tmp_path / "data")
    shutil.copy(DEMO / "user_module.py", tmp_path / "user_module.py")
    (tmp_path / "scen.yaml").write_text(SCEN.format(ctype=ctype, cval=cval))
    return tmp_path


@pytest.fixture
def nas_here(monkeypatch, capsys):
    """``dopt nas`` in this process (TensorFlow is imported already)."""
    from dopt.nas.cli import main

    def run(folder, *args):
        monkeypatch.chdir(folder)
        rc = main(["-c", "scen.yaml", "--no-progress", *args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out, err)
    return run


# --- supernet ---------------------------------------------------------------------------------


def test_extracted_subnet_computes_what_the_supernet_path_computes():
    """Every block kind: the plain Keras network ``extract`` builds runs the supernet
    path's weight slices (both normalizing with batch statistics), with the sub-net's
    channel counts."""
    from dopt_adapters.tensorflow.nas_supernet import Supernet, extract
    um = _user_module()
    keras.utils.set_random_seed(0)
    space = SearchSpace([16, 32, 32], [2, 1, 1], in_channels=16, align=16)
    sn = Supernet(space, um.PreNet(), um.PostNet())
    x = tf.random.normal((3, 28, 28, 1), seed=1)
    rng = random.Random(0)
    sn(x, space.uniform("conv3x3", narrow=False))
    for w in sn.weights:  # non-trivial BatchNorm scale/shift, so slicing mistakes show
        if w.name in ("gamma", "beta"):
            w.assign(np.random.default_rng(0).uniform(0.5, 1.5, w.shape).astype("float32"))
    kinds = set()
    for _ in range(10):
        arch = space.decode([(rng.choice(lay.blocks), rng.choice(lay.widths))
                             for lay in space.layers])
        kinds |= {b for b, *_ in arch}
        net = extract(sn, arch, um.PreNet(), um.PostNet(), (28, 28, 1))
        np.testing.assert_allclose(net(x, training=True), sn(x, arch, training=True),
                                   rtol=1e-4, atol=2e-5)
        convs = [la for la in net._flatten_layers() if isinstance(la, keras.layers.Conv2D)
                 and not isinstance(la, keras.layers.DepthwiseConv2D)]
        assert all(c.filters % 16 == 0 for c in convs)
    assert len(kinds) >= 4
    # the traced units (long trainings) compute what the eager ones do, gradients included
    arch = space.uniform("ir_k5_e6", narrow=False)
    out = []
    for traced in (False, True):
        sn.traced = traced
        with tf.GradientTape() as tape:
            y = sn(x, arch, training=True)
            loss = tf.reduce_sum(y * y)
        out.append((y, tape.gradient(loss, sn.trainable_weights)))
    sn.traced = False
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(out[0][1], out[1][1]):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_size_and_macs_are_the_built_networks(tmp_path):
    """``measure`` (the searched layers from their specs, PreNet/PostNet traced once) counts
    exactly the trainable parameters of the built network and the MACs of its graph."""
    from dopt.nas.config import load_scen
    from dopt_adapters.tensorflow.nas_backend import TensorFlowNasBackend, _graph_macs
    scen = tmp_path / "scen.yaml"
    scen.write_text(SCEN.format(ctype="size", cval=1e9))
    cfg = load_scen(str(scen), check_dirs=False)
    be = TensorFlowNasBackend(cfg, _user_module(), log=lambda *_: None)
    space = SearchSpace(cfg.filters, cfg.strides, be.in_channels(), 16)
    be.bind_space(space)
    rng = random.Random(3)
    for _ in range(6):
        arch = space.decode(
            [(rng.choice(lay.blocks), rng.choice(lay.widths)) for lay in space.layers])
        net = be._static(arch)
        got = be.measure(arch)
        assert got["params"] == sum(int(np.prod(w.shape)) for w in net.trainable_weights)
        assert got["macs"] == _graph_macs(lambda t, net=net: net(t, training=False),
                                          tf.TensorSpec((1, 28, 28, 1), tf.float32))


def test_supernet_learns_in_a_few_steps():
    """Fair steps on 256 real images: the mean loss falls clearly below chance (ln 10)."""
    from dopt.nas.sharing import fair_paths
    from dopt_adapters.tensorflow.nas_supernet import Supernet
    um = _user_module()
    keras.utils.set_random_seed(0)
    x, y = fmnist.load("train", limit=256)
    x = np.transpose(x, (0, 2, 3, 1))
    space = SearchSpace([16, 32, 32], [2, 2, 1], in_channels=16, align=16)
    sn = Supernet(space, um.PreNet(), um.PostNet())
    sn(tf.zeros((2, 28, 28, 1)), space.uniform("conv3x3"))
    sn.traced = True   # as the search trains for more than TRACE_MIN_STEPS steps
    opt = keras.optimizers.Adam(0.02)
    tvars = sn.trainable_weights
    rng, losses = random.Random(0), []
    for step in range(30):
        idx = np.random.default_rng(step).integers(0, 256, 64)
        paths = fair_paths(space, rng)
        acc = [tf.zeros_like(v) for v in tvars]
        total = 0.0
        for p, xb, yb in zip(paths, np.array_split(x[idx], len(paths)),
                             np.array_split(y[idx], len(paths))):
            with tf.GradientTape() as tape:
                loss = um.UserModule(1, 64).loss_op(yb, sn(xb, p, training=True))
                part = loss * len(xb) / 64
            grads = tape.gradient(part, tvars)
            acc = [a if g is None else a + g for a, g in zip(acc, grads)]
            total += float(loss) * len(xb) / 64
        opt.apply_gradients(zip(acc, tvars))
        losses.append(total)
    assert sum(losses[-8:]) / 8 < 2.0, losses


# --- command line -----------------------------------------------------------------------------


def test_interrupt_resume_result_alone_and_omg(tmp_path, images, nas_here):
    """A run stopped after 2 evaluations, then the same command completes the study without
    training the supernet again; a result copied next to user_module.py rebuilds alone into
    a frozen ``.pb`` (with the weights the search evaluated: same accuracy on the validation
    split) that ``dopt omg --framework 3`` compiles."""
    proj = _project(tmp_path, images)
    r = nas_here(proj, "--max-evals", "2")
    assert r.returncode == 0, r.stderr
    assert "running on the CPU" in r.stderr and "partial" in r.stdout
    ckpt = proj / "nas_state" / "supernet.npz"
    stamp = ckpt.stat().st_mtime_ns
    r = nas_here(proj)
    assert r.returncode == 0, r.stderr
    assert "complete: 8/8 evaluations" in r.stdout, r.stdout
    assert ckpt.stat().st_mtime_ns == stamp and "resuming supernet" not in r.stderr
    import csv
    import json
    rows = list(csv.DictReader(open(proj / "results" / "candidates.csv")))
    assert len({r["arch"] for r in rows}) == len(rows) >= 4     # no network evaluated twice
    assert all(int(r["params"]) == int(float(r["constraint"])) <= 20000 for r in rows)
    front = json.loads((proj / "results" / "candidates.json").read_text())["pareto"]
    events = b"".join(p.read_bytes() for p in (proj / "log_classification").iterdir())
    for tag in (b"loss", b"lr", b"pareto/accuracy", b"search/accuracy"):
        assert tag in events

    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("model_arch_result_0.py", "model_arch_result_0.supernet.npz"):
        shutil.copy(proj / "results" / name, alone)
    shutil.copy(proj / "user_module.py", alone)
    env = dict(os.environ, PYTHONPATH="", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "model_arch_result_0.py"], cwd=alone, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (alone / "model_arch_result_0.weights.h5").is_file()
    assert any((alone / "model_arch_result_0_graph").iterdir())
    # the frozen graph computes the search's sub-net: its accuracy on the validation split
    gd = tf.compat.v1.GraphDef()
    gd.ParseFromString((alone / "model_arch_result_0.pb").read_bytes())
    fn = tf.compat.v1.wrap_function(lambda: tf.compat.v1.import_graph_def(gd, name=""), [])
    out = fn.graph.get_tensor_by_name("Identity:0")
    run = fn.prune(fn.graph.get_tensor_by_name("input:0"), out)
    um = _user_module().UserModule(1, 32)
    ds, n = um.build_dataset_search(str(proj / "data"), False)
    hits = sum(int(np.sum(np.argmax(run(x).numpy(), -1) == y.numpy())) for x, y in ds.unbatch()
               .batch(1))
    assert abs(hits - front[0]["accuracy"] * n) <= 1    # batch 1 here, 32 in the search
    om = subprocess.run([sys.executable, "-m", "dopt", "omg", "--model",
                         "model_arch_result_0.pb", "--framework", "3", "--output", "m0",
                         "--input_shape", "input:1,28,28,1"], cwd=alone, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert om.returncode == 0, om.stderr[-2000:]
    assert (alone / "m0.om").is_file()
    est = f"{front[0]['latency_fp16_ms']:.3f} ms"
    assert est in om.stdout, (est, om.stdout[-500:])


def test_bad_inputs_name_the_method_or_key(tmp_path, images, nas_here):
    proj = _project(tmp_path, images)
    scen = (proj / "scen.yaml").read_text()
    um = (proj / "user_module.py").read_text()
    (proj / "user_module.py").write_text(um.replace("def metrics_op", "def metric_op"))
    r = nas_here(proj)
    assert r.returncode == 2 and "UserModule has no method metrics_op" in r.stderr
    (proj / "user_module.py").write_text(um.replace(
        "class PostNet(tf.keras.layers.Layer):", "class PostNet:").replace(
        "        super().__init__()\n        self.pool", "        self.pool"))
    r = nas_here(proj)
    assert r.returncode == 2 and "PostNet is not a Keras layer" in r.stderr
    (proj / "user_module.py").write_text(um.replace(
        "return ds.batch(self.batch_size, drop_remainder=is_training), len(x)",
        "return ds.batch(self.batch_size)"))
    r = nas_here(proj)
    assert r.returncode == 2 and "must return (dataset, data_num)" in r.stderr
    (proj / "user_module.py").write_text(um)
    (proj / "scen.yaml").write_text(scen.replace('data_format: "channels_last"',
                                                 'data_format: "channels_first"').replace(
        "(28, 28, 1)", "(1, 28, 28)"))
    r = nas_here(proj)
    assert r.returncode == 2 and "channels_last only" in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in proj.iterdir()) == ["data", "scen.yaml", "user_module.py"]


def test_ctrl_c_in_supernet_training_resumes_mid_epoch(tmp_path, images, nas_here):
    """Ctrl-C in step 6 of 10: exit 130 with the resume hint and a checkpoint after step 5
    holding the optimizer's state; the same command continues from step 5. The user module
    here answers in other forms the reference's interface allows: a Keras learning-rate
    schedule, per-sample losses and per-sample accuracies."""
    proj = _project(tmp_path, images)
    scen = (proj / "scen.yaml").read_text().replace("generation_num: 2", "generation_num: 1")
    (proj / "scen.yaml").write_text(scen.replace("pop_size: 4", "pop_size: 2"))
    um = (proj / "user_module.py").read_text()
    um = um.replace("        total = max(1, self.epoch * self.steps_per_epoch)\n",
                    "        return tf.keras.optimizers.schedules.CosineDecay(lr_init, 10)\n")
    um = um.replace("        hits = tf.equal(", "        return tf.keras.metrics."
                    "sparse_categorical_accuracy(inputs, outputs)\n        hits = tf.equal(")
    um = um.replace("        return tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(",
                    "        return (tf.keras.losses.sparse_categorical_crossentropy(")
    assert um.count("CosineDecay") == um.count("sparse_categorical_accuracy") == 1
    (proj / "user_module.py").write_text(um.replace(
        "    def loss_op(self, labels, logits):\n",
        "    def loss_op(self, labels, logits):\n"
        "        import os\n"
        "        self.seen = getattr(self, 'seen', 0) + len(labels)\n"
        "        if self.seen > 5 * 32 and os.environ.get('STOP_AT_6'):\n"
        "            raise KeyboardInterrupt\n"))
    os.environ["STOP_AT_6"] = "1"
    try:
        r = nas_here(proj)
    finally:
        del os.environ["STOP_AT_6"]
    assert r.returncode == 130 and "run the same command again to resume" in r.stderr
    with np.load(proj / "nas_state" / "supernet.npz", allow_pickle=False) as z:
        assert list(z["position"]) == [0, 5]
        assert any(k.startswith("o") for k in z.files)   # Adam's moments travel with it
    assert not (proj / "results").exists()
    r = nas_here(proj)
    assert r.returncode == 0, r.stderr
    assert "resuming supernet training at epoch 1, step 5" in r.stderr
    assert "complete: 2/2 evaluations" in r.stdout
    with np.load(proj / "nas_state" / "supernet.npz", allow_pickle=False) as z:
        assert list(z["position"]) == [1, 0]


@pytest.mark.slow
def test_demo_runs_with_the_reference_command(tmp_path):
    """demos/nas_fashion_mnist_tf/run_release.sh (``python3 dopt_so.py -c scen.yaml``) in
    full: every evaluated candidate within the latency budget, the results rebuildable."""
    from tests.nas_helpers import run_full_demo
    run_full_demo(DEMO, tmp_path)

