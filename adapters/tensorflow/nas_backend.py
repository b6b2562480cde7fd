"""TensorFlow (Keras 3) side of NASEA (``dopt.nas.backend.NasBackend``): supernet training
in the user's ``UserModule`` (``build_dataset_search``, ``lr_scheduler``, ``loss_op``,
``metrics_op``) with Keras ``PreNet``/``PostNet`` layers, sub-net extraction with BatchNorm
statistics re-estimated, size/MACs, ONNX export for the cost model, and the
``model_arch_result_N.py`` files (they write a frozen ``.pb`` and a TensorBoard graph log).

Training is the PyTorch adapter's: every step splits its batch over the strict-fairness
paths of ``dopt.nas.sharing.fair_paths``, accumulates their gradients and applies one
optimizer step. One process; several search workers share the study (``--workers``).
Channels-last only (TensorFlow's CPU convolutions are NHWC).
"""
from __future__ import annotations

import inspect
import math
import os
import random
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from dopt.errors import DoptError
from dopt.nas.report import layers_literal, result_file
from dopt.nas.sharing import backbone_cost, fair_paths

from . import nas_blocks
from .nas_blocks import build_net
from .nas_supernet import Supernet, extract

BN_CALIB_BATCHES = 10
#: supernet steps from which tracing the units pays for itself (nas_supernet.Supernet.traced)
TRACE_MIN_STEPS = 20
CHECKPOINT_EVERY_S = 600
CHECKPOINT_NAME = "supernet.npz"


def _user_error(cls_meth: str, e: Exception, what: str) -> DoptError:
    return DoptError(f"{cls_meth} failed while {what}: {e.__class__.__name__}: {e}",
                     file="user_module.py", field=cls_meth,
                     hint="run your user_module.py on its own to debug it")


def _graph_macs(fn, spec) -> int:
    """Multiply-accumulates of the convolutions and matrix products of ``fn`` traced on
    ``spec`` (the user's PreNet and PostNet: their insides are not dopt's to know)."""
    graph = tf.function(fn).get_concrete_function(spec).graph
    macs = 0
    for op in graph.get_operations():
        if op.type in ("Conv2D", "DepthwiseConv2dNative", "MatMul", "BatchMatMulV2"):
            out = op.outputs[0].shape
            w = op.inputs[1].shape
            if not out.is_fully_defined() or not w.is_fully_defined():
                continue
            n_out = int(np.prod(out.as_list()))
            if op.type == "Conv2D":
                macs += n_out * w[0] * w[1] * w[2]
            elif op.type == "DepthwiseConv2dNative":
                macs += n_out * w[0] * w[1]
            else:
                inner = op.inputs[0].shape[-1]
                if op.get_attr("transpose_a") if op.type == "MatMul" else op.get_attr("adj_x"):
                    inner = op.inputs[0].shape[-2]
                macs += n_out * int(inner)
    return int(macs)


class TensorFlowNasBackend:
    """One per process; holds the user's module, the data and the supernet."""

    framework = "tensorflow"
    checkpoint_name = CHECKPOINT_NAME
    rank, world = 0, 1

    def __init__(self, cfg, user_module, *, log=print):
        self.cfg, self.um_mod, self.log = cfg, user_module, log
        if cfg.data_format != "channels_last":
            raise DoptError("the TensorFlow search runs channels_last only", file=cfg.path,
                            field="scenario.strategy.supernet.data_format",
                            found=cfg.data_format,
                            hint="write data_format: \"channels_last\" and give input_shape as "
                                 "(H, W, C)")
        self.device_note = self._device_note()
        keras.utils.set_random_seed(cfg.seed)
        try:
            self.um = user_module.UserModule(cfg.epochs, cfg.batch_size)
        except Exception as e:
            raise _user_error("UserModule.__init__", e, "building the user module") from None
        self.pre = self._build_user("PreNet")
        self.post = self._build_user("PostNet")
        self.supernet: Supernet | None = None
        self._data: dict = {}

    # --- setup ----------------------------------------------------------------------------
    def _device_note(self) -> str:
        gpus = tf.config.list_physical_devices("GPU")
        ids = self.cfg.gpu_ids
        if gpus:
            gpu = ids[0] if ids else 0
            if gpu >= len(gpus):
                raise DoptError(f"gpu_id {gpu} does not exist on this machine",
                                file=self.cfg.path, field="scenario.resource.gpu_id",
                                expected=f"ids below {len(gpus)}")
            try:  # only this GPU (possible while TensorFlow has not initialized them)
                tf.config.set_visible_devices(gpus[gpu], "GPU")
            except RuntimeError:
                pass
            more = (f" (one process: gpu_id {','.join(map(str, ids[1:]))} unused)"
                    if len(ids) > 1 else "")
            return f"running on GPU {gpu}{more}"
        return (f"no GPU on this machine: running on the CPU "
                f"(gpu_id {','.join(map(str, ids))} ignored)")

    def _build_user(self, name):
        try:
            m = getattr(self.um_mod, name)()
        except Exception as e:
            raise _user_error(f"{name}.__init__", e, "building it") from None
        if not isinstance(m, keras.layers.Layer):
            raise DoptError(f"{name} is not a Keras layer", file="user_module.py", field=name,
                            found=type(m).__name__,
                            hint=f"derive {name} from keras.layers.Layer (tf.keras.layers.Layer)")
        return m

    @property
    def input_hwc(self) -> tuple:
        return tuple(int(v) for v in self.cfg.input_shape)

    def _pre_out(self):
        x = tf.zeros((1,) + self.input_hwc)
        try:
            y = self.pre(x, training=False)
        except Exception as e:
            raise _user_error("PreNet.call", e, f"running on an input of shape "
                              f"{tuple(x.shape)} (input_shape of scen.yaml)") from None
        if not hasattr(y, "shape") or len(y.shape) != 4:
            raise DoptError("PreNet.call must return a 4-D tensor (N, H, W, C)",
                            file="user_module.py", field="PreNet.call",
                            found=repr(getattr(y, "shape", type(y).__name__)))
        return y

    def in_channels(self) -> int:
        return int(self._pre_out().shape[-1])

    def bind_space(self, space) -> None:
        """Build the supernet and check that PostNet takes the backbone's output."""
        self.space = space
        keras.utils.set_random_seed(self.cfg.seed)
        self.supernet = Supernet(space, self.pre, self.post)
        arch = space.uniform("conv3x3", narrow=False)
        x = tf.zeros((2,) + self.input_hwc)
        try:
            self.supernet(x, arch, training=False)
        except Exception as e:
            raise _user_error("PostNet.call", e, "taking the backbone's output (a tensor of "
                              f"{space.filters[-1]} channels)") from None
        y = self._pre_out()
        self._pre_hw = (int(y.shape[1]), int(y.shape[2]))
        h, w = self._pre_hw
        for s in space.strides:
            h, w = math.ceil(h / s), math.ceil(w / s)
        post_in = tf.TensorSpec((1, h, w, space.filters[-1]), tf.float32)
        self._fixed = {
            "params": int(sum(np.prod(v.shape) for v in
                              self.pre.trainable_weights + self.post.trainable_weights)),
            "macs": _graph_macs(lambda t: self.pre(t, training=False),
                                tf.TensorSpec((1,) + self.input_hwc, tf.float32))
            + _graph_macs(lambda t: self.post(t, training=False), post_in)}

    # --- data -----------------------------------------------------------------------------
    def check_data(self) -> None:
        self._dataset(True)
        self._dataset(False)

    def _dataset(self, training: bool):
        """``(batched dataset, images)`` from ``build_dataset_search``; an unbatched
        dataset (one image per element) is batched here with ``batch_size``."""
        if training in self._data:
            return self._data[training]
        d = self.cfg.train_dir if training else self.cfg.val_dir
        fn = self.um.build_dataset_search
        try:
            extra = {"is_shuffle": training} if "is_shuffle" in \
                inspect.signature(fn).parameters else {}
            out = fn(d, training, **extra)
        except Exception as e:
            raise _user_error("UserModule.build_dataset_search", e,
                              f"reading {d!r} (is_training={training})") from None
        if not (isinstance(out, (tuple, list)) and len(out) == 2
                and isinstance(out[0], tf.data.Dataset)):
            raise DoptError("UserModule.build_dataset_search must return (dataset, data_num): "
                            "a tf.data.Dataset of (images, labels) and the number of images",
                            file="user_module.py", field="UserModule.build_dataset_search",
                            found=type(out).__name__)
        ds, n = out
        spec = ds.element_spec
        if not (isinstance(spec, tuple) and len(spec) == 2):
            raise DoptError("the dataset of UserModule.build_dataset_search must yield "
                            "(images, labels) pairs", file="user_module.py",
                            field="UserModule.build_dataset_search", found=repr(spec)[:120])
        rank = len(spec[0].shape)
        if rank == len(self.input_hwc):
            ds = ds.batch(self.cfg.batch_size, drop_remainder=training)
        elif rank != len(self.input_hwc) + 1:
            raise DoptError(f"images of rank {rank} from UserModule.build_dataset_search",
                            file="user_module.py", field="UserModule.build_dataset_search",
                            expected=f"(H, W, C) images or (N, H, W, C) batches for input_shape "
                                     f"{self.input_hwc}")
        try:
            n = int(n)
        except (TypeError, ValueError):
            raise DoptError("data_num of UserModule.build_dataset_search must be a number",
                            file="user_module.py", field="UserModule.build_dataset_search",
                            found=repr(n)[:80]) from None
        self._data[training] = (ds, max(1, n))
        return self._data[training]

    # --- supernet training ----------------------------------------------------------------
    def _optimizer(self):
        o = self.cfg.optimizer
        if o["type"] == "Adam":
            b1, b2 = o["betas"]
            return keras.optimizers.Adam(o["learning_rate"], beta_1=b1, beta_2=b2)
        if o["type"] == "Momentum":
            return keras.optimizers.SGD(o["learning_rate"], momentum=o["momentum"])
        return keras.optimizers.SGD(o["learning_rate"])

    def _lr(self, step: int) -> float:
        try:
            lr = self.um.lr_scheduler(self.cfg.optimizer["learning_rate"],
                                      tf.constant(step, tf.int64))
            if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
                lr = lr(step)
            elif callable(lr):  # tf.compat.v1 decay functions return one in eager mode
                lr = lr()
            lr = float(lr)
        except Exception as e:
            raise _user_error("UserModule.lr_scheduler", e, f"at step {step}") from None
        if not (math.isfinite(lr) and lr > 0):
            raise DoptError("UserModule.lr_scheduler must return a positive learning rate",
                            file="user_module.py", field="UserModule.lr_scheduler",
                            found=f"{lr} at step {step}")
        return lr

    def train_supernet(self, ckpt: Path, *, scalar=None, progress: bool) -> None:
        # the supernet's units are traced once per width combination (nas_supernet._conv_bn):
        # TensorFlow's "excessive retracing" warning is expected while they warm up
        logger = tf.get_logger()
        level = logger.level
        logger.setLevel("ERROR")
        try:
            self._train_supernet(ckpt, scalar=scalar, progress=progress)
        finally:
            logger.setLevel(level)

    def _train_supernet(self, ckpt: Path, *, scalar=None, progress: bool) -> None:
        from tqdm.auto import tqdm
        net = self.supernet
        train_ds, n_train = self._dataset(True)
        steps = max(1, n_train // self.cfg.batch_size)
        opt = self._optimizer()
        tvars = net.trainable_weights
        opt.build(tvars)
        start_epoch = start_step = 0
        if not ckpt.is_file() and self.cfg.pre_train_dir:
            self._warm_start(Path(self.cfg.pre_train_dir))
        if ckpt.is_file():
            start_epoch, start_step = self._load_ckpt(ckpt, opt)
            if start_epoch >= self.cfg.epochs:
                return
            self.log(f"resuming supernet training at epoch {start_epoch + 1}, step {start_step}")
        last_save, loss = time.monotonic(), float("nan")
        gstep = start_epoch * steps + start_step
        net.traced = (self.cfg.epochs * steps - gstep) >= TRACE_MIN_STEPS
        for epoch in range(start_epoch, self.cfg.epochs):
            rng = random.Random(self.cfg.seed * 100003 + epoch)
            bar = tqdm(total=steps, initial=start_step if epoch == start_epoch else 0,
                       desc=f"supernet epoch {epoch + 1}/{self.cfg.epochs}",
                       disable=not progress, leave=False, dynamic_ncols=True)
            step = 0
            try:
                for x, y in train_ds:
                    if step >= steps:
                        break
                    paths = fair_paths(self.space, rng)
                    if epoch == start_epoch and step < start_step:
                        step += 1  # already trained before the interruption
                        continue
                    opt.learning_rate = self._lr(gstep)
                    loss = self._train_step(opt, tvars, x, y, paths)
                    step += 1
                    gstep += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}")
                    if scalar is not None and (gstep % 10 == 0 or step == steps):
                        scalar("loss", loss, gstep)
                        scalar("lr", float(opt.learning_rate), gstep)
                    if time.monotonic() - last_save > CHECKPOINT_EVERY_S:
                        self._save_ckpt(ckpt, opt, epoch, step)
                        last_save = time.monotonic()
            except KeyboardInterrupt:
                self._save_ckpt(ckpt, opt, epoch, step)
                raise
            finally:
                bar.close()
            self._save_ckpt(ckpt, opt, epoch + 1, 0)
            self.log(f"supernet epoch {epoch + 1}/{self.cfg.epochs}: last loss {loss:.4f}")

    def _train_step(self, opt, tvars, x, y, paths) -> float:
        """One optimizer step over ``paths``: the batch split between them and their
        gradients summed, so every block of every layer moves every step."""
        n = int(x.shape[0])
        parts = min(len(paths), n)
        bounds = [n * j // parts for j in range(parts + 1)]
        acc = [tf.zeros_like(v) for v in tvars]
        total = 0.0
        for j in range(parts):
            lo, hi = bounds[j], bounds[j + 1]
            with tf.GradientTape() as tape:
                logits = self.supernet(x[lo:hi], paths[j], training=True)
                try:
                    loss = self.um.loss_op(y[lo:hi], logits)
                except Exception as e:
                    raise _user_error("UserModule.loss_op", e, "computing the loss") from None
                if not hasattr(loss, "shape"):
                    raise DoptError("UserModule.loss_op must return a tensor",
                                    file="user_module.py", field="UserModule.loss_op",
                                    found=type(loss).__name__)
                if len(loss.shape):   # per-sample losses: their mean, as Keras reduces them
                    loss = tf.reduce_mean(loss)
                part = loss * ((hi - lo) / n)
            grads = tape.gradient(part, tvars)
            acc = [a if g is None else a + tf.convert_to_tensor(g) for a, g in zip(acc, grads)]
            total += float(loss) * (hi - lo) / n
        opt.apply_gradients(zip(acc, tvars))
        return total

    def _save_ckpt(self, ckpt: Path, opt, epoch: int, step: int) -> None:
        arrays = {f"w{i}": np.asarray(v) for i, v in enumerate(self.supernet.weights)}
        arrays.update({f"o{i}": np.asarray(v) for i, v in enumerate(opt.variables)})
        arrays["position"] = np.array([epoch, step], np.int64)
        tmp = ckpt.with_name(ckpt.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, ckpt)

    def _read_ckpt(self, ckpt: Path) -> dict:
        try:
            with np.load(ckpt, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception as e:
            raise DoptError(f"cannot read the supernet checkpoint: {e.__class__.__name__}",
                            file=str(ckpt), hint="delete it to train the supernet again") \
                from None

    def _assign(self, ckpt: Path, variables, arrays: dict, prefix: str) -> None:
        have = sorted((k for k in arrays if k.startswith(prefix) and k[1:].isdigit()),
                      key=lambda k: int(k[1:]))
        if len(have) != len(variables) or any(
                tuple(v.shape) != arrays[f"{prefix}{i}"].shape for i, v in enumerate(variables)):
            raise DoptError("the supernet checkpoint does not fit this search space (written "
                            "by another version of dopt or another skeleton)", file=str(ckpt),
                            hint="delete it (or pass another --output) to train the supernet "
                                 "again")
        for i, v in enumerate(variables):
            v.assign(arrays[f"{prefix}{i}"])

    def _load_ckpt(self, ckpt: Path, opt=None) -> tuple[int, int]:
        arrays = self._read_ckpt(ckpt)
        self._assign(ckpt, self.supernet.weights, arrays, "w")
        if opt is not None:
            self._assign(ckpt, opt.variables, arrays, "o")
        epoch, step = (int(v) for v in arrays.get("position", np.zeros(2, np.int64)))
        return epoch, step

    def _warm_start(self, folder: Path) -> None:
        """``pre_train_dir`` holding a supernet checkpoint of the same skeleton: every
        weight of the same shape starts from it. Any other folder is data the user reads."""
        for cand in (folder / CHECKPOINT_NAME, folder / "nas_state" / CHECKPOINT_NAME):
            if cand.is_file():
                arrays = self._read_ckpt(cand)
                n = 0
                for i, v in enumerate(self.supernet.weights):
                    a = arrays.get(f"w{i}")
                    if a is not None and a.shape == tuple(v.shape):
                        v.assign(a)
                        n += 1
                self.log(f"warm start: {n} supernet tensors from {cand}")
                return

    def supernet_done(self, ckpt: Path) -> bool:
        if not ckpt.is_file():
            return False
        return int(self._read_ckpt(ckpt).get("position", [0])[0]) >= self.cfg.epochs

    def load_supernet(self, ckpt: Path) -> None:
        self._load_ckpt(ckpt)

    # --- candidates -----------------------------------------------------------------------
    def measure(self, arch) -> dict:
        """Trainable parameters of the whole network and multiply-accumulates of one
        inference: the searched layers counted from their specs, PreNet and PostNet traced
        once (they are the same in every candidate)."""
        c = backbone_cost(self.supernet.specs(arch), *self._pre_hw)
        return {"params": c["params"] + self._fixed["params"],
                "macs": c["macs"] + self._fixed["macs"]}

    def _static(self, arch):
        """A plain network for ``arch`` with fresh weights (for export)."""
        return build_net(self._build_user("PreNet"), self._build_user("PostNet"),
                         self.supernet.specs(arch), self.input_hwc)

    def export_onnx(self, arch, path: Path) -> None:
        from .convert import keras_to_onnx
        model, _ = keras_to_onnx(self._static(arch), batch=1)
        Path(path).write_bytes(model.SerializeToString())

    def _subnet(self, arch):
        """The sub-net with inherited weights and BatchNorm statistics estimated on
        ``BN_CALIB_BATCHES`` training batches (cumulative average)."""
        net = extract(self.supernet, arch, self._build_user("PreNet"),
                      self._build_user("PostNet"), self.input_hwc)
        bns = [la for la in net._flatten_layers(include_self=False, recursive=True)
               if isinstance(la, keras.layers.BatchNormalization)]
        for bn in bns:
            bn.moving_mean.assign(np.zeros(bn.moving_mean.shape, "float32"))
            bn.moving_variance.assign(np.ones(bn.moving_variance.shape, "float32"))
        for i, x in enumerate(self._calibration_batches()):
            for bn in bns:
                bn.momentum = i / (i + 1)   # moving = mean of the batches so far
            net(x, training=True)
        for bn in bns:
            bn.momentum = 0.99
        return net

    def _calibration_batches(self) -> list:
        """The first ``BN_CALIB_BATCHES`` training batches, read once: every candidate's
        statistics come from the same images (the user's dataset may reshuffle on every
        pass), so a result file's weights are the ones its accuracy was measured with."""
        if "calib" not in self._data:
            train_ds, _ = self._dataset(True)
            self._data["calib"] = [x for x, _y in train_ds.take(BN_CALIB_BATCHES)]
        return self._data["calib"]

    def evaluate(self, arch) -> float:
        """The user's metric of the sub-net: ``metrics_op(labels, outputs)`` over the whole
        validation set at once (per-sample values are averaged)."""
        net = self._subnet(arch)
        val_ds, _ = self._dataset(False)
        labels, outputs = [], []
        for x, y in val_ds:
            outputs.append(net(x, training=False))
            labels.append(y)
        try:
            value = self.um.metrics_op(tf.concat(labels, 0), tf.concat(outputs, 0))
            if isinstance(value, (list, tuple)) and len(value) == 1:
                value = value[0]
            if hasattr(value, "shape") or isinstance(value, np.ndarray):
                # one number, or per-sample values (e.g. sparse_categorical_accuracy): their mean
                value = float(np.mean(np.asarray(value, dtype=np.float64)))
        except Exception as e:
            raise _user_error("UserModule.metrics_op", e, "evaluating a candidate") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise DoptError("UserModule.metrics_op must return one finite number (higher is "
                            "better)", file="user_module.py", field="UserModule.metrics_op",
                            found=repr(value)[:80])
        return float(value)

    def write_result(self, arch, py_path: Path, header: dict) -> list[Path]:
        """``model_arch_result_N.py`` (runnable alone) and its inherited weights."""
        net = self._subnet(arch)
        weights = py_path.with_name(py_path.stem + ".supernet.npz")
        np.savez(weights, **{f"w{i}": np.asarray(v) for i, v in enumerate(net.weights)})
        specs = [list(s) for s in self.supernet.specs(arch)]
        py_path.write_text(render_result(header, specs, self.input_hwc), encoding="utf-8")
        return [py_path, weights]

    def barrier(self) -> None:
        """One process per search (workers share the study, not the training)."""

    def close(self) -> None:
        keras.backend.clear_session()


_MAIN = '''

LAYERS = {layers}
INPUT_SHAPE = {shape}


def build():
    """PreNet and PostNet come from the user_module.py of the search."""
    um = _user_module()
    return build_net(um.PreNet(), um.PostNet(), LAYERS, INPUT_SHAPE)


def main():
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2)
    net = build()
    stem = os.path.splitext(os.path.basename(__file__))[0]
    inherited = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             stem + ".supernet.npz")
    if os.path.isfile(inherited):  # the weights the search evaluated (train further from them)
        load_weights_npz(net, inherited)
    fn = tf.function(lambda x: net(x, training=False)).get_concrete_function(
        tf.TensorSpec((1,) + tuple(INPUT_SHAPE), tf.float32, name="input"))
    graph_def = convert_variables_to_constants_v2(fn).graph.as_graph_def()
    tf.io.write_graph(graph_def, ".", stem + ".pb", as_text=False)
    writer = tf.summary.create_file_writer(stem + "_graph")
    with writer.as_default():
        tf.summary.graph(graph_def)
    writer.close()
    net.save_weights(stem + ".weights.h5")
    print(f"wrote {{stem}}.pb, {{stem}}.weights.h5 and the TensorBoard graph log "
          f"{{stem}}_graph/ ({{model_param_size}} parameters, search accuracy {{accuracy}})")


if __name__ == "__main__":
    main()
'''


def render_result(header: dict, specs: list, input_shape) -> str:
    return result_file(header, inspect.getsource(nas_blocks),
                       ["model_arch_result_N.pb (frozen graph, input 'input')",
                        "model_arch_result_N.weights.h5", "a TensorBoard graph log"],
                       _MAIN.format(layers=layers_literal(specs), shape=repr(tuple(input_shape))))
