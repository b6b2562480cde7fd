"""Hook implementations of the TensorFlow adapter (entry point ``dopt: tensorflow``).

Two front doors share one set of hooks: a Keras 3 model (the native path) and a
``tf.compat.v1.Session`` (the reference's TF1 API, whose extra arguments travel in
``options``). Importing this module must not import TensorFlow.

Operations are called only for this adapter (the plugin manager dispatches on the
``adapter`` argument), so they neither take nor test it. ``options`` arrive checked
against ``OPTIONS``; the TF1 ones are refused for a Keras model unless ``None`` (the
default ``dopt.dopt_tf.opt_main`` passes for both front doors).
"""
from __future__ import annotations

import sys
from pathlib import Path

from dopt.hookspecs import hookimpl

NAME = "tensorflow"
TF_SUFFIXES = (".pb", ".keras")
#: Keyword options each operation accepts: the TF1 API's extra arguments
#: (``tf1_api.optimize_model``, ``tf1_export.generate_final_model``). The Keras functions
#: (``keras_api``, ``keras_export``) take none beyond the hook's own arguments.
OPTIONS: dict[str, tuple[str, ...]] = {
    "generate_config_file": (),
    "optimize_model": ("is_train_flag", "quant_flag"),
    "generate_final_model": ("output_name_list",),
}


@hookimpl
def dopt_adapter_info():
    return {"name": NAME, "framework": "TensorFlow", "extra": "tf",
            "accepts": "a Keras 3 model (functional or Sequential) or a tf.compat.v1.Session",
            "operations": ["generate_config_file", "optimize_model", "set_calibrate_state",
                           "get_quant_loss", "generate_final_model",
                           "quantize_file (dopt_so --framework 3)",
                           "convert_model (dopt omg --framework 3)", "distill_loss",
                           "nas_backend"],
            "strategies": ["float", "Quant_INT8-8"],
            "options": {op: list(names) for op, names in OPTIONS.items()}}


def _is_session(model) -> bool:
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(model, tf.compat.v1.Session)


def _is_keras(model) -> bool:
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(model, keras.Model)


@hookimpl
def dopt_claim_model(model):
    return NAME if _is_session(model) or _is_keras(model) else None


def _keras_options(op: str, options) -> dict:
    """The options for the Keras path: TF1-only ones must be unset (``None``)."""
    from dopt.errors import DoptError
    tf1_only = OPTIONS.get(op, ())
    given = [k for k in tf1_only if options.get(k) is not None]
    if given:
        raise DoptError(f"{op} option '{given[0]}' applies to a tf.compat.v1.Session only",
                        field=given[0], found="a Keras model",
                        hint=f"drop {', '.join(given)} for a Keras model")
    return {k: v for k, v in options.items() if k not in tf1_only}


@hookimpl
def dopt_generate_config_file(model, dst_path, input_shape, options):
    if _is_session(model):
        from .tf1_api import generate_config_file
        return generate_config_file(model, dst_path, **options)
    from .keras_api import generate_config_file
    return generate_config_file(model, dst_path, input_shape,
                                **_keras_options("generate_config_file", options))


@hookimpl
def dopt_optimize_model(model, config_path, options):
    if _is_session(model):
        from .tf1_api import optimize_model
        return optimize_model(model, config_path, options.get("is_train_flag"),
                              options.get("quant_flag"))
    from .keras_api import optimize_model
    return optimize_model(model, config_path, **_keras_options("optimize_model", options))


@hookimpl
def dopt_set_calibrate_state(model, calibrate):
    if _is_session(model):
        from .tf1_api import set_calibrate_state
    else:
        from .keras_api import set_calibrate_state
    result = set_calibrate_state(model, calibrate)
    return model if result is None else result


@hookimpl
def dopt_get_quant_loss(model):
    if _is_session(model):
        from .tf1_api import get_quant_loss
    else:
        from .keras_api import get_quant_loss
    return get_quant_loss(model)


@hookimpl
def dopt_freeze_bn_stats(model, freeze):
    from .keras_api import freeze_bn_stats
    return freeze_bn_stats(model, freeze)


@hookimpl
def dopt_generate_final_model(model, config_file, weights_file, output_dir, options):
    if _is_session(model):
        from .tf1_export import generate_final_model
        return generate_final_model(model, config_file, options.get("output_name_list"),
                                    weights_file, output_dir)
    from .keras_export import generate_final_model
    return generate_final_model(model, config_file, weights_file, output_dir,
                                **_keras_options("generate_final_model", options))


def _tf_file(model_path) -> bool:
    p = Path(str(model_path))
    return p.suffix.lower() in TF_SUFFIXES or p.is_dir()


@hookimpl
def dopt_claim_file(framework, model_path):
    return NAME if framework == 3 and _tf_file(model_path) else None


@hookimpl
def dopt_quantize_file(job):
    from .so import quantize_job
    return quantize_job(job)


@hookimpl
def dopt_convert_model(framework, model_path, input_shapes, out_nodes, params, params_file):
    if framework != 3:
        return None
    from . import convert
    frozen = convert.load_frozen(model_path, field_name="--model")
    frozen = convert.select_io(frozen, input_shapes, out_nodes)
    model = convert.to_onnx(frozen)
    if params is not None:
        params = convert.remap_params(params, frozen, model, file=params_file)
    return model, params


@hookimpl
def dopt_distill_loss(teacher, student, config):
    if not _is_keras(student):
        return None
    from .distill import Distiller
    return Distiller(teacher, student, config)


@hookimpl
def dopt_nas_backend():
    from .nas_backend import TensorFlowNasBackend
    return TensorFlowNasBackend
