"""Reference-compatible PyTorch API (``tools_dopt/dopt_pytorch_py3``), same signatures.

Each call goes through the hook dispatch with the torch adapter required, so a
missing ``dopt[torch]`` install or a non-``nn.Module`` argument is a clear error.
"""
from __future__ import annotations

from ..plugin_manager import call

__all__ = ["generate_config_file", "optimize_model", "set_calibrate_state", "get_quant_loss",
           "generate_final_model", "freeze_bn_stats"]


def generate_config_file(model, input_shape, dst_path="./config_gen.json"):
    return call("generate_config_file", model, want="torch", dst_path=dst_path,
                input_shape=input_shape, options={})


def optimize_model(model, config_path):
    return call("optimize_model", model, want="torch", config_path=config_path, options={})


def set_calibrate_state(quant_model, calibration_mode):
    return call("set_calibrate_state", quant_model, want="torch", calibrate=bool(calibration_mode))


def get_quant_loss(quant_model):
    return call("get_quant_loss", quant_model, want="torch")


def generate_final_model(model, config_file, pth_file="quant.pth", output_dir="./"):
    return call("generate_final_model", model, want="torch", config_file=config_file,
                weights_file=pth_file, output_dir=output_dir, options={})


def freeze_bn_stats(quant_model, freeze=True):
    """dopt addition: freeze BatchNorm statistics of folded layers (second phase of QAT)."""
    return call("freeze_bn_stats", quant_model, want="torch", freeze=bool(freeze))
