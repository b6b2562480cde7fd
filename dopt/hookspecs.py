"""Hook specifications: the reference tool's five operations plus dispatch.

Adapters (``adapters/``) and third-party plugins implement these and register
through the ``dopt`` entry-point group. The five operations are ``firstresult``
hooks that receive the chosen adapter's name: an implementation returns ``None``
for any adapter but its own, so exactly one framework answers (NNCF-style backend
dispatch, with pluggy doing the calling).
"""
from __future__ import annotations

import pluggy

PROJECT = "dopt"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def dopt_adapter_info():
    """Describe an adapter: ``{"name", "framework", "extra", "operations", "strategies"}``.

    ``extra`` is the pip extra that brings the framework; it is quoted in errors.
    """


@hookspec
def dopt_claim_model(model):
    """Return the adapter name if this adapter handles ``model``, else ``None``.

    Must not import a framework that is not already imported: a model object of
    a framework implies the framework is in ``sys.modules``.
    """


@hookspec
def dopt_range_algorithms():
    """Return ``{name: factory}`` of activation-range observers (see ``dopt.observers``)."""


@hookspec(firstresult=True)
def dopt_generate_config_file(adapter, model, dst_path, input_shape, options):
    """Write the per-layer strategy JSON for ``model``; return the written document."""


@hookspec(firstresult=True)
def dopt_optimize_model(adapter, model, config_path, options):
    """Return the model with fake-quant inserted on the configured layers."""


@hookspec(firstresult=True)
def dopt_set_calibrate_state(adapter, model, calibrate):
    """Switch calibration (statistics-only forward passes) on or off; return the model."""


@hookspec(firstresult=True)
def dopt_get_quant_loss(adapter, model):
    """Return the auxiliary quantization loss (a framework scalar, 0 where none applies)."""


@hookspec(firstresult=True)
def dopt_generate_final_model(adapter, model, config_file, weights_file, output_dir, options):
    """Write the deployable model(s) and the parameter file; return ``{kind: path}``."""


@hookspec
def dopt_claim_file(framework, model_path):
    """Return the adapter name if this adapter quantizes ``model_path`` for ``dopt_so``.

    ``framework`` is the reference CLI's number (3 TensorFlow, 5 PyTorch or ONNX). Decide
    from the file name only: no framework import.
    """


@hookspec(firstresult=True)
def dopt_quantize_file(adapter, job):
    """No-training quantization of a model file (``dopt_so``); ``job`` is a ``dopt.ptq.PtqJob``.

    Write the quantized model at ``job.output`` and the parameter file at
    ``job.compress_conf`` (both atomically); return ``{kind: path}`` of what was written.
    """


@hookspec(firstresult=True)
def dopt_convert_model(framework, model_path, input_shapes, out_nodes, params, params_file):
    """Convert a model file of another framework to ONNX for ``dopt omg``.

    Return ``(onnx.ModelProto, params)``: the converted graph with ``input_shapes`` and
    ``out_nodes`` applied, and the parameter document ``params`` (or ``None``) re-keyed
    onto the converted graph's node names. Return ``None`` for a framework not one's own.
    """


# --- LLM low-bit quantization (``dopt.dopt_llm``) -------------------------------------


@hookspec(firstresult=True)
def dopt_set_quant_state(adapter, model, weight_state, input_state):
    """Switch weight / input fake quantization of a quantized model on or off."""


@hookspec(firstresult=True)
def dopt_set_run_mode(adapter, model, mode):
    """``"hardware"``: weights frozen on their integer grid, inference only; ``"train"``."""


@hookspec(firstresult=True)
def dopt_llm_generate_config(adapter, model_path, dst_path, defaults):
    """Write the per-layer ``dopt_config.json`` for the model at ``model_path``."""


@hookspec(firstresult=True)
def dopt_llm_run_stage(adapter, job):
    """Run one stage of the three-stage pipeline; ``job`` is a ``dopt.dopt_llm.opt_main.LlmJob``.

    Return ``{kind: path}`` of the files written (each written whole or not at all).
    """
