"""Hook specifications: the reference tool's five operations, dispatch and extensions.

Adapters (``adapters/``) and third-party plugins implement these and register through
the ``dopt`` entry-point group (``docs/plugins.md``). Every hook is described here in
full: its parameters, what it returns and whether pluggy stops at the first non-``None``
result (``firstresult``).

**Adapter operations.** A hook whose specification has an ``adapter`` parameter is an
*operation*: the plugin manager (``dopt.plugin_manager``) calls it on one plugin only,
the one whose ``dopt_adapter_info()["name"]`` equals ``adapter`` (hook wrappers of every
plugin still wrap the call). An implementation therefore does not test ``adapter``; it
may leave the parameter out of its signature (pluggy passes only the arguments an
implementation names). A plugin that implements an operation must also implement
``dopt_adapter_info``.

**Names are checked.** A ``@hookimpl`` whose name is not a hook below is an error that
names the plugin and the function (``plugin_manager.register_plugin``); an entry-point
plugin with such an error is not registered and is reported like one that fails to
import (``dopt adapters``). Mark an implementation meant for a newer dopt
``@hookimpl(optionalhook=True)`` to have it skipped instead.

``python -m dopt.hookspecs`` prints the hook table of ``docs/plugins.md``.
"""
from __future__ import annotations

import inspect
import os
import re
import sys
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypedDict, Union

import pluggy

if TYPE_CHECKING:  # annotations only: importing these would import numpy / onnx
    import onnx

    from .dopt_llm.opt_main import LlmJob
    from .quant.observers import RangeObserver
    from .ptq import PtqJob

PROJECT = "dopt"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: A file-system path as the public API accepts it.
StrPath = Union[str, "os.PathLike[str]"]


class _AdapterInfoRequired(TypedDict):
    name: str
    framework: str


class AdapterInfo(_AdapterInfoRequired, total=False):
    """What ``dopt_adapter_info`` returns; ``name`` and ``framework`` are required.

    * ``name``: the adapter's name, the value ``dopt_claim_model`` / ``dopt_claim_file``
      return and operations are dispatched on (``torch``, ``onnx``, ``tensorflow``, ``llm``).
    * ``framework``: human-readable framework name, e.g. ``"PyTorch"``.
    * ``extra``: the ``dopt`` pip extra that brings the framework (``pip install
      'dopt[<extra>]'``); one of ``pyproject.toml``'s optional dependencies, or ``None``
      for an adapter not shipped with dopt.
    * ``accepts``: what the adapter takes, for errors ("expected ...").
    * ``operations``: operations it implements, for ``dopt adapters``.
    * ``strategies``: the ``quant_strategy`` values its configs use.
    * ``options``: ``{operation: [option names]}``, the keyword ``**options`` each
      reference operation accepts (``dopt.optimize_model(model, cfg, **options)``). The
      plugin manager refuses any other name with a ``DoptError``. An operation missing
      from the mapping accepts no option; an adapter without ``options`` gets its options
      unchecked.
    """

    extra: str | None
    accepts: str
    operations: list[str]
    strategies: list[str]
    options: dict[str, list[str]]


# --- discovery --------------------------------------------------------------------------


@hookspec
def dopt_adapter_info() -> AdapterInfo:
    """Describe the adapter this plugin provides (see :class:`AdapterInfo`).

    Only adapters implement it; a plugin that adds, say, range algorithms does not. Must
    not import a framework: ``dopt adapters`` and dispatch call it without one.

    :returns: the adapter description; ``name`` must be unique among installed adapters.
    :firstresult: no: every adapter answers; ``dopt.plugin_manager.adapters()`` keys the
        list by ``name``.
    """


@hookspec
def dopt_claim_model(model: Any) -> str | None:
    """Claim a model object: say whether this adapter handles ``model``.

    Must not import a framework that is not already imported: a model object of a
    framework implies the framework is in ``sys.modules``.

    :param model: the object the user passed to a ``dopt`` operation (a
        ``torch.nn.Module``, a Keras model, a ``tf.compat.v1.Session``, ...).
    :returns: the adapter's ``name`` if it handles ``model``, else ``None``.
    :firstresult: no: all claims are collected; none is "no adapter installed", more than
        one is an error.
    """


@hookspec
def dopt_range_algorithms() -> Mapping[str, Callable[[], RangeObserver]]:
    """Provide activation-range algorithms (observers, see ``dopt.quant.observers``).

    :returns: ``{name: factory}``; ``factory()`` makes a fresh observer. A later plugin's
        name replaces an earlier one's (the core's built-ins come first).
    :firstresult: no: the mappings of all plugins are merged.
    """


# --- the reference's five operations (adapter operations) -----------------------------


@hookspec(firstresult=True)
def dopt_generate_config_file(adapter: str, model: Any, dst_path: StrPath,
                              input_shape: str | None,
                              options: Mapping[str, Any]) -> dict[str, Any] | None:
    """Write the per-layer strategy JSON for ``model``, every layer ``float``.

    :param adapter: the adapter that claimed ``model``; the call reaches only that
        adapter's implementation.
    :param model: the float model.
    :param dst_path: the JSON file to write (atomically).
    :param input_shape: ``"name:n,c,h,w;..."`` to record in the file, or ``None`` where
        the adapter can tell the shape itself (Keras).
    :param options: the caller's extra keyword arguments, already checked against
        ``AdapterInfo["options"]["generate_config_file"]``.
    :returns: the written document.
    :firstresult: yes: the chosen adapter's result, ``None`` if it does not implement it.
    """


@hookspec(firstresult=True)
def dopt_optimize_model(adapter: str, model: Any, config_path: StrPath,
                        options: Mapping[str, Any]) -> Any | None:
    """Insert fake quantization on the layers the config marks quantized.

    :param adapter: the adapter that claimed ``model``; the call reaches only that
        adapter's implementation.
    :param model: the float model (a TF1 session is rewritten in place).
    :param config_path: the strategy JSON written by ``dopt_generate_config_file`` and
        edited by the user.
    :param options: the caller's extra keyword arguments, already checked against
        ``AdapterInfo["options"]["optimize_model"]``.
    :returns: the quantized model (train and calibrate this one).
    :firstresult: yes: the chosen adapter's result, ``None`` if it does not implement it.
    """


@hookspec(firstresult=True)
def dopt_set_calibrate_state(adapter: str, model: Any, calibrate: bool) -> Any | None:
    """Switch calibration (statistics-only forward passes) on or off.

    :param adapter: the adapter that claimed ``model``; the call reaches only that
        adapter's implementation.
    :param model: a model returned by ``dopt_optimize_model``.
    :param calibrate: ``True`` to start collecting activation ranges, ``False`` to
        freeze them.
    :returns: ``model``.
    :firstresult: yes: the chosen adapter's result, ``None`` if it does not implement it.
    """


@hookspec(firstresult=True)
def dopt_get_quant_loss(adapter: str, model: Any) -> Any | None:
    """Compute the auxiliary quantization loss to add to the task loss.

    :param adapter: the adapter that claimed ``model``; the call reaches only that
        adapter's implementation.
    :param model: a model returned by ``dopt_optimize_model``.
    :returns: a framework scalar (``0`` where no layer is quantized).
    :firstresult: yes: the chosen adapter's result, ``None`` if it does not implement it.
    """


@hookspec(firstresult=True)
def dopt_freeze_bn_stats(adapter: str, model: Any, freeze: bool) -> Any | None:
    """Stop (or resume) BatchNorm statistics updates in folded layers during QAT.

    dopt's addition to the reference's operations: the usual second phase of QAT, where a
    folded layer computes exactly the exported convolution.

    :param adapter: the adapter that claimed ``model``; the call reaches only that
        adapter's implementation.
    :param model: a model returned by ``dopt_optimize_model``.
    :param freeze: ``True`` freezes the statistics, ``False`` lets them update again.
    :returns: the model.
    :firstresult: yes: the chosen adapter's result, ``None`` if it does not implement it.
    """


@hookspec(firstresult=True)
def dopt_generate_final_model(adapter: str, model: Any, config_file: StrPath,
                              weights_file: StrPath | None, output_dir: StrPath,
                              options: Mapping[str, Any]) -> dict[str, str] | None:
    """Write the deployable model(s) and the parameter file.

    :param adapter: the adapter that claimed ``model``; the call reaches only that
        adapter's implementation.
    :param model: a freshly built float model (or, for Keras, the quantized one).
    :param config_file: the strategy JSON used for training.
    :param weights_file: the trained quantized weights (``quant.pth``, a TF checkpoint,
        a ``.weights.h5``), or ``None`` where ``model`` already carries them.
    :param output_dir: the folder to write into (all files or none).
    :param options: the caller's extra keyword arguments, already checked against
        ``AdapterInfo["options"]["generate_final_model"]``.
    :returns: ``{kind: path}`` of the files written.
    :firstresult: yes: the chosen adapter's result, ``None`` if it does not implement it.
    """


# --- model files: dopt_so and dopt omg ------------------------------------------------


@hookspec
def dopt_claim_file(framework: int, model_path: str) -> str | None:
    """Claim a model file for no-training quantization (``dopt_so``).

    Decide from the file name only: no framework import.

    :param framework: the reference CLI's ``--framework`` number (3 TensorFlow, 5 PyTorch
        or ONNX).
    :param model_path: the ``--model`` argument (a file, a folder, or ``file.py:fn``).
    :returns: the adapter's ``name`` if it quantizes this file, else ``None``.
    :firstresult: no: all claims are collected; the first one is used.
    """


@hookspec(firstresult=True)
def dopt_quantize_file(adapter: str, job: PtqJob) -> dict[str, str] | None:
    """Quantize a model file without training (``dopt_so``).

    Write the quantized model at ``job.output`` and the parameter file at
    ``job.compress_conf``, both atomically.

    :param adapter: the adapter that claimed the file (``dopt_claim_file``); the call
        reaches only that adapter's implementation.
    :param job: the validated job (``dopt.ptq.PtqJob``): model, calibration feeds,
        algorithm, outputs.
    :returns: ``{kind: path}`` of the files written.
    :firstresult: yes: the chosen adapter's result, ``None`` if it does not implement it.
    """


@hookspec(firstresult=True)
def dopt_convert_model(framework: int, model_path: str,
                       input_shapes: dict[str, tuple[int, ...]] | None,
                       out_nodes: str | None, params: dict[str, Any] | None,
                       params_file: str | None) -> tuple[onnx.ModelProto,
                                                          dict[str, Any] | None] | None:
    """Convert a model file of another framework to ONNX for ``dopt omg``.

    Not an adapter operation: an implementation returns ``None`` for a ``framework``
    that is not its own.

    :param framework: the ``--framework`` number of ``model_path`` (3: TensorFlow).
    :param model_path: the ``--model`` file or folder.
    :param input_shapes: ``--input_shape`` parsed (``{name: dims}``), or ``None``.
    :param out_nodes: ``--out_nodes`` as given (``"name:0;name2:0"``), or ``None``.
    :param params: the parameter document of ``--compress_conf``, or ``None``.
    :param params_file: the path ``params`` was read from, for errors.
    :returns: ``(onnx.ModelProto, params)``: the converted graph with ``input_shapes`` and
        ``out_nodes`` applied, and ``params`` re-keyed onto its node names (or ``None``).
    :firstresult: yes: the first plugin that converts ``framework`` answers.
    """


# --- LLM low-bit quantization (``dopt.dopt_llm``; adapter operations) -----------------


@hookspec(firstresult=True)
def dopt_set_quant_state(adapter: str, model: Any, weight_state: bool,
                         input_state: bool) -> Any | None:
    """Switch weight / input fake quantization of a quantized model on or off.

    :param adapter: the adapter that claimed ``model`` (``llm``); the call reaches only
        that adapter's implementation.
    :param model: a model returned by ``dopt_optimize_model``.
    :param weight_state: quantize the weights.
    :param input_state: quantize the layer inputs.
    :returns: ``model``.
    :firstresult: yes: the chosen adapter's result, ``None`` if it does not implement it.
    """


@hookspec(firstresult=True)
def dopt_set_run_mode(adapter: str, model: Any, mode: str) -> Any | None:
    """Set the run mode of a quantized model.

    :param adapter: the adapter that claimed ``model`` (``llm``); the call reaches only
        that adapter's implementation.
    :param model: a model returned by ``dopt_optimize_model``.
    :param mode: ``"hardware"`` (weights frozen on their integer grid, inference only) or
        ``"train"``.
    :returns: ``model``.
    :firstresult: yes: the chosen adapter's result, ``None`` if it does not implement it.
    """


@hookspec(firstresult=True)
def dopt_llm_generate_config(adapter: str, model_path: str, dst_path: str,
                             defaults: Mapping[str, int]) -> dict[str, Any] | None:
    """Write the per-layer ``dopt_config.json`` for the model at ``model_path``.

    :param adapter: the adapter asked for (``llm``); the call reaches only that
        adapter's implementation.
    :param model_path: the model folder or GGUF file.
    :param dst_path: the JSON file to write (atomically).
    :param defaults: ``{"w_bits", "group_size", "act_bits"}`` for every layer.
    :returns: the written document.
    :firstresult: yes: the chosen adapter's result, ``None`` if it does not implement it.
    """


@hookspec(firstresult=True)
def dopt_llm_run_stage(adapter: str, job: LlmJob) -> dict[str, str] | None:
    """Run one stage of the three-stage LLM pipeline.

    :param adapter: the adapter asked for (``llm``); the call reaches only that
        adapter's implementation.
    :param job: the validated stage run (``dopt.dopt_llm.opt_main.LlmJob``).
    :returns: ``{kind: path}`` of the files written (each written whole or not at all).
    :firstresult: yes: the chosen adapter's result, ``None`` if it does not implement it.
    """


# --- architecture search (``dopt nas``; adapter operation) ------------------------------


@hookspec(firstresult=True)
def dopt_nas_backend(adapter: str) -> type | None:
    """The class that trains and evaluates NASEA candidates in the adapter's framework.

    The framework-free search (``dopt.nas``) builds it as ``cls(cfg, user_module,
    log=...)`` and drives it through the ``dopt.nas.backend.NasBackend`` protocol:
    supernet training, sub-net evaluation with the user's metric, size and MACs, ONNX
    export for the NPU cost model, and ``model_arch_result_N.py`` files (``docs/nas.md``).

    :param adapter: the adapter of the scenario's ``framework`` (``torch`` for PyTorch,
        ``tensorflow`` for TensorFlow); the call reaches only that adapter's
        implementation.
    :returns: the backend class (not an instance), or ``None``.
    :firstresult: yes: the chosen adapter's result, ``None`` if it does not implement it.
    """


# --- pruning and distillation (``dopt prune``, ``dopt.distill``; adapter operations) ----


@hookspec(firstresult=True)
def dopt_prune_backend(adapter: str) -> type | None:
    """The class that carries out structured channel pruning in the adapter's framework.

    The framework-free search (``dopt.prune``) builds it as ``cls(model, input_shape=...,
    importance=..., calib_data=..., eval_fn=..., ignored_layers=..., log=...)`` and drives
    it through the ``dopt.prune.backend.PruneBackend`` protocol: channel groups from a
    dependency graph, per-channel importance, pruned candidates exported as ONNX for the NPU
    cost model, BatchNorm recalibration and the saved rebuild files (``docs/pruning.md``).

    :param adapter: the adapter that claims the model (``torch``); the call reaches only
        that adapter's implementation.
    :returns: the backend class (not an instance), or ``None``.
    :firstresult: yes: the chosen adapter's result, ``None`` if it does not implement it.
    """


@hookspec(firstresult=True)
def dopt_distill_loss(adapter: str, teacher: Any, student: Any, config: Any) -> Any | None:
    """A knowledge-distillation loss in the adapter's framework, for the user's own loop.

    ``dopt.distill.loss(teacher, student, ...)`` validates the settings into a
    ``dopt.distill.DistillConfig`` and dispatches on the adapter that claims ``student``.
    The loss adds KL divergence at temperature ``T`` between the frozen teacher's and the
    student's logits (scaled by ``T**2``) and, optionally, the MSE between paired
    intermediate features (through a trainable 1x1 adapter where widths differ), each
    weighted on the config's schedule (``docs/pruning.md``).

    :param adapter: the adapter that claims ``student``; the call reaches only that
        adapter's implementation.
    :param teacher: the trained model to distil from (left unchanged, its parameters frozen).
    :param student: the model being trained (e.g. a pruned or a QAT model).
    :param config: the validated ``dopt.distill.DistillConfig``.
    :returns: the framework's loss object (a ``torch.nn.Module`` for PyTorch, a Keras
        model wrapper for Keras), or ``None``.
    :firstresult: yes: the chosen adapter's result, ``None`` if it does not implement it.
    """


# --- introspection ----------------------------------------------------------------------


def specs() -> dict[str, Callable]:
    """``{hook name: specification function}`` in definition order."""
    mod = sys.modules[__name__]
    return {name: fn for name, fn in vars(mod).items()
            if name.startswith(PROJECT + "_") and callable(fn)
            and getattr(fn, PROJECT + "_spec", None) is not None}


def is_firstresult(name: str) -> bool:
    return bool(getattr(specs()[name], PROJECT + "_spec")["firstresult"])


def is_operation(name: str) -> bool:
    """An adapter operation: dispatched on its ``adapter`` argument."""
    return "adapter" in inspect.signature(specs()[name]).parameters


def summary(name: str) -> str:
    """The first line of the hook's docstring."""
    return inspect.getdoc(specs()[name]).splitlines()[0].strip()


def markdown_table(rows: Sequence[str] | None = None) -> str:
    """The hook table of ``docs/plugins.md`` (``python -m dopt.hookspecs`` prints it)."""
    lines = ["| hook | called | purpose |", "|---|---|---|"]
    for name in rows or specs():
        args = ", ".join(inspect.signature(specs()[name]).parameters)
        if is_operation(name):
            kind = "first result, chosen adapter only"
        elif is_firstresult(name):
            kind = "first result"
        else:
            kind = "all results"
        text = re.sub(r":\w+:`", "`", summary(name)).replace("``", "`")
        lines.append(f"| `{name}({args})` | {kind} | {text} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
