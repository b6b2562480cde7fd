"""``config.prototxt`` of no-training quantization (``--cal_conf``), read as protobuf text.

The file is parsed by ``google.protobuf.text_format`` against a real proto2 message
definition that this module builds in Python (``descriptor_pb2``; protoc is not
needed). The equivalent ``.proto`` text, for documentation, is ``dopt/calib/so_config.proto``
and :func:`schema_proto_text` renders it from the descriptor (a test keeps the two
equal).

``//`` comments: the reference's own examples comment with ``//``, which protobuf
text format does not accept (it uses ``#``). Before parsing, every ``//`` outside a
quoted string is rewritten to ``#/`` (same length), so a ``//`` comment runs to the
end of its line and the line/column numbers of parse errors stay those of the file.
``//`` inside a quoted string (``"a//b"``) is left alone.

This module only parses and validates; it logs and reports nothing. The
``mean_value`` count is checked against the input's channels later, by
:mod:`dopt.calib.sets`, which knows C.
"""
from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from ..errors import DoptError
from ..formats.fileio import existing_file

__all__ = ["SoConfig", "Preprocess", "load_so_config", "parse_so_config_text",
           "schema_proto_text", "SUPPORTED_STRATEGY", "MAX_CONFIG_BYTES", "PACKAGE",
           "ConfigMessage", "PreprocessParameterMessage"]

PACKAGE = "dopt.so"
SUPPORTED_STRATEGY = "Quant_INT8-8"
MAX_CONFIG_BYTES = 1 << 20

_F = descriptor_pb2.FieldDescriptorProto
_OPT, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_TYPES = {"string": _F.TYPE_STRING, "float": _F.TYPE_FLOAT, "int32": _F.TYPE_INT32,
          "bool": _F.TYPE_BOOL}

# (message, enums {name: [values]}, fields [(label, type, name, number, default)]);
# a type that is not a scalar is an enum or message of this file.
_SCHEMA = (
    ("PreprocessParameter",
     {"InputType": ["BINARY", "IMAGE"], "ImageFormat": ["BGR", "RGB"]},
     [(_OPT, "InputType", "input_type", 1, "IMAGE"),
      (_OPT, "ImageFormat", "image_format", 2, "BGR"),
      (_REP, "float", "mean_value", 3, None),
      (_OPT, "float", "standard_deviation", 4, "0.0"),
      (_OPT, "string", "input_file_path", 5, None)]),
    ("Config",
     {"Device": ["USE_CPU", "USE_GPU"]},
     [(_OPT, "string", "strategy", 1, SUPPORTED_STRATEGY),
      (_OPT, "Device", "device", 2, "USE_CPU"),
      (_REP, "string", "exclude_op", 3, None),
      (_REP, "PreprocessParameter", "preprocess_parameter", 4, None),
      (_OPT, "string", "calibration_algorithm", 101, None),
      (_OPT, "int32", "calibration_samples", 102, None),
      (_OPT, "int32", "batch_size", 103, None),
      (_OPT, "int32", "seed", 104, None),
      (_OPT, "bool", "bias_correction", 105, None),
      (_OPT, "bool", "equalization", 106, None)]),
)


def _build_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto(name="dopt/calib/so_config.proto", package=PACKAGE,
                                             syntax="proto2")
    messages = {m for m, _, _ in _SCHEMA}
    for msg_name, enums, fields in _SCHEMA:
        m = fdp.message_type.add(name=msg_name)
        for enum_name, values in enums.items():
            e = m.enum_type.add(name=enum_name)
            for i, v in enumerate(values):
                e.value.add(name=v, number=i)
        for label, typ, name, number, default in fields:
            f = m.field.add(name=name, number=number, label=label, json_name=name)
            if typ in _TYPES:
                f.type = _TYPES[typ]
            elif typ in enums:
                f.type, f.type_name = _F.TYPE_ENUM, f".{PACKAGE}.{msg_name}.{typ}"
            elif typ in messages:
                f.type, f.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{typ}"
            else:  # pragma: no cover - schema typo
                raise AssertionError(typ)
            if default is not None:
                f.default_value = default
    return fdp


FILE_DESCRIPTOR = _build_file_descriptor()
_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(FILE_DESCRIPTOR)
ConfigMessage = message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.Config"))
PreprocessParameterMessage = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName(f"{PACKAGE}.PreprocessParameter"))


def schema_proto_text() -> str:
    """The ``.proto`` text of the schema, rendered from the descriptor itself."""
    labels = {_OPT: "optional", _REP: "repeated", _F.LABEL_REQUIRED: "required"}
    scalar = {v: k for k, v in _TYPES.items()}
    lines = ['syntax = "proto2";', "", f"package {PACKAGE};"]
    for m in FILE_DESCRIPTOR.message_type:
        lines += ["", f"message {m.name} {{"]
        for e in m.enum_type:
            lines.append(f"  enum {e.name} {{")
            lines += [f"    {v.name} = {v.number};" for v in e.value]
            lines.append("  }")
        for f in m.field:
            typ = scalar.get(f.type) or f.type_name.rsplit(".", 1)[-1]
            opt = ""
            if f.HasField("default_value"):
                d = f.default_value
                opt = f' [default = "{d}"]' if f.type == _F.TYPE_STRING else f" [default = {d}]"
            lines.append(f"  {labels[f.label]} {typ} {f.name} = {f.number}{opt};")
        lines.append("}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ plain values

@dataclass(frozen=True)
class Preprocess:
    """One ``preprocess_parameter`` block: the calibration data of one model input."""
    input_file_path: str                      # as written in the file
    input_type: str = "IMAGE"                 # 'BINARY' | 'IMAGE'
    image_format: str = "BGR"                 # 'BGR' | 'RGB' (IMAGE only)
    mean_value: tuple[float, ...] = ()        # IMAGE only; () = zeros
    standard_deviation: float = 0.0           # IMAGE only; 0.0 = no division
    path: Path | None = None                  # absolute; None -> resolved against the cwd now
    index: int = 0                            # 0-based position in the config file

    def __post_init__(self):
        if self.path is None:
            object.__setattr__(self, "path", Path(os.path.abspath(self.input_file_path)))


@dataclass(frozen=True)
class SoConfig:
    """A validated ``config.prototxt`` as plain Python values."""
    path: str
    strategy: str = SUPPORTED_STRATEGY
    device: str = "USE_CPU"                   # 'USE_CPU' | 'USE_GPU'
    exclude_op: list[str] = field(default_factory=list)
    preprocess: list[Preprocess] = field(default_factory=list)
    # dopt additions; None = absent, the caller decides
    calibration_algorithm: str = "auto"       # absent or "" -> "auto"; validated by the caller
    calibration_samples: int | None = None    # absent or 0 -> None = all samples
    batch_size: int | None = None             # absent -> the N of --input_shape
    seed: int | None = None
    bias_correction: bool | None = None
    equalization: bool | None = None


# ------------------------------------------------------------------ parsing

_SYNTAX_HINT = ("write protobuf text format: one 'name: value' per line, strings in double "
                "quotes, enum values bare (device: USE_GPU), blocks as "
                "'preprocess_parameter { ... }', comments after '#' or '//'")


def _slash_comments_to_hash(text: str) -> str:
    """Rewrite ``//`` outside quoted strings to ``#/`` (same length: positions stay)."""
    if "//" not in text:
        return text
    out = []
    for line in text.splitlines(keepends=True):
        quote = None
        i, n = 0, len(line)
        chars = list(line)
        while i < n:
            c = line[i]
            if quote:
                if c == "\\":
                    i += 2
                    continue
                if c == quote:
                    quote = None
            elif c in "\"'":
                quote = c
            elif c == "#":
                break
            elif c == "/" and i + 1 < n and line[i + 1] == "/":
                chars[i] = "#"
                break
            i += 1
        out.append("".join(chars))
    return "".join(out)


def _field_names(msg_type: str) -> list[str]:
    for m in FILE_DESCRIPTOR.message_type:
        if m.name == msg_type:
            return [f.name for f in m.field]
    return []


def _enum_values(enum_full: str) -> list[str]:
    try:
        return [v.name for v in _POOL.FindEnumTypeByName(enum_full).values]
    except KeyError:
        return []


def _parse_error(err: text_format.ParseError, text: str, file: str) -> DoptError:
    line, col = err.GetLine(), err.GetColumn()
    msg = str(err)
    msg = re.sub(r"^\d+:\d+ : ", "", msg)
    where = f"line {line}, column {col}" if line else "an unknown position"
    src_line = ""
    if line and 0 < line <= len(text.splitlines()):
        src_line = text.splitlines()[line - 1]
    m = re.match(r"\s*([A-Za-z_]\w*)", src_line)
    fld = m.group(1) if m else None
    found = repr(src_line.strip()[:120]) if src_line.strip() else None

    unknown = re.search(r'Message type "([\w.]+)" has no field named "([^"]*)"', msg)
    if unknown:
        mtype, name = unknown.group(1).rsplit(".", 1)[-1], unknown.group(2)
        names = _field_names(mtype)
        close = difflib.get_close_matches(name, names, n=1)
        scope = "at the top level" if mtype == "Config" else "inside preprocess_parameter { }"
        hint = (f"did you mean '{close[0]}'? " if close else "") + \
            "correct the name (lower case with underscores) or delete the line"
        return DoptError(f"unknown field '{name}' {scope} at {where}", file=file, field=name,
                         expected=f"one of {', '.join(names)}", found=found, hint=hint)
    bad_enum = re.search(r'Enum type "([\w.]+)" has no value (?:named|with number) (\S+?)\.?$', msg)
    if bad_enum:
        values = _enum_values(bad_enum.group(1))
        close = difflib.get_close_matches(bad_enum.group(2), values, n=1)
        return DoptError(f"unknown value '{bad_enum.group(2)}' at {where}", file=file, field=fld,
                         expected=f"one of {', '.join(values)} (bare, without quotes)",
                         found=found,
                         hint=(f"did you mean {close[0]}? " if close else "")
                         + f"write one of {', '.join(values)}")
    if "should not have multiple" in msg:
        return DoptError(f"a field that takes one value is given twice, at {where}", file=file,
                         field=fld, expected="at most one such line", found=found,
                         hint="delete the repeated line (only exclude_op, preprocess_parameter "
                              "and mean_value may repeat)")
    return DoptError(f"config is not valid protobuf text format at {where} ({msg})", file=file,
                     field=fld, found=found, hint=_SYNTAX_HINT)


def _f32(v: float) -> float:
    """A float32 field's value as the shortest decimal that round-trips (0.017, not 0.0170000009)."""
    return float(str(np.float32(v))) if math.isfinite(v) else v


def _split_ops(entries) -> list[str]:
    out: list[str] = []
    seen = set()
    for entry in entries:
        for op in entry.split(";"):
            op = op.strip()
            if op and op not in seen:
                seen.add(op)
                out.append(op)
    return out


def parse_so_config_text(text: str, *, file: str = "config.prototxt",
                         check_paths: bool = True) -> SoConfig:
    """Parse and validate config text. ``file`` names it in errors and becomes ``SoConfig.path``.

    With ``check_paths`` (the default) every ``input_file_path`` must exist: a BINARY one
    must be a file, an IMAGE one a folder. Relative paths are resolved against the
    current working directory, as the reference does, not against the config's folder.
    """
    msg = ConfigMessage()
    try:
        text_format.Parse(_slash_comments_to_hash(text), msg)
    except text_format.ParseError as e:
        raise _parse_error(e, text, file) from None
    except (ValueError, TypeError, UnicodeError, RecursionError) as e:  # defensive
        raise DoptError(f"config is not valid protobuf text format ({e})", file=file,
                        hint=_SYNTAX_HINT) from None

    if msg.strategy != SUPPORTED_STRATEGY:
        raise DoptError("unsupported strategy", file=file, field="strategy",
                        expected=f'"{SUPPORTED_STRATEGY}" (this version supports only that one)',
                        found=repr(msg.strategy),
                        hint=f'write strategy: "{SUPPORTED_STRATEGY}" or delete the line '
                             f"(it is the default)")
    dev_enum = ConfigMessage.DESCRIPTOR.fields_by_name["device"].enum_type
    device = dev_enum.values_by_number[msg.device].name

    if len(msg.preprocess_parameter) == 0:
        raise DoptError("no preprocess_parameter block: the calibration data is not given",
                        file=file, field="preprocess_parameter",
                        expected="one preprocess_parameter { ... } block per model input, "
                                 "in the order of --input_shape",
                        found="none",
                        hint='add preprocess_parameter { input_type: BINARY input_file_path: '
                             '"/path/to/calib.bin" } (or input_type: IMAGE with a folder of images)')

    pp_desc = PreprocessParameterMessage.DESCRIPTOR
    type_enum = pp_desc.fields_by_name["input_type"].enum_type
    fmt_enum = pp_desc.fields_by_name["image_format"].enum_type
    preprocess: list[Preprocess] = []
    for i, p in enumerate(msg.preprocess_parameter):
        where = f"preprocess_parameter[{i}]"
        nth = f"preprocess_parameter block #{i + 1}"
        if not p.HasField("input_file_path") or not p.input_file_path.strip():
            raise DoptError(f"{nth} has no input_file_path", file=file,
                            field=f"{where}.input_file_path",
                            expected="the path of a .bin file (BINARY) or of a folder of "
                                     "images (IMAGE)", found="none",
                            hint=f'add input_file_path: "/path/to/data" inside {nth}')
        input_type = type_enum.values_by_number[p.input_type].name
        image_format = fmt_enum.values_by_number[p.image_format].name
        std = float(p.standard_deviation)
        if not math.isfinite(std) or std < 0:
            raise DoptError(f"standard_deviation of {nth} is invalid", file=file,
                            field=f"{where}.standard_deviation",
                            expected="a finite number >= 0.0 (0.0 means: do not divide)",
                            found=repr(std), hint="write e.g. standard_deviation: 58.0")
        means = []
        for j, v in enumerate(p.mean_value):
            v = float(v)
            if not math.isfinite(v) or not 0.0 <= v <= 255.0:
                raise DoptError(f"mean_value #{j + 1} of {nth} is out of range", file=file,
                                field=f"{where}.mean_value",
                                expected="a number from 0.0 to 255.0 per channel",
                                found=repr(v),
                                hint="give the per-channel mean of the 8-bit image values, "
                                     "e.g. mean_value: 104.0")
            means.append(_f32(v))
        raw_path = p.input_file_path.strip()
        abspath = Path(os.path.abspath(raw_path))
        if check_paths:
            rel_note = ("" if os.path.isabs(raw_path) else
                        f" (a relative path is resolved against the current working directory "
                        f"{os.getcwd()!r}, as the reference does, not against the config's folder)")
            if not abspath.exists():
                raise DoptError(f"the input_file_path of {nth} does not exist{rel_note}",
                                file=file, field=f"{where}.input_file_path",
                                expected="an existing " + ("file" if input_type == "BINARY"
                                                           else "folder of images"),
                                found=repr(raw_path),
                                hint="fix the path or run from the folder it is relative to "
                                     "(an absolute path is safest)")
            if input_type == "BINARY" and not abspath.is_file():
                raise DoptError(f"input_type is BINARY but the input_file_path of {nth} is not "
                                f"a file{rel_note}", file=file, field=f"{where}.input_file_path",
                                expected="a .bin file (magic 610 or 510)", found=repr(raw_path),
                                hint="point to the .bin file, or write input_type: IMAGE for a "
                                     "folder of images")
            if input_type == "IMAGE" and not abspath.is_dir():
                raise DoptError(f"input_type is IMAGE (the default) but the input_file_path of "
                                f"{nth} is not a folder{rel_note}", file=file,
                                field=f"{where}.input_file_path",
                                expected="a folder holding the calibration images",
                                found=repr(raw_path),
                                hint="point to the folder of images, or write input_type: BINARY "
                                     "for a .bin file")
        preprocess.append(Preprocess(input_file_path=raw_path, input_type=input_type,
                                     image_format=image_format, mean_value=tuple(means),
                                     standard_deviation=_f32(std), path=abspath, index=i))

    def opt(name):
        return getattr(msg, name) if msg.HasField(name) else None

    samples = opt("calibration_samples")
    if samples is not None and samples < 0:
        raise DoptError("calibration_samples is negative", file=file, field="calibration_samples",
                        expected="a positive number of samples, or 0 / absent for all",
                        found=str(samples), hint="write e.g. calibration_samples: 256")
    batch = opt("batch_size")
    if batch is not None and batch < 1:
        raise DoptError("batch_size must be at least 1", file=file, field="batch_size",
                        expected="a positive integer (absent = the N of --input_shape)",
                        found=str(batch), hint="write e.g. batch_size: 8 or delete the line")
    algo = (opt("calibration_algorithm") or "").strip() or "auto"
    return SoConfig(path=file, strategy=msg.strategy, device=device,
                    exclude_op=_split_ops(msg.exclude_op), preprocess=preprocess,
                    calibration_algorithm=algo, calibration_samples=samples or None,
                    batch_size=batch, seed=opt("seed"), bias_correction=opt("bias_correction"),
                    equalization=opt("equalization"))


def load_so_config(path, *, check_paths: bool = True) -> SoConfig:
    """Read and validate ``config.prototxt`` (at most :data:`MAX_CONFIG_BYTES`)."""
    p = existing_file(path, field="--cal_conf", max_bytes=MAX_CONFIG_BYTES,
                      what="quantization config (config.prototxt)")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DoptError(f"the config is not UTF-8 text (byte offset {e.start}, line {line})",
                        file=str(path), expected="a UTF-8 (or ASCII) text file",
                        found=f"byte 0x{data[e.start]:02x}",
                        hint="save the file as UTF-8 text") from None
    return parse_so_config_text(text, file=str(path), check_paths=check_paths)
