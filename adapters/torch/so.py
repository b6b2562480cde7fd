"""``dopt_so --framework 5 --model net.py --weight net.pth``: no-training PTQ of a PyTorch model.

The model-definition ``.py`` is the user's own code and is imported as such; the weights
load with ``weights_only=True``. Calibration runs the adapter's own fake-quant model with
the core range algorithm, and the export is the adapter's ``generate_final_model``, so
the files match what plugin-style quantization writes:

* ``--output x.pt``: state dict of the calibrated fake-quant model (load it into
  ``optimize_model(Net(), "x_config.json")``; tensors only, ``weights_only=True`` safe),
* ``x.onnx`` beside it: the deployable float graph the parameter file is keyed against,
* ``x_qdq.onnx``: the same with QuantizeLinear/DequantizeLinear (runs in ONNX Runtime),
* ``x_config.json``: the per-layer configuration that was used,
* ``--compress_conf``: the parameter file for ``dopt omg --compress_conf``.
"""
from __future__ import annotations

import copy
import inspect
import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from dopt import params as P
from dopt import userpy
from dopt.calibrate import calibrate
from dopt.config import FLOAT, INT8
from dopt.errors import DoptError
from dopt.fileio import atomic_paths

from .api import (check_input_names, generate_config_file, npu_skips_int8, optimize_model,
                  set_calibrate_state)
from .checkpoint import load_into, load_state_dict
from .export import generate_final_model


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


def _config(model, job, work: Path) -> Path:
    gen = work / "config_gen.json"
    shape = ";".join(f"{k}:{','.join(map(str, v))}" for k, v in job.input_shapes.items())
    generate_config_file(model, shape, str(gen))
    doc = json.loads(gen.read_text())
    names = list(doc["layer_strategy"])
    unknown = [e for e in job.exclude if e not in doc["layer_strategy"]]
    if unknown:
        raise DoptError(f"exclude_op names layer(s) the model does not have: "
                        f"{', '.join(unknown)}", file=job.config_file, field="exclude_op",
                        expected="names of Conv2d/Linear modules, e.g. " + ", ".join(names[:5]))
    floats = {e: "exclude_op" for e in job.exclude}
    if job.npu_placement:
        from dopt.npu.profile import load_profile
        from dopt.npu.rules import int8_skip_reason
        mods, profile = dict(model.named_modules()), load_profile()
        for n in npu_skips_int8(mods, names):
            floats.setdefault(n, int8_skip_reason(mods[n].in_channels, profile))
    for n, entry in doc["layer_strategy"].items():
        entry["quant_strategy"] = FLOAT if n in floats else INT8
        if n in floats:
            job.log(f"float: {n} ({floats[n]})")
    if len(floats) == len(names):
        raise DoptError("no layer is left to quantize", file=job.config_file,
                        field="exclude_op", hint="exclude fewer layers")
    doc["dopt_options"] = {"activation_range": job.algorithm}
    cfg = work / "config.json"
    cfg.write_text(json.dumps(doc, indent=2))
    return cfg


def quantize_job(job) -> dict:
    model = build_user_model(job.model)
    state = load_state_dict(job.weight, what="model weights")
    load_into(model, state, file=str(job.weight), quant_keys_hint=False)
    model.eval()
    check_input_names(model, job.input_shapes, field="--input_shape")
    if job.equalization or job.bias_correction:
        job.log("cross-layer equalization and bias correction run on the ONNX path; for "
                "PyTorch models calibrate the exported .onnx to get them")
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
        cfg = _config(model, job, work)
        qmodel = optimize_model(copy.deepcopy(model), str(cfg)).to(device)
        set_calibrate_state(qmodel, True)

        def forward(feed):
            with torch.no_grad():
                qmodel(**{k: torch.from_numpy(v).to(device) for k, v in feed.items()})
            return {}

        job.log(f"calibrating with '{job.algorithm}'")
        stats = calibrate(forward, job.feeds(), tensors=[], algorithm=job.algorithm,
                          total=job.num_samples, progress=job.progress, log=job.log)
        set_calibrate_state(qmodel, False)
        qmodel.cpu()
        ckpt = work / "quant.pth"
        torch.save(qmodel.state_dict(), ckpt)
        files = generate_final_model(model, str(cfg), str(ckpt), str(work / "final"))
        doc = P.read_params(files["param_file"])
        doc["model"] = stem.name + ".onnx"
        doc["producer"]["tool"] = "dopt_so"
        dests = (out, Path(job.compress_conf), Path(f"{stem}.onnx"), Path(f"{stem}_qdq.onnx"),
                 Path(f"{stem}_config.json"))
        with atomic_paths(*dests) as (t_pt, t_par, t_onnx, t_qdq, t_cfg):
            shutil.copyfile(ckpt, t_pt)
            P.write_params(t_par, doc)
            shutil.copyfile(files["float_onnx"], t_onnx)
            shutil.copyfile(files["qdq_onnx"], t_qdq)
            shutil.copyfile(cfg, t_cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    job.log(f"{sum(1 for _ in doc['layers'])} layer(s) INT8; {stats.samples} calibration "
            f"sample(s)" + (" (interrupted)" if stats.interrupted else ""))
    return {"model": str(out), "param_file": job.compress_conf, "float_onnx": str(dests[2]),
            "qdq_onnx": str(dests[3]), "config": str(dests[4])}
