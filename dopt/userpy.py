"""Import a user's model-definition ``.py`` (their own code, as the reference CLI does)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .errors import DoptError


def load_module(path, *, field: str = "--model"):
    """Import the user's ``.py`` as a module of its own (their code runs, as intended)."""
    p = Path(path)
    if p.suffix != ".py" or not p.is_file():
        raise DoptError("the model definition file does not exist or is not a .py file",
                        file=str(path), field=field)
    mod_name = f"dopt_user_model_{abs(hash(str(p.resolve())))}"
    try:
        s = importlib.util.spec_from_file_location(mod_name, p)
        mod = importlib.util.module_from_spec(s)
        sys.modules[mod_name] = mod
        sys.path.insert(0, str(p.resolve().parent))
        try:
            s.loader.exec_module(mod)
        finally:
            sys.path.pop(0)
    except Exception as e:
        raise DoptError(f"importing the model definition failed: {e.__class__.__name__}: {e}",
                        file=str(path), field=field, hint="run the file with python to see the "
                        "error in your code") from None
    return mod


def load_object(spec: str, *, field: str = "--model"):
    """``path/to/net.py:Name`` -> the object ``Name`` defined in that file."""
    if ":" not in spec:
        raise DoptError("the model must be given as FILE.py:NAME", field=field,
                        found=repr(spec), hint="e.g. --model net.py:Net (a class or a function "
                        "that builds the float model with no arguments)")
    path, name = spec.rsplit(":", 1)
    mod = load_module(path, field=field)
    if not hasattr(mod, name):
        public = [n for n in vars(mod) if not n.startswith("_")]
        raise DoptError(f"the model definition file has no '{name}'", file=path, field=field,
                        expected=f"one of {public[:10]}")
    return getattr(mod, name)


def build(spec: str, *, field: str = "--model"):
    obj = load_object(spec, field=field)
    try:
        return obj() if callable(obj) else obj
    except Exception as e:
        raise DoptError(f"building the model failed: {e.__class__.__name__}: {e}",
                        file=spec.rsplit(":", 1)[0], field=field,
                        hint="the class or function must build the model with no arguments") \
            from None
