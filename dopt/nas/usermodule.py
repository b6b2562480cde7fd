"""``user_module.py``: the reference's developer interface, loaded from the current folder.

The classes and methods are the reference's (both frameworks); a missing class or method,
or one that cannot be called the way the search calls it, is a one-paragraph error naming
the class and the method, before any training starts.
"""
from __future__ import annotations

import inspect
from pathlib import Path

from ..errors import DoptError
from ..userpy import load_module

#: class -> [(method, positional arguments the search passes (besides self), optional extras)]
CONTRACTS: dict[str, dict[str, list[tuple[str, tuple[str, ...], tuple[str, ...]]]]] = {
    "pytorch": {
        "UserModule": [("__init__", ("epoch", "batch_size"), ()),
                       ("dataset_define", ("dataset_dir", "is_training"), ()),
                       ("scheduler_define", ("optimizer", "steps_per_epoch"), ()),
                       ("metrics_func", ("eval_dataloader", "eval_function"), ()),
                       ("loss_func", ("labels", "logits"), ())],
        "PreNet": [("__init__", (), ()), ("forward", ("inputs",), ())],
        "PostNet": [("__init__", (), ()), ("forward", ("inputs",), ())],
    },
    "tensorflow": {
        "UserModule": [("__init__", ("epoch", "batch_size"), ()),
                       ("build_dataset_search", ("dataset_dir", "is_training"), ("is_shuffle",)),
                       ("lr_scheduler", ("lr_init", "global_step"), ()),
                       ("metrics_op", ("inputs", "outputs"), ()),
                       ("loss_op", ("labels", "logits"), ())],
        "PreNet": [("__init__", (), ()), ("call", ("inputs",), ("training",))],
        "PostNet": [("__init__", (), ()), ("call", ("inputs",), ("training",))],
    },
}


def _accepts(fn, n: int) -> bool:
    """Whether ``fn(self, *n args)`` binds."""
    try:
        inspect.signature(fn).bind(*([None] * (n + 1)))
        return True
    except TypeError:
        return False
    except ValueError:  # builtins without a signature
        return True


def check_user_module(mod, framework: str, path: str = "user_module.py") -> None:
    """Raise a ``DoptError`` naming the class and method that does not match the contract."""
    for cls_name, methods in CONTRACTS[framework].items():
        cls = getattr(mod, cls_name, None)
        if not inspect.isclass(cls):
            raise DoptError(f"user_module.py has no class {cls_name}", file=path,
                            field=cls_name,
                            expected=f"class {cls_name} with "
                                     + ", ".join(m for m, _a, _o in methods),
                            hint="see the user_module.py interface in docs/nas.md")
        for meth, args, optional in methods:
            fn = getattr(cls, meth, None)
            if fn is None or (meth != "__init__" and not callable(fn)):
                raise DoptError(f"class {cls_name} has no method {meth}", file=path,
                                field=f"{cls_name}.{meth}",
                                expected=f"def {meth}(self, {', '.join(args + optional)})")
            if meth == "__init__" and fn is object.__init__:
                continue
            call = ", ".join(args)
            if not _accepts(fn, len(args)):
                try:
                    found = f"def {meth}{inspect.signature(fn)}"
                except (TypeError, ValueError):
                    found = None
                raise DoptError(f"{cls_name}.{meth} cannot be called as {meth}({call})",
                                file=path, field=f"{cls_name}.{meth}",
                                expected=f"def {meth}(self, {', '.join(args + optional)})",
                                found=found)


def load_user_module(framework: str, path: str | None = None):
    """Import ``user_module.py`` (the current folder's, as the reference) and check it."""
    p = Path(path) if path else Path.cwd() / "user_module.py"
    if not p.is_file():
        raise DoptError("user_module.py was not found in the current folder", file=str(p),
                        hint="run the command in the folder that holds user_module.py (the "
                             "reference looks it up there) or pass --user_module PATH")
    mod = load_module(p, field="user_module.py")
    check_user_module(mod, framework, str(p))
    return mod
