"""Reference-compatible TensorFlow API, same signatures as ``dopt_tf_py3``'s ``opt_main``.

The reference's functions take a ``tf.compat.v1.Session`` (the TF1 graph flow); the same
functions also take a Keras 3 model (dopt's native Keras path; see docs/keras.md), told
apart by the type of the first argument. Everything goes through the hook dispatch with
the TensorFlow adapter required, so a missing ``dopt[tf]`` install is a clear error.
"""
from __future__ import annotations

from os import PathLike
from typing import TYPE_CHECKING, Any, Union

from ..plugin_manager import call

if TYPE_CHECKING:   # annotations only: the core never imports a framework at run time
    import keras
    import tensorflow as tf

StrPath = Union[str, "PathLike[str]"]
SessOrModel = Union["tf.compat.v1.Session", "keras.Model"]

__all__ = ["generate_config_file", "optimize_model", "set_calibrate_state", "get_quant_loss",
           "generate_final_model", "freeze_bn_stats"]

WANT = "tensorflow"


def generate_config_file(sess_or_model: SessOrModel, dst_path: StrPath = "./config_gen.json",
                         input_shape: str | None = None) -> None:
    """Write the per-layer strategy JSON for the session's graph or the Keras model."""
    return call("generate_config_file", sess_or_model, want=WANT, dst_path=dst_path,
                input_shape=input_shape, options={})


def optimize_model(sess_or_model: SessOrModel, config_file: StrPath,
                   is_train_flag: Any = None, quant_flag: Any = None) -> Any:
    """TF1: rewrites the session's graph in place (and returns it; the reference returns
    nothing). Keras: returns the quantized model (build the optimizer on it)."""
    return call("optimize_model", sess_or_model, want=WANT, config_path=config_file,
                options={"is_train_flag": is_train_flag, "quant_flag": quant_flag})


def set_calibrate_state(sess_or_model: SessOrModel, calibration_mode: bool) -> None:
    """Switch activation-range collection on (calibration) or off."""
    return call("set_calibrate_state", sess_or_model, want=WANT,
                calibrate=bool(calibration_mode))


def get_quant_loss(sess_or_model: SessOrModel) -> Any:
    """The quantization regularization loss to add to the task loss."""
    return call("get_quant_loss", sess_or_model, want=WANT)


def generate_final_model(sess_or_model: SessOrModel, config_file: StrPath, *args: Any,
                         **kwargs: Any) -> dict[str, str]:
    """TF1 (reference): ``(sess, config_file, output_name_list, ckpt_file, output_dir="./")``.
    Keras: ``(model, config_file, weights_file=None, output_dir="./")`` where ``weights_file``
    (alias ``ckpt_file``) is the quantized model's ``.weights.h5`` / ``.keras``; pass the
    model returned by ``optimize_model`` itself and no weights file to export it directly."""
    import sys
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(sess_or_model, tf.compat.v1.Session):
        def tf1(output_name_list, ckpt_file, output_dir="./"):
            return output_name_list, ckpt_file, output_dir
        names, ckpt, out = _bind(tf1, args, kwargs)
        return call("generate_final_model", sess_or_model, want=WANT, config_file=config_file,
                    weights_file=ckpt, output_dir=out, options={"output_name_list": names})
    if "ckpt_file" in kwargs:
        kwargs["weights_file"] = kwargs.pop("ckpt_file")

    def keras(weights_file=None, output_dir="./"):
        return weights_file, output_dir
    weights, out = _bind(keras, args, kwargs)
    return call("generate_final_model", sess_or_model, want=WANT, config_file=config_file,
                weights_file=weights, output_dir=out, options={})


def _bind(fn, args, kwargs):
    import inspect
    from ..errors import DoptError
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as e:
        raise DoptError(f"generate_final_model: {e}",
                        expected=f"generate_final_model(sess_or_model, config_file"
                                 f"{str(inspect.signature(fn))[1:]}") from None
    return fn(*args, **kwargs)


def freeze_bn_stats(quant_model: keras.Model, freeze: bool = True) -> None:
    """dopt addition (Keras): freeze BatchNorm statistics of folded layers."""
    return call("freeze_bn_stats", quant_model, want=WANT, freeze=bool(freeze))
