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


class MissingExtraError(DoptError):
    """A framework the operation needs is not installed."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the Python package '{package}', which is not installed",
            hint=f"pip install 'dopt[{extra}]' (for torch install the CPU build first: "
                 f"pip install torch==2.13.0)" if extra == "torch" else f"pip install 'dopt[{extra}]'")
