"""Outputs appear whole or not at all: write to a temporary sibling, then rename."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import DoptError


def _check_dir_writable(directory: Path) -> None:
    if not directory.is_dir():
        raise DoptError("the output directory does not exist", file=str(directory),
                        hint="create it first or choose an existing directory")
    if not os.access(directory, os.W_OK):
        raise DoptError("the output directory is not writable", file=str(directory),
                        hint="choose a directory you can write to")


def check_output_path(dest, *, field: str) -> None:
    """Fail before any long work when ``dest`` could not be written at the end."""
    d = Path(dest)
    if d.is_dir():
        raise DoptError("the output path is a directory", file=str(dest), field=field,
                        expected="a file path")
    try:
        _check_dir_writable(d.parent)
    except DoptError as e:
        raise DoptError(e.what, file=e.file, field=field, hint=e.hint) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success rename it over ``dest``."""
    dest = Path(dest)
    _check_dir_writable(dest.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.is_file():  # mkstemp makes 0600 files; give the user's usual permissions
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_paths(*dests) -> Iterator[tuple[Path, ...]]:
    """Several outputs that appear together: temporaries beside each, renamed only when all
    were written (a failure leaves none of them)."""
    stack = contextlib.ExitStack()
    with stack:
        tmps = tuple(stack.enter_context(atomic_path(d)) for d in dests)
        yield tmps
        # the renames happen as the stack unwinds; all files exist by now


def write_json_atomic(dest: str | os.PathLike, obj, **json_options) -> None:
    """``obj`` as UTF-8 JSON through a temporary file (``atomic_path``); ``json_options``
    go to ``json.dumps`` over the defaults (indent 2, non-ASCII kept)."""
    text = json.dumps(obj, **{"indent": 2, "ensure_ascii": False, **json_options})
    with atomic_path(dest) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


@contextlib.contextmanager
def staged_outputs(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Stage several outputs in a temporary folder and move them into ``out_dir`` together.

    If the body raises, nothing is left in ``out_dir`` (and ``out_dir`` is not created).
    """
    out_dir = Path(out_dir)
    anchor = out_dir if out_dir.exists() else out_dir.parent
    if not anchor.exists():
        raise DoptError("the output directory's parent does not exist", file=str(out_dir),
                        hint="create the parent directory or choose another output_dir")
    _check_dir_writable(anchor)
    stage = Path(tempfile.mkdtemp(prefix=".dopt-stage-", dir=anchor))
    try:
        yield stage
        out_dir.mkdir(exist_ok=True)
        for item in sorted(stage.iterdir()):
            os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


class DuplicateKeyError(ValueError):
    """A JSON object repeats a key (``json`` would silently keep the last one)."""

    def __init__(self, key: str):
        super().__init__(f"duplicate key {key!r}")
        self.key = key


def reject_duplicate_keys(pairs: list) -> dict:
    """``object_pairs_hook`` for files where a repeated key is a mistake, not an override."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKeyError(k)
        out[k] = v
    return out


def existing_file(path, *, field: str, max_bytes: int, what: str = "file") -> Path:
    """A user-given input file that exists and is not larger than ``max_bytes``."""
    p = Path(path)
    if not p.is_file():
        raise DoptError(f"the {what} does not exist", file=str(path), field=field)
    if p.stat().st_size > max_bytes:
        raise DoptError(f"the {what} is too large", file=str(path), field=field,
                        expected=f"at most {max_bytes} bytes")
    return p
