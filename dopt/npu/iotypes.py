"""``--input_type`` / ``--output_type``: the data types an offline model takes and gives.

The reference compiler accepts only the type combinations in its three tables (model's
type -> offline model's type); they are data here, the one source of the checks, the
error messages and the table in docs/omg.md (``table_markdown``). A declared type is
recorded on the compiled graph's input/output entry as ``"io_type"``; the entry's
``"dtype"`` stays the model's own, so the engines are untouched and the conversion
happens at the edges (``check_input``, ``convert_output``), as on the device.
"""
from __future__ import annotations

import difflib
from typing import NamedTuple

import numpy as np

from ..errors import DoptError

#: Reference type names -> NumPy dtype names.
TYPES: dict[str, str] = {"FP32": "float32", "FP16": "float16", "UINT8": "uint8", "INT8": "int8",
                         "INT32": "int32", "INT64": "int64"}
_BY_NUMPY = {v: k for k, v in TYPES.items()}
TYPE_LIST = ", ".join(TYPES)


class Table(NamedTuple):
    flag: str                          # the flag it checks
    name: str                          # how messages cite it
    title: str                         # its caption in the docs
    head: tuple[str, str]              # column titles for the docs
    rows: tuple[tuple[str, str], ...]  # (model's type, offline model's type)


INPUT = Table("--input_type", "the reference's non-AIPP input table",
              "`--input_type`, input without AIPP",
              ("Model's input", "Offline model's input"),
              (("FP32", "FP16"), ("FP32", "FP32"), ("FP16", "FP16"), ("UINT8", "UINT8"),
               ("INT32", "INT32"), ("INT8", "INT8")))
AIPP_INPUT = Table("--input_type", "the reference's AIPP input table",
                   "`--input_type`, input fed by AIPP (`--insert_op_conf`)",
                   ("Model's input", "Offline model's input (AIPP on it)"),
                   (("FP32", "UINT8"), ("FP16", "UINT8"), ("UINT8", "UINT8")))
OUTPUT = Table("--output_type", "the reference's output table", "`--output_type`",
               ("Model's output", "Offline model's output"),
               (("FP32", "UINT8"), ("FP16", "UINT8"), ("UINT8", "UINT8"), ("FP16", "FP16"),
                ("FP32", "FP32"), ("FP32", "FP16"), ("FP16", "FP32"), ("INT8", "INT8"),
                ("INT32", "INT32"), ("INT64", "INT64")))
TABLES = (INPUT, AIPP_INPUT, OUTPUT)


def table_markdown() -> str:
    """The three tables as Markdown, for docs/omg.md."""
    parts = []
    for t in TABLES:
        lines = [f"{t.title}:", "", f"| {t.head[0]} | {t.head[1]} |", "|:--|:--|"]
        lines += [f"| {a} | {b} |" for a, b in t.rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def type_name(dtype) -> str:
    """``float32`` -> ``FP32``; a dtype outside the tables keeps its NumPy name."""
    name = np.dtype(dtype).name
    return _BY_NUMPY.get(name, name)


def _type(value, *, flag: str, entry: str, file: str | None = None) -> str:
    t = value.strip().upper() if isinstance(value, str) else None
    if t not in TYPES:
        raise DoptError(f"unknown data type in {flag}", file=file, field=flag, found=repr(entry),
                        expected=f"name:TYPE with TYPE one of {TYPE_LIST}")
    return t


def _names(text, *, flag: str, expected: str) -> list[str]:
    """``"a;b"`` -> ``["a", "b"]``; an outer ';' is allowed (as in --input_shape), empty
    or repeated entries are not."""
    def bad(why, found):
        return DoptError(f"malformed {flag} ({why})", field=flag, found=repr(found),
                         expected=expected)
    if not isinstance(text, str) or not text.strip().strip(";").strip():
        raise bad("empty", text)
    out = []
    for entry in text.strip().strip(";").split(";"):
        entry = entry.strip()
        if not entry:
            raise bad(f"an empty entry between ';'s in {text!r}", entry)
        out.append(entry)
    return out


def parse_types(text: str, *, flag: str) -> dict[str, str]:
    """``"name:FP16;name2:uint8"`` -> ``{"name": "FP16", "name2": "UINT8"}``.

    Names may contain ':' (TensorFlow tensor names, ``out:0``): the type follows the last.
    """
    expected = f"'name:TYPE' entries separated by ';', TYPE one of {TYPE_LIST}"
    out: dict[str, str] = {}
    for entry in _names(text, flag=flag, expected=expected):
        name, sep, typ = entry.rpartition(":")
        name = name.strip()
        if not sep or not name:
            raise DoptError(f"malformed {flag} ({'no name' if sep else 'no :TYPE'} in an entry)",
                            field=flag, found=repr(entry), expected=expected)
        if name in out:
            raise DoptError(f"malformed {flag} ('{name}' given twice)", field=flag,
                            found=repr(entry), expected=expected, hint="give each name once")
        out[name] = _type(typ, flag=flag, entry=entry)
    return out


def _as_types(value, flag):
    if value is None or isinstance(value, dict):
        return value
    return parse_types(value, flag=flag)


def legacy_flags(input_fp16_nodes, is_output_fp16, *, framework: int, input_type=None,
                 output_type=None, outputs=None):
    """The older FP16 flags next to ``--input_type`` / ``--output_type``.

    ``input_type`` / ``output_type``: the flags' text (or already parsed dicts), ``outputs``:
    the model's output names in order. Returns ``(input_types, output_types, notes)``:
    the type dicts to ``apply`` (None where nothing was asked) and lines for the log.
    As in the reference, each older flag conflicts with its newer one and has no effect on
    ONNX (and MindSpore) models; for TensorFlow they declare FP16 inputs/outputs.
    """
    for old, new, old_flag, new_flag in (
            (input_fp16_nodes, input_type, "--input_fp16_nodes", "--input_type"),
            (is_output_fp16, output_type, "--is_output_fp16", "--output_type")):
        if old is not None and new is not None:
            raise DoptError(f"{old_flag} cannot be given together with {new_flag} "
                            "(as in the reference)", field=old_flag,
                            hint=f"drop {old_flag} and write {new_flag} name:FP16 for those")
    in_types, out_types = _as_types(input_type, "--input_type"), \
        _as_types(output_type, "--output_type")
    notes: list[str] = []
    if framework in (5, 6):
        kind = "ONNX" if framework == 5 else "MindSpore"
        if input_fp16_nodes is not None:
            notes.append(f"--input_fp16_nodes has no effect for {kind} models (as in the "
                         "reference); use --input_type name:FP16")
        if is_output_fp16 is not None:
            notes.append(f"--is_output_fp16 has no effect for {kind} models (as in the "
                         "reference); use --output_type name:FP16")
        return in_types, out_types, notes
    if input_fp16_nodes is not None:
        names = _names(input_fp16_nodes, flag="--input_fp16_nodes",
                       expected="input names separated by ';', e.g. 'x;y'")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise DoptError(f"malformed --input_fp16_nodes ('{dup[0]}' given twice)",
                            field="--input_fp16_nodes", found=repr(input_fp16_nodes),
                            hint="give each input once")
        in_types = {n: "FP16" for n in names}
        notes.append(f"--input_fp16_nodes: {', '.join(names)} take FP16")
    if is_output_fp16 is not None:
        outputs = list(outputs or ())
        vals = [v.strip().lower() for v in str(is_output_fp16).split(",")]
        want = (f"{len(outputs)} comma-separated true/false value(s), one per output in order "
                f"({', '.join(outputs) or 'none'})")
        if any(v not in ("true", "false") for v in vals):
            raise DoptError("--is_output_fp16 takes true/false values", field="--is_output_fp16",
                            expected=want, found=repr(is_output_fp16))
        if len(vals) != len(outputs):
            raise DoptError(f"--is_output_fp16 gives {len(vals)} value(s) for a model with "
                            f"{len(outputs)} output(s)", field="--is_output_fp16",
                            expected=want, found=repr(is_output_fp16))
        out_types = {o: "FP16" for o, v in zip(outputs, vals) if v == "true"}
        if out_types:
            notes.append(f"--is_output_fp16: {', '.join(out_types)} give FP16")
    return in_types, out_types, notes


def _find(entries: list[dict], name: str) -> dict | None:
    """The entry for ``name``; a TensorFlow node name finds its tensor ``name:0``."""
    by = {e["name"]: e for e in entries}
    return by.get(name) or (by.get(name + ":0") if ":" not in name else None)


def _alternatives(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _check(table: Table, what: str, name: str, model: str, asked: str, file) -> None:
    if (model, asked) in table.rows:
        return
    rows = [f"{a}:{b}" for a, b in table.rows if a == model]
    allowed = (f"{table.flag} allows {_alternatives(rows)} for it" if rows
               else f"{table.flag} allows no type for it")
    hint = (f"ask for an allowed type, or leave '{name}' out to keep its {model}" if rows
            else f"leave '{name}' out of {table.flag}")
    hint += "; the table's rows: " + ", ".join(f"{a}:{b}" for a, b in table.rows)
    if table is INPUT and (model, asked) in AIPP_INPUT.rows:
        hint = f"{model} -> {asked} needs AIPP on this input (--insert_op_conf); " + hint
    raise DoptError(f"{what} '{name}' is {model} in the model; {allowed} ({table.name})",
                    file=file, field=table.flag, found=f"{name}:{asked}", hint=hint)


def apply(om, input_types: dict | None, output_types: dict | None, *, file=None) -> list[str]:
    """Check the asked types against the tables and record them as ``entry["io_type"]``
    on ``om.graph``'s inputs/outputs and on those of every ``--dynamic_dims`` gear (all
    checked before any is recorded). Returns lines for the compile log."""
    chosen: list[tuple[str, dict, str]] = []
    lines: list[str] = []
    for kind, types, flag in (("input", input_types, "--input_type"),
                              ("output", output_types, "--output_type")):
        entries = om.graph[f"{kind}s"]
        seen: dict[str, str] = {}
        for name, asked in (types or {}).items():
            asked = _type(asked, flag=flag, entry=f"{name}:{asked}", file=file)
            e = _find(entries, name)
            if e is None:
                there = [x["name"] for x in entries]
                close = difflib.get_close_matches(name, there, n=1)
                raise DoptError(f"{flag} names '{name}', which is not an {kind} of the model",
                                file=file, field=flag, found=repr(name),
                                expected=f"one of the model's {kind}s: {', '.join(there)}",
                                hint=f"did you mean '{close[0]}'?" if close else None)
            if e["name"] in seen:
                raise DoptError(f"{flag} gives {kind} '{e['name']}' twice (as '{seen[e['name']]}' "
                                f"and '{name}')", file=file, field=flag, hint="give it once")
            seen[e["name"]] = name
            aipp = kind == "input" and bool(e.get("aipp"))
            table = AIPP_INPUT if aipp else (INPUT if kind == "input" else OUTPUT)
            model = type_name(e.get("model_dtype", e["dtype"]) if aipp else e["dtype"])
            _check(table, kind, e["name"], model, asked, file)
            chosen.append((f"{kind}s", e, asked))
            if kind == "input":
                how = "takes " + asked + (" frames into AIPP" if aipp else "")
            else:
                how = "gives " + asked + (", rounded half to even and saturated to [0, 255]"
                                          if asked == "UINT8" and model != "UINT8" else "")
            lines.append(f"{kind} '{e['name']}' ({model} in the model): the offline model {how}")
    # a --dynamic_dims model holds a graph per gear (gear 0 is the top level): each gets them
    gears = [x["graph"] for x in (om.graph.get("dynamic") or {}).get("gears", ())
             if x.get("graph")]
    for kind, e, asked in chosen:
        e["io_type"] = asked
        for g in gears:
            for x in g.get(kind, ()):
                if x["name"] == e["name"]:
                    x["io_type"] = asked
    return lines


def _declared(entry: dict, path=None) -> str | None:
    io = entry.get("io_type")
    if io is not None and io not in TYPES:   # a .om written by something else
        raise DoptError(f"'{entry.get('name')}' declares an unknown data type", file=path,
                        field=entry.get("name"), expected=TYPE_LIST, found=repr(io),
                        hint="recompile the model")
    return io


def check_input(entry: dict, array, *, path=None) -> np.ndarray:
    """A run-time input checked against its declared type (``io_type``), converted to
    what the engines compute with: float data as float32 (every FP16 value is exact
    there), integer data unchanged. Without a declared type the array is returned as is."""
    io = _declared(entry, path)
    if io is None:
        return array
    want = np.dtype(TYPES[io])
    a = np.asarray(array)
    if a.dtype != want:
        name = entry["name"]
        raise DoptError(f"input '{name}' takes {io} data", file=path, field=name,
                        expected=f"{want.name} array (--input_type {name}:{io})",
                        found=a.dtype.name,
                        hint=f"convert it first, e.g. x.astype(np.{want.name})")
    return a.astype(np.float32) if want.kind == "f" else a


def convert_output(entry: dict, array, *, path=None) -> np.ndarray:
    """An engine output converted to its declared type (``io_type``; absent: as is).

    FP16 rounds to nearest even; past the FP16 range (magnitude 65520 up) values become inf, as
    on the hardware. UINT8: the reference does not say how it rounds; dopt rounds half to
    even (``np.rint``), saturates to [0, 255] and maps NaN to 0. Integer types are a cast
    (such outputs are integer already).
    """
    io = _declared(entry, path)
    if io is None:
        return array
    a = np.asarray(array)
    if io == "UINT8":
        if a.dtype.kind == "f":
            a = np.rint(a)
            a = np.where(np.isnan(a), 0, a)
        else:
            a = a.astype(np.int64)   # clip bounds an int8 array cannot hold
        return np.clip(a, 0, 255).astype(np.uint8)
    with np.errstate(over="ignore"):
        return a.astype(TYPES[io])
