"""Loading user checkpoints safely: never unpickle, clear errors for every bad file."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from dopt.errors import DoptError


def load_state_dict(path, *, what="checkpoint") -> dict:
    p = Path(path)
    f = str(p)
    if not p.is_file():
        raise DoptError(f"the {what} file does not exist", file=f,
                        hint="pass the file written by torch.save(quant_model.state_dict(), ...)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError,
            OSError, KeyError, IndexError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else e.__class__.__name__
        raise DoptError(f"the {what} file is not a readable PyTorch checkpoint ({first})", file=f,
                        expected="a file written by torch.save(model.state_dict(), path)",
                        hint="re-save it; objects other than tensors and plain containers are "
                             "refused because loading never unpickles code") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        found = type(obj).__name__
        if isinstance(obj, dict):
            bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
            found = f"a dict whose entry {bad!r} is not a tensor" if bad else "an empty dict"
        raise DoptError(f"the {what} file does not hold a state dict", file=f,
                        expected="a mapping of parameter names to tensors "
                                 "(torch.save(quant_model.state_dict(), path))", found=found)
    return obj


def load_into(model, state: dict, *, file: str, quant_keys_hint: bool = True) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} key(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            detail.append(f"unexpected {len(unexpected)} key(s), e.g. {', '.join(unexpected[:3])}")
        hint = "pass the checkpoint saved from the model returned by optimize_model, built with " \
               "the same configuration file"
        if quant_keys_hint and missing and all(".act." in k or k.endswith("initialized")
                                               or ".layer." in k for k in missing[:3]):
            hint = "this looks like a float checkpoint: " + hint
        raise DoptError("the checkpoint does not match the quantized model: " + "; ".join(detail),
                        file=file, hint=hint)
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        k = bad[0]
        raise DoptError(f"the checkpoint's tensor '{k}' has another shape", file=file, field=k,
                        expected=str(tuple(own[k].shape)), found=str(tuple(state[k].shape)),
                        hint="the model definition differs from the one that was trained")
    model.load_state_dict(state, strict=True)
