"""Hook implementations of the ONNX adapter (entry point ``dopt: onnx``).

Importing this module must not import onnx: the claim decides from the file name.
"""
from __future__ import annotations

import sys

from dopt.hookspecs import hookimpl

NAME = "onnx"


@hookimpl
def dopt_adapter_info():
    return {"name": NAME, "framework": "ONNX", "extra": "onnx",
            "accepts": "an .onnx file (dopt_so --framework 5) or an onnx.ModelProto",
            "operations": ["quantize_file (dopt_so)"],
            "strategies": ["float", "Quant_INT8-8"],
            "options": {}}  # no reference operation, so no keyword options


@hookimpl
def dopt_claim_model(model):
    onnx = sys.modules.get("onnx")
    if onnx is not None and isinstance(model, onnx.ModelProto):
        return NAME
    return None


@hookimpl
def dopt_claim_file(framework, model_path):
    if framework == 5 and str(model_path).lower().endswith(".onnx"):
        return NAME
    return None


@hookimpl
def dopt_quantize_file(job):
    # called only for this adapter: the plugin manager dispatches on ``adapter``
    from .ptq_backend import quantize_job
    return quantize_job(job)
