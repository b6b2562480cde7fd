"""The reference's LLM simulation API, same names: quantize a loaded HuggingFace model.

``optimize_model(base_model, dopt_config)`` swaps the configured layers for fake-quant ones
(load ``trained.pth`` into the result with ``strict=True``); ``set_quant_state`` switches
weight / input quantization, ``set_calibrate_state`` activation range collection,
``set_run_mode(model, "hardware")`` freezes the weights on their integer grid for inference.
"""
from __future__ import annotations

from os import PathLike
from typing import TYPE_CHECKING, Literal, Union

from ..plugin_manager import call

if TYPE_CHECKING:   # annotations only: the core never imports a framework at run time
    from torch import nn

__all__ = ["optimize_model", "set_quant_state", "set_calibrate_state", "set_run_mode"]


def optimize_model(base_model: nn.Module, dopt_config: Union[str, "PathLike[str]"]) -> nn.Module:
    return call("optimize_model", base_model, want="llm", config_path=str(dopt_config),
                options={})


def set_quant_state(model: nn.Module, weight_state: bool = True, input_state: bool = True) -> None:
    return call("set_quant_state", model, want="llm", weight_state=bool(weight_state),
                input_state=bool(input_state))


def set_calibrate_state(model: nn.Module, flag: bool) -> None:
    return call("set_calibrate_state", model, want="llm", calibrate=bool(flag))


def set_run_mode(model: nn.Module, mode: Literal["hardware", "train"] = "hardware") -> None:
    return call("set_run_mode", model, want="llm", mode=mode)
