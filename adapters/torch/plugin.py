"""Hook implementations of the PyTorch adapter (entry point ``dopt: torch``).

Importing this module must not import torch: ``import dopt`` and dispatch stay
framework-free, and a torch model can only exist if torch is already imported.

Operations are called only for this adapter (the plugin manager dispatches on the
``adapter`` argument), so they neither take nor test it. ``options`` arrive checked
against ``OPTIONS`` and are passed on as keyword arguments.
"""
from __future__ import annotations

import sys

from dopt.hookspecs import hookimpl

NAME = "torch"
#: Keyword options each operation passes on (``dopt.optimize_model(model, cfg, **options)``):
#: the keyword parameters of ``api.generate_config_file`` / ``api.optimize_model`` /
#: ``export.generate_final_model`` beyond the hook's own arguments (none today).
OPTIONS: dict[str, tuple[str, ...]] = {"generate_config_file": (), "optimize_model": (),
                                       "generate_final_model": ()}


@hookimpl
def dopt_adapter_info():
    return {"name": NAME, "framework": "PyTorch", "extra": "torch",
            "accepts": "a torch.nn.Module (optionally wrapped in DistributedDataParallel)",
            "operations": ["generate_config_file", "optimize_model", "set_calibrate_state",
                           "get_quant_loss", "generate_final_model", "nas_backend",
                           "prune_backend", "distill_loss"],
            "strategies": ["float", "Quant_INT8-8"],
            "options": {op: list(names) for op, names in OPTIONS.items()}}


@hookimpl
def dopt_claim_model(model):
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        return NAME
    return None


@hookimpl
def dopt_generate_config_file(model, dst_path, input_shape, options):
    from .api import generate_config_file
    return generate_config_file(model, input_shape, dst_path, **options)


@hookimpl
def dopt_optimize_model(model, config_path, options):
    from .api import optimize_model
    return optimize_model(model, config_path, **options)


@hookimpl
def dopt_set_calibrate_state(model, calibrate):
    from .api import set_calibrate_state
    return set_calibrate_state(model, calibrate)


@hookimpl
def dopt_get_quant_loss(model):
    from .api import get_quant_loss
    return get_quant_loss(model)


@hookimpl
def dopt_freeze_bn_stats(model, freeze):
    from .api import freeze_bn_stats
    return freeze_bn_stats(model, freeze)


@hookimpl
def dopt_generate_final_model(model, config_file, weights_file, output_dir, options):
    from .export import generate_final_model
    return generate_final_model(model, config_file, weights_file, output_dir, **options)


@hookimpl
def dopt_claim_file(framework, model_path):
    path = str(model_path)
    if framework == 5 and (path.lower().endswith(".py") or ".py:" in path):
        return NAME
    return None


@hookimpl
def dopt_quantize_file(job):
    from .so import quantize_job
    return quantize_job(job)


@hookimpl
def dopt_nas_backend():
    from .nas_backend import TorchNasBackend
    return TorchNasBackend


@hookimpl
def dopt_prune_backend():
    from .prune_backend import TorchPruneBackend
    return TorchPruneBackend


@hookimpl
def dopt_distill_loss(teacher, student, config):
    from .distill import DistillationLoss
    return DistillationLoss(teacher, student, config)
