"""Save a pruned PyTorch model so that it reloads with no shape surgery.

Three files appear together (or none): ``<name>.py`` builds the pruned architecture (the
original class or builder, then every resized layer replaced by one of its new size, in
plain code a person can read), ``<name>.pth`` is the state dict (loadable with
``weights_only=True``), ``<name>.onnx`` the float network for ``dopt omg`` / ``dopt_so``.
Before anything is moved into place the ``.py`` is imported, its model loads the state dict
strictly and must give the pruned model's outputs.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path

import torch
from torch import nn

from dopt.errors import DoptError
from dopt.formats.fileio import staged_outputs

from .prune_backend import module_signature, write_onnx

_CTOR = {nn.Conv1d: "nn.Conv1d", nn.Conv2d: "nn.Conv2d", nn.Conv3d: "nn.Conv3d",
         nn.ConvTranspose1d: "nn.ConvTranspose1d", nn.ConvTranspose2d: "nn.ConvTranspose2d",
         nn.Linear: "nn.Linear", nn.BatchNorm1d: "nn.BatchNorm1d",
         nn.BatchNorm2d: "nn.BatchNorm2d", nn.BatchNorm3d: "nn.BatchNorm3d",
         nn.GroupNorm: "nn.GroupNorm", nn.LayerNorm: "nn.LayerNorm", nn.PReLU: "nn.PReLU"}


def _builder_source(model: nn.Module, builder: str | None) -> tuple[str, str, str | None]:
    """(how to import, attribute, source file or None) of what builds the unpruned model.

    ``builder``: ``"package.module:Name"`` or ``"path/to/net.py:Name"``; by default the
    model's own class, built with no arguments."""
    if builder:
        where, _, attr = builder.rpartition(":")
        if not where or not attr:
            raise DoptError("the builder must be MODULE:NAME or FILE.py:NAME", field="builder",
                            found=repr(builder))
        if where.endswith(".py"):
            return "", attr, str(Path(where).resolve())
        return where, attr, None
    cls = type(model)
    mod = cls.__module__
    src = inspect.getsourcefile(cls)
    importable = mod not in ("__main__", "builtins") and not mod.startswith("dopt_user_model_")
    if importable:
        return mod, cls.__qualname__, None
    if not src:
        raise DoptError(f"cannot tell where class {cls.__qualname__} is defined",
                        field="builder", hint="pass builder='path/to/net.py:Name'")
    return "", cls.__qualname__, str(Path(src).resolve())


def rebuild_source(model: nn.Module, original: dict, builder: str | None, dst_dir: Path,
                   header: str = "", removed=()) -> str:
    """The ``.py`` text that rebuilds ``model`` (pruned) from its unpruned builder;
    ``removed``: residual blocks depth pruning replaced by ``nn.Identity``."""
    mod, attr, src = _builder_source(model, builder)
    def replace(name: str, ctor: str) -> str:
        parent, _, leaf = name.rpartition(".")
        target = f"model.get_submodule({parent!r})" if parent else "model"
        return f"    setattr({target}, {leaf!r}, {ctor})"

    lines = [replace(name, "nn.Identity()") + "  # residual block removed" for name in removed]
    for name, m in model.named_modules():
        sig = module_signature(m)
        if not name or sig == original.get(name) or name in removed:
            continue   # unchanged; other resized types are caught by the reload check
        if type(m) not in _CTOR:
            raise DoptError(f"layer {name} ({type(m).__name__}) was resized by pruning and the "
                            f"rebuild file cannot construct that type", field=name,
                            hint="exclude it with ignored_layers, or save the ONNX only")
        args = ", ".join(f"{k}={v!r}" for k, v in sig.items())
        lines.append(replace(name, f"{_CTOR[type(m)]}({args})"))
    if src:
        try:
            rel = os.path.relpath(src, dst_dir.resolve())
        except ValueError:   # another drive
            rel = src
        load = (f"_SRC = [Path(__file__).resolve().parent / {rel!r}, Path({src!r})]\n"
                f"\n\ndef _base():\n"
                f"    path = next((p for p in _SRC if p.is_file()), _SRC[-1])\n"
                f"    spec = importlib.util.spec_from_file_location(\n"
                f"        '_dopt_pruned_base_' + str(abs(hash(str(path)))), path)\n"
                f"    mod = importlib.util.module_from_spec(spec)\n"
                f"    sys.path.insert(0, str(path.parent))\n"
                f"    try:\n"
                f"        spec.loader.exec_module(mod)\n"
                f"    finally:\n"
                f"        sys.path.pop(0)\n"
                f"    return getattr(mod, {attr!r})\n")
        imports = "import importlib.util\nimport sys\n"
    else:
        top, _, rest = attr.partition(".")
        load = (f"def _base():\n    from {mod} import {top}\n"
                f"    return {top}{'.' + rest if rest else ''}\n")
        imports = ""
    body = "\n".join(lines) or "    pass  # no layer changed size"
    return f'''"""Pruned {type(model).__name__}: rebuilds the architecture, no shape surgery at load time.
{header}
    from {{this file}} import load
    model = load()            # the pruned architecture + the state dict beside this file

Written by dopt prune; the layers below replace the unpruned ones with their pruned sizes.
"""
{imports}from pathlib import Path

import torch
from torch import nn

{load}

def build():
    """The pruned architecture with fresh weights."""
    model = _base()()
{body}
    return model


def load(weights=None):
    """The pruned model with its weights (default: the .pth beside this file), in eval mode."""
    path = Path(weights) if weights else Path(__file__).with_suffix(".pth")
    model = build()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
'''


def _import_file(path: Path):
    name = "_dopt_pruned_check_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(name, None)
    return mod


def save_pruned(model: nn.Module, out_dir: Path, name: str, *, input_shape, original: dict,
                builder: str | None = None, header: str = "", removed=()) -> dict:
    """Write ``<name>.py``, ``<name>.pth`` and ``<name>.onnx`` into ``out_dir`` together;
    returns ``{"py", "pth", "onnx"}`` paths."""
    if not name.isidentifier():
        raise DoptError("the saved model's name must be a Python identifier", field="name",
                        found=repr(name))
    out_dir = Path(out_dir)
    model = model.eval()
    example = torch.zeros(tuple(input_shape), device=next(model.parameters()).device)
    text = rebuild_source(model, original, builder, out_dir, header, removed=list(removed))
    with staged_outputs(out_dir) as stage:
        py, pth, onnx_path = (stage / f"{name}{s}" for s in (".py", ".pth", ".onnx"))
        py.write_text(text, encoding="utf-8")
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, pth)
        try:
            rebuilt = _import_file(py).load(pth)
        except Exception as e:  # noqa: BLE001 - the check names what failed
            raise DoptError(f"the rebuild file does not reload the pruned model "
                            f"({e.__class__.__name__}: {e})", file=f"{name}.py",
                            hint="the original model must be buildable with no arguments; "
                                 "pass builder='net.py:make_model' otherwise") from None
        with torch.no_grad():
            want = model(example)
            got = rebuilt.to(example.device)(example)
        if not torch.allclose(want, got, rtol=1e-4, atol=1e-5):
            raise DoptError("the rebuilt model's output differs from the pruned model's",
                            file=f"{name}.py", hint="the model's forward may depend on "
                            "attributes pruning does not update (e.g. a stored channel count)")
        write_onnx(model, example, onnx_path)
    return {k: str(out_dir / f"{name}{s}") for k, s in (("py", ".py"), ("pth", ".pth"),
                                                       ("onnx", ".onnx"))}
