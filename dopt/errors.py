"""One error type for everything a user can get wrong.

Every message is one paragraph: which file, which field/layer/offset, what was
expected, what was found and how to fix it. The CLI prints it and exits 2; the
Python API raises it. Nothing from deep inside a framework should reach a user.
"""
from __future__ import annotations


class DoptError(Exception):
    """A user-facing error; ``str(err)`` is the whole paragraph."""

    def __init__(self, what: str, *, file: str | None = None, field: str | None = None,
                 expected: str | None = None, found: str | None = None,
                 hint: str | None = None):
        self.what, self.file, self.field = what, file, field
        self.expected, self.found, self.hint = expected, found, hint
        parts = []
        where = ", ".join(p for p in (f"file '{file}'" if file else None,
                                       f"field '{field}'" if field else None) if p)
        parts.append(f"{where}: {what}" if where else what)
        if expected:
            parts.append(f"expected {expected}")
        if found:
            parts.append(f"found {found}")
        msg = "; ".join(parts) + "."
        if hint:
            msg += f" Fix: {hint}"
        super().__init__(msg)


def run_cli(prog: str, fn, *, interrupted: str = "interrupted") -> int:
    """Run a command's body: a DoptError is one paragraph on stderr and exit 2, Ctrl-C 130."""
    import sys
    try:
        return fn()
    except DoptError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130


#: The ``dopt`` pip extras (``pyproject.toml`` ``[project.optional-dependencies]``) by the
#: adapter that needs them and by the top-level module a framework's objects come from. The
#: one source of every install hint (``install_hint``); an adapter's own
#: ``dopt_adapter_info()["extra"]`` must agree (tests/test_hook_contracts.py checks both).
EXTRAS: dict[str, str] = {
    # adapter names (dopt_adapter_info()["name"]); "torch" and "onnx" are module names too
    "torch": "torch", "onnx": "onnx", "tensorflow": "tf", "llm": "llm",
    # top-level modules of framework objects and of the packages an extra brings
    "keras": "tf", "tf_keras": "tf", "tf2onnx": "tf", "onnxruntime": "onnx",
    "transformers": "llm", "gguf": "llm", "accelerate": "llm",
}


def extra_for(name: str) -> str | None:
    """The ``dopt`` extra for an adapter or module name (``tensorflow`` -> ``tf``), or None."""
    return EXTRAS.get(name.split(".")[0]) if name else None


def install_hint(extra: str) -> str:
    """``pip install 'dopt[<extra>]'``, with the CPU-build note for torch."""
    hint = f"pip install 'dopt[{extra}]'"
    if extra == "torch":
        hint += " (for torch install the CPU build first: pip install torch==2.13.0)"
    return hint


class MissingExtraError(DoptError):
    """A framework the operation needs is not installed."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the Python package '{package}', which is not installed",
            hint=install_hint(extra))
