"""``dopt_so --framework 5 --model net.py --weight net.pth``: no-training PTQ of a PyTorch model.

The model-definition ``.py`` is the user's own code and is imported as such; the weights
load with ``weights_only=True``. The core PTQ algorithm (``dopt.ptq.run_ptq``: layer
selection, CLE, calibration, bias correction, the check) runs on the adapter's backend
(``ptq_backend.py``), and the export is the adapter's ``generate_final_model``, so the
files match what plugin-style quantization writes:

* ``--output x.pt``: state dict of the calibrated fake-quant model (load it into
  ``optimize_model(Net(), "x_config.json")``; tensors only, ``weights_only=True`` safe),
* ``x.onnx`` beside it: the deployable float graph the parameter file is keyed against,
* ``x_qdq.onnx``: the same with QuantizeLinear/DequantizeLinear (runs in ONNX Runtime),
* ``x_config.json``: the per-layer configuration that was used,
* ``--compress_conf``: the parameter file for ``dopt omg --compress_conf``.
"""
from __future__ import annotations

import inspect
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from dopt.formats import param_file as P
from dopt import userpy
from dopt.errors import DoptError
from dopt.formats.fileio import atomic_paths
from dopt.ptq import run_ptq

from .api import check_input_names
from .checkpoint import load_into, load_state_dict
from .ptq_backend import TorchPtqBackend


def build_user_model(spec: str) -> nn.Module:
    """``net.py`` (the one nn.Module class defined there) or ``net.py:Name``."""
    if ":" in Path(spec).name:
        model = userpy.build(spec)
    else:
        mod = userpy.load_module(spec)
        classes = [c for c in vars(mod).values() if inspect.isclass(c)
                   and issubclass(c, nn.Module) and c.__module__ == mod.__name__]
        if len(classes) != 1:
            names = ", ".join(c.__name__ for c in classes) or "none"
            raise DoptError("cannot tell which class in the model definition is the model",
                            file=spec, field="--model",
                            expected="exactly one torch.nn.Module subclass defined in the file",
                            found=names, hint="name it: --model net.py:ClassName")
        model = userpy.build(f"{spec}:{classes[0].__name__}")
    if not isinstance(model, nn.Module):
        raise DoptError("the model definition did not build a torch.nn.Module", file=spec,
                        field="--model", found=type(model).__name__)
    return model


def quantize_job(job) -> dict:
    model = build_user_model(job.model)
    state = load_state_dict(job.weight, what="model weights")
    load_into(model, state, file=str(job.weight), quant_keys_hint=False)
    model.eval()
    check_input_names(model, job.input_shapes, field="--input_shape")
    device = torch.device("cpu")
    if job.use_gpu and torch.cuda.is_available():
        device = torch.device("cuda", job.device_idx)
        job.log(f"device: GPU {job.device_idx}")
    else:
        job.log("device: " + ("USE_GPU asked, but torch sees no GPU: calibrating on the CPU"
                              if job.use_gpu else "CPU"))
    out = Path(job.output)
    stem = out.with_suffix("")
    work = Path(tempfile.mkdtemp(prefix=".dopt-so-"))
    try:
        backend = TorchPtqBackend(model.to(device), job.input_shapes, work, device=device,
                                  log=job.log)
        outcome = run_ptq(backend, job.feeds, job, file=job.model)
        files = outcome.written
        doc = P.read_params(files["param_file"])
        doc["model"] = stem.name + ".onnx"
        doc["producer"]["tool"] = "dopt_so"
        doc["producer"]["ptq"] = outcome.notes
        dests = (out, Path(job.compress_conf), Path(f"{stem}.onnx"), Path(f"{stem}_qdq.onnx"),
                 Path(f"{stem}_config.json"))
        with atomic_paths(*dests) as (t_pt, t_par, t_onnx, t_qdq, t_cfg):
            shutil.copyfile(files["checkpoint"], t_pt)
            P.write_params(t_par, doc)
            shutil.copyfile(files["float_onnx"], t_onnx)
            shutil.copyfile(files["qdq_onnx"], t_qdq)
            shutil.copyfile(files["config"], t_cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"model": str(out), "param_file": job.compress_conf, "float_onnx": str(dests[2]),
            "qdq_onnx": str(dests[3]), "config": str(dests[4])}
