"""Hook implementations of the PyTorch adapter (entry point ``dopt: torch``).

Importing this module must not import torch: ``import dopt`` and dispatch stay
framework-free, and a torch model can only exist if torch is already imported.
"""
from __future__ import annotations

import sys

from dopt.hookspecs import hookimpl

NAME = "torch"


@hookimpl
def dopt_adapter_info():
    return {"name": NAME, "framework": "PyTorch", "extra": "torch",
            "accepts": "a torch.nn.Module (optionally wrapped in DistributedDataParallel)",
            "operations": ["generate_config_file", "optimize_model", "set_calibrate_state",
                           "get_quant_loss", "generate_final_model"],
            "strategies": ["float", "Quant_INT8-8"]}


@hookimpl
def dopt_claim_model(model):
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        return NAME
    return None


@hookimpl
def dopt_generate_config_file(adapter, model, dst_path, input_shape, options):
    if adapter != NAME:
        return None
    from .api import generate_config_file
    return generate_config_file(model, input_shape, dst_path)


@hookimpl
def dopt_optimize_model(adapter, model, config_path, options):
    if adapter != NAME:
        return None
    from .api import optimize_model
    return optimize_model(model, config_path)


@hookimpl
def dopt_set_calibrate_state(adapter, model, calibrate):
    if adapter != NAME:
        return None
    from .api import set_calibrate_state
    return set_calibrate_state(model, calibrate)


@hookimpl
def dopt_get_quant_loss(adapter, model):
    if adapter != NAME:
        return None
    from .api import get_quant_loss
    return get_quant_loss(model)


@hookimpl
def dopt_generate_final_model(adapter, model, config_file, weights_file, output_dir, options):
    if adapter != NAME:
        return None
    from .export import generate_final_model
    return generate_final_model(model, config_file, weights_file, output_dir)


@hookimpl
def dopt_claim_file(framework, model_path):
    path = str(model_path)
    if framework == 5 and (path.lower().endswith(".py") or ".py:" in path):
        return NAME
    return None


@hookimpl
def dopt_quantize_file(adapter, job):
    if adapter != NAME:
        return None
    from .so import quantize_job
    return quantize_job(job)
