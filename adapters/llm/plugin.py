"""Hook implementations of the LLM adapter (entry point ``dopt: llm``).

Importing this module imports neither torch nor transformers: a HuggingFace model can only
exist once transformers is imported, and the path-based pipeline hooks import lazily.
Operations are called only for this adapter (the plugin manager dispatches on the
``adapter`` argument), so they neither take nor test it.
"""
from __future__ import annotations

import sys

from dopt.hookspecs import hookimpl

NAME = "llm"
#: Keyword options passed on to ``model_opt.optimize_model`` (checked by the plugin manager).
OPTIONS: dict[str, tuple[str, ...]] = {"optimize_model": ("cli_defaults", "data")}


@hookimpl
def dopt_adapter_info():
    return {"name": NAME, "framework": "HuggingFace transformers (PyTorch)", "extra": "llm",
            "accepts": "a transformers causal LM (AutoModelForCausalLM)",
            "operations": ["optimize_model", "set_quant_state", "set_calibrate_state",
                           "set_run_mode", "llm_quant_pipline"],
            "strategies": ["Quant_INT16-4"],
            "options": {op: list(names) for op, names in OPTIONS.items()}}


@hookimpl
def dopt_claim_model(model):
    tf = sys.modules.get("transformers")
    if tf is not None and isinstance(model, tf.PreTrainedModel):
        return NAME
    return None


@hookimpl
def dopt_optimize_model(model, config_path, options):
    from .model_opt import optimize_model
    return optimize_model(model, config_path, **options)


@hookimpl
def dopt_set_calibrate_state(model, calibrate):
    from .model_opt import set_calibrate_state
    return set_calibrate_state(model, calibrate)


@hookimpl
def dopt_set_quant_state(model, weight_state, input_state):
    from .model_opt import set_quant_state
    return set_quant_state(model, weight_state, input_state)


@hookimpl
def dopt_set_run_mode(model, mode):
    from .model_opt import set_run_mode
    return set_run_mode(model, mode)


@hookimpl
def dopt_llm_generate_config(model_path, dst_path, defaults):
    from .hf_model import load_causal_lm
    from .model_opt import generate_config
    model, _ = load_causal_lm(model_path)
    return generate_config(model, dst_path, defaults)


@hookimpl
def dopt_llm_run_stage(job):
    from .pipeline import run_stage
    return run_stage(job)
