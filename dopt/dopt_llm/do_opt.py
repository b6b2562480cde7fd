"""The reference's LLM simulation API, same names: quantize a loaded HuggingFace model.

``optimize_model(base_model, dopt_config)`` swaps the configured layers for fake-quant ones
(load ``trained.pth`` into the result with ``strict=True``); ``set_quant_state`` switches
weight / input quantization, ``set_calibrate_state`` activation range collection,
``set_run_mode(model, "hardware")`` freezes the weights on their integer grid for inference.
"""
from __future__ import annotations

from ..plugin_manager import call

__all__ = ["optimize_model", "set_quant_state", "set_calibrate_state", "set_run_mode"]


def optimize_model(base_model, dopt_config):
    return call("optimize_model", base_model, want="llm", config_path=str(dopt_config),
                options={})


def set_quant_state(model, weight_state=True, input_state=True):
    return call("set_quant_state", model, want="llm", weight_state=bool(weight_state),
                input_state=bool(input_state))


def set_calibrate_state(model, flag):
    return call("set_calibrate_state", model, want="llm", calibrate=bool(flag))


def set_run_mode(model, mode="hardware"):
    return call("set_run_mode", model, want="llm", mode=mode)
