"""Reference-compatible PyTorch API (``tools_dopt/dopt_pytorch_py3``), same signatures.

Each call goes through the hook dispatch with the torch adapter required, so a
missing ``dopt[torch]`` install or a non-``nn.Module`` argument is a clear error.
"""
from __future__ import annotations

from os import PathLike
from typing import TYPE_CHECKING, Union

from ..plugin_manager import call

if TYPE_CHECKING:   # annotations only: the core never imports a framework at run time
    from torch import nn

StrPath = Union[str, "PathLike[str]"]

__all__ = ["generate_config_file", "optimize_model", "set_calibrate_state", "get_quant_loss",
           "generate_final_model", "freeze_bn_stats"]


def generate_config_file(model: nn.Module, input_shape: str | dict[str, tuple[int, ...]],
                         dst_path: StrPath = "./config_gen.json") -> None:
    """Write the per-layer strategy JSON for ``model`` (every quantizable layer listed)."""
    return call("generate_config_file", model, want="torch", dst_path=dst_path,
                input_shape=input_shape, options={})


def optimize_model(model: nn.Module, config_path: StrPath) -> nn.Module:
    """The fake-quant model for QAT or calibration, built from the strategy JSON."""
    return call("optimize_model", model, want="torch", config_path=config_path, options={})


def set_calibrate_state(quant_model: nn.Module, calibration_mode: bool) -> None:
    """Switch activation-range collection on (calibration) or off."""
    return call("set_calibrate_state", quant_model, want="torch", calibrate=bool(calibration_mode))


def get_quant_loss(quant_model: nn.Module):
    """The quantization regularization loss to add to the task loss (a scalar tensor)."""
    return call("get_quant_loss", quant_model, want="torch")


def generate_final_model(model: nn.Module, config_file: StrPath, pth_file: StrPath = "quant.pth",
                         output_dir: StrPath = "./") -> dict[str, str]:
    """Deployable float model + INT8 parameter file (+ QDQ ONNX) from a QAT checkpoint;
    returns ``{kind: path}`` of the files written."""
    return call("generate_final_model", model, want="torch", config_file=config_file,
                weights_file=pth_file, output_dir=output_dir, options={})


def freeze_bn_stats(quant_model: nn.Module, freeze: bool = True) -> None:
    """dopt addition: freeze BatchNorm statistics of folded layers (second phase of QAT)."""
    return call("freeze_bn_stats", quant_model, want="torch", freeze=bool(freeze))
