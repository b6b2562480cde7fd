"""Evaluation: one metric, three ways of running the model (float, simulated, deployed).

A labelled set (IMAGE folder with one sub-folder per class, or a BINARY 610/510 file and
a labels file) is read with the calibration set's own readers and preprocessing, so the
numbers mean what the user's ``config.prototxt`` means. A user function
``evaluate(predict) -> float | (float, per_sample)`` computes any other metric; dopt hands
it ``predict`` for each model and records what ``predict`` returned, so the agreement of
the deployed build with the simulated one is measured on the same calls.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from ..calib import sets as calibset
from ..calib.prototxt import Preprocess, SoConfig
from ..errors import DoptError
from .config import EvalSpec

MAX_LABELS_BYTES = 256 << 20


@dataclasses.dataclass
class LabelledSet:
    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    source: str


def _labels(path: Path, n: int) -> np.ndarray:
    from ..formats.fileio import existing_file
    existing_file(path, field="evaluation.labels", max_bytes=MAX_LABELS_BYTES,
                  what="labels file")
    try:
        if path.suffix == ".npy":
            y = np.load(path, allow_pickle=False)
        else:
            y = np.array([int(t) for t in path.read_text("utf-8").split()], dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise DoptError(f"cannot read the labels ({e.__class__.__name__}: {e})"[:300],
                        file=str(path), field="evaluation.labels",
                        expected="a .npy array of integers, or one integer per line") from None
    y = np.asarray(y).reshape(-1)
    if not np.issubdtype(y.dtype, np.integer) or len(y) < n:
        raise DoptError("the labels do not match the evaluation data", file=str(path),
                        field="evaluation.labels",
                        expected=f"at least {n} integer class indices (one per sample)",
                        found=f"{len(y)} values of type {y.dtype}")
    return y[:n].astype(np.int64)


def _read_all(reader, limit) -> np.ndarray:
    n = reader.num_samples if not limit else min(limit, reader.num_samples)
    parts = list(reader.batches(256, n))
    return np.concatenate(parts) if parts else np.empty((0,) + tuple(reader.sample_shape))


def load_labelled(spec: EvalSpec, so: SoConfig, input_name: str, input_shape,
                  input_format: str) -> LabelledSet:
    """Read the labelled set as the calibration set's first input is read (same
    preprocessing: ``mean_value``, ``standard_deviation``, ``image_format``)."""
    pp0 = so.preprocess[0] if so.preprocess else Preprocess(input_file_path=str(spec.path))
    if spec.kind == "binary":
        pp = Preprocess(input_file_path=str(spec.path), input_type="BINARY", path=spec.path)
        r = calibset.open_calibration(pp, input_name=input_name, input_shape=input_shape,
                                      input_format=input_format)
        try:
            x = _read_all(r, spec.limit)
        finally:
            r.close()
        return LabelledSet(x, _labels(spec.labels, len(x)), [], str(spec.path))
    classes = sorted(d.name for d in spec.path.iterdir() if d.is_dir())
    if not classes:
        raise DoptError("the image folder has no class sub-folders", file=str(spec.path),
                        field="evaluation.images",
                        expected="one sub-folder per class (sorted names = class 0, 1, ...) "
                                 "holding that class's images")
    xs, ys = [], []
    for ci, name in enumerate(classes):
        pp = dataclasses.replace(pp0, input_file_path=str(spec.path / name), input_type="IMAGE",
                                 path=spec.path / name)
        r = calibset.open_calibration(pp, input_name=input_name, input_shape=input_shape,
                                      input_format=input_format)
        try:
            xs.append(_read_all(r, None))
        finally:
            r.close()
        ys.append(np.full(len(xs[-1]), ci, np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    if spec.limit and spec.limit < len(x):
        # a class-balanced prefix: every k-th sample of the sorted set
        idx = np.linspace(0, len(x) - 1, spec.limit).round().astype(int)
        x, y = x[idx], y[idx]
    return LabelledSet(x, y, classes, str(spec.path))


# --- predictors -----------------------------------------------------------------------

class Predictor:
    """``predict(x)``: x one array (single-input model) or ``{name: array}``; returns the
    first output, or ``{name: array}`` for models with several outputs. Batched."""

    def __init__(self, run: Callable[[dict], dict], input_names: list[str], output_names,
                 batch_size: int = 256, fixed_batch: int | None = None):
        self._run, self.inputs, self.outputs = run, input_names, list(output_names)
        self.batch = fixed_batch or batch_size
        self.calls: list = []          # recorded first outputs (agreement)
        self.record = False

    def __call__(self, x):
        feeds = x if isinstance(x, dict) else {self.inputs[0]: x}
        n = len(next(iter(feeds.values())))
        parts = [self._run({k: np.ascontiguousarray(v[i:i + self.batch], dtype=np.float32)
                            for k, v in feeds.items()}) for i in range(0, max(n, 1), self.batch)]
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if self.record:
            self.calls.append(out[self.outputs[0]])
        return out[self.outputs[0]] if len(self.outputs) == 1 else out


def _fixed_batch(sess) -> int | None:
    dims = [i.shape[0] for i in sess.get_inputs() if i.shape]
    fixed = [d for d in dims if isinstance(d, int) and d > 0]
    return min(fixed) if fixed else None


def simulated_predictor(qdq_model, *, batch_size: int = 256) -> Predictor:
    """The simulated build: the QDQ model with the NPU's data types (FP16 between its
    Q/DQ pairs, ``formats.qdq.with_npu_data_types``), which predicts the compiled model
    where the float32 QDQ file misses near ties."""
    from ..formats.qdq import with_npu_data_types
    return ort_predictor(with_npu_data_types(qdq_model).SerializeToString(), optimize=False,
                         batch_size=batch_size)


def ort_predictor(model_bytes: bytes, *, optimize: bool, batch_size: int = 256) -> Predictor:
    from ..formats.qdq import ort_session
    try:
        sess = ort_session(model_bytes, optimize=optimize)
    except Exception as e:  # noqa: BLE001
        raise DoptError(f"ONNX Runtime cannot load the model ({e.__class__.__name__}: "
                        f"{str(e).splitlines()[0][:300]})") from None
    outs = [o.name for o in sess.get_outputs()]

    def run(feed):
        return dict(zip(outs, sess.run(outs, feed)))
    return Predictor(run, [i.name for i in sess.get_inputs()], outs, batch_size,
                     _fixed_batch(sess))


def om_predictor(path, *, batch_size: int = 256, verify_with=None) -> Predictor:
    from .. import runtime
    sess = runtime.load(str(path), verify_with=verify_with) if verify_with else \
        runtime.load(str(path))
    return Predictor(sess.run, [i["name"] for i in sess.inputs], sess.outputs, batch_size)


# --- metrics --------------------------------------------------------------------------

@dataclasses.dataclass
class Score:
    value: float
    outputs: np.ndarray | None = None      # first output per sample (agreement)
    per_sample: list | None = None
    samples: int = 0


class Evaluator:
    """The configured metric, computed for any predictor."""

    def __init__(self, spec: EvalSpec, data: LabelledSet | None, fn=None):
        self.spec, self.data, self.fn = spec, data, fn
        self.name = spec.name

    @property
    def samples(self) -> int:
        return len(self.data.x) if self.data is not None else 0

    def __call__(self, predict: Predictor) -> Score:
        if self.data is not None:
            out = predict(self.data.x)
            if isinstance(out, dict):
                out = out[predict.outputs[0]]
            if out.ndim < 2:
                raise DoptError("top-1 accuracy needs an output of (N, classes) scores",
                                field="evaluation", found=f"output shape {list(out.shape)}",
                                hint="evaluate with function: module.py:evaluate")
            top = out.reshape(len(out), -1).argmax(1)
            return Score(float((top == self.data.y).mean() * 100.0), out, None, len(out))
        predict.calls, predict.record = [], True
        try:
            got = self.fn(predict)
        except DoptError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's code
            raise DoptError(f"the evaluation function raised {e.__class__.__name__}: {e}"[:400],
                            file=str(self.spec.path), field="evaluation.function",
                            hint="run it on its own to see the error in your code") from None
        finally:
            predict.record = False
        per = None
        if isinstance(got, tuple) and len(got) == 2:
            got, per = got
            per = [float(v) for v in np.asarray(per, dtype=np.float64).reshape(-1)]
        try:
            value = float(got)
        except (TypeError, ValueError):
            raise DoptError("the evaluation function must return a number or (number, "
                            "per_sample)", file=str(self.spec.path), field="evaluation.function",
                            found=f"{type(got).__name__}") from None
        outs = [c.reshape(len(c), -1) for c in predict.calls if np.ndim(c)]
        cat = np.concatenate(outs) if outs and len({o.shape[1] for o in outs}) == 1 else None
        return Score(value, cat, per, len(cat) if cat is not None else 0)


def agreement(a: Score, b: Score) -> float | None:
    """Top-1 agreement (%) of two runs' first outputs, sample by sample."""
    if a.outputs is None or b.outputs is None or a.outputs.shape != b.outputs.shape:
        return None
    ta = a.outputs.reshape(len(a.outputs), -1).argmax(1)
    tb = b.outputs.reshape(len(b.outputs), -1).argmax(1)
    return float((ta == tb).mean() * 100.0) if len(ta) else None


def make_evaluator(spec: EvalSpec, so: SoConfig, input_shapes: dict,
                   input_format: str) -> Evaluator:
    if spec.kind == "function":
        from .. import userpy
        mod = userpy.load_module(spec.path, field="evaluation.function")
        fn = getattr(mod, spec.function, None)
        if not callable(fn):
            raise DoptError(f"the evaluation module has no function '{spec.function}'",
                            file=str(spec.path), field="evaluation.function",
                            expected="def evaluate(predict) -> float | (float, per_sample)")
        return Evaluator(spec, None, fn)
    name, shape = next(iter(input_shapes.items()))
    return Evaluator(spec, load_labelled(spec, so, name, shape, input_format))
