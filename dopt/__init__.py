"""dopt: take a trained model to a mobile NPU.

The top-level functions are the reference tool's five operations; each
dispatches to the installed adapter that claims the model object. ``import
dopt`` needs no framework: adapters import theirs only when called.

``**options`` are the adapter's own keyword options (``dopt_adapter_info()["options"]``,
e.g. the TF1 API's ``is_train_flag`` / ``quant_flag``); a name the adapter does not
accept is a ``DoptError`` naming it and listing the accepted ones.
"""
from __future__ import annotations

from . import _moved
from .errors import DoptError, MissingExtraError

_moved.install()   # old module paths (dopt.numerics, dopt.params, ...) keep importing

__version__ = "0.1.0"

__all__ = ["DoptError", "MissingExtraError", "generate_config_file", "optimize_model",
           "set_calibrate_state", "get_quant_loss", "generate_final_model", "__version__"]


def _call(op, model, **kw):
    from .plugin_manager import call
    return call(op, model, **kw)


def generate_config_file(model, input_shape=None, dst_path="./config_gen.json", **options):
    """Write the per-layer quantization strategy JSON for ``model`` (all layers ``float``).

    ``options``: the adapter's keyword options for ``generate_config_file`` (checked)."""
    return _call("generate_config_file", model, dst_path=dst_path, input_shape=input_shape,
                 options=options)


def optimize_model(model, config_path, **options):
    """Insert fake-quant on the layers the config marks ``Quant_INT8-8``; returns the model.

    ``options``: the adapter's keyword options for ``optimize_model`` (checked)."""
    return _call("optimize_model", model, config_path=config_path, options=options)


def set_calibrate_state(model, calibrate_mode):
    """True: forward passes only collect activation ranges. False: freeze them."""
    return _call("set_calibrate_state", model, calibrate=bool(calibrate_mode))


def get_quant_loss(model):
    """Auxiliary quantization loss to add with a small weight (about 1:20 to the task loss)."""
    return _call("get_quant_loss", model)


def generate_final_model(model, config_file, pth_file="quant.pth", output_dir="./", **options):
    """From a fresh float model and the quant checkpoint, write the deployable model files.

    ``options``: the adapter's keyword options for ``generate_final_model`` (checked)."""
    return _call("generate_final_model", model, config_file=config_file, weights_file=pth_file,
                 output_dir=output_dir, options=options)


def __getattr__(name: str):
    return _moved.moved_attribute(name)
