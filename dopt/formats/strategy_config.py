"""The reference's per-layer strategy JSON and its ``input_shape`` strings.

Only ``input_shape`` and ``layer_strategy`` are parsed (as the reference says);
the ``quant_strategy_for op ...`` keys are hints. Our addition is an optional
``dopt_options`` object (e.g. ``{"activation_range": "minmax"}``) and an optional
per-layer ``activation_range``; files without them mean the reference behaviour.
Keys starting with ``//`` are comments, as in the reference's own examples.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import DoptError
from .fileio import write_json_atomic

FLOAT = "float"
INT8 = "Quant_INT8-8"
STRATEGIES = (FLOAT, INT8)
DEFAULT_RANGE_ALGORITHM = "minmax"

_DIM_RE = re.compile(r"^-?\d+$")


def parse_input_shape(text: str, *, source: str = "input_shape", allow_dynamic: bool = False,
                      file: str | None = None) -> dict[str, tuple[int, ...]]:
    """``"name:n,c,h,w;name2:..."`` -> ``{"name": (n, c, h, w), ...}``.

    The name may itself contain ':' (TensorFlow tensor names); the dims follow the last one.
    """
    def bad(found, why):
        return DoptError(f"malformed {source} ({why})", file=file, field=source,
                         expected="'name:d1,d2,...' entries separated by ';', e.g. 'x:1,3,224,224'",
                         found=repr(found), hint="write every dimension as a positive integer")
    if not isinstance(text, str) or not text.strip():
        raise bad(text, "empty")
    shapes: dict[str, tuple[int, ...]] = {}
    for entry in text.strip().strip(";").split(";"):
        entry = entry.strip()
        if ":" not in entry:
            raise bad(entry, "no ':' between name and dims")
        name, dims = entry.rsplit(":", 1)
        name = name.strip()
        if not name:
            raise bad(entry, "empty input name")
        if name in shapes:
            raise bad(entry, f"input '{name}' given twice")
        parts = [d.strip() for d in dims.split(",")]
        if not parts or not all(_DIM_RE.match(p) for p in parts):
            raise bad(entry, "dims must be integers separated by ','")
        vals = tuple(int(p) for p in parts)
        for v in vals:
            if v == 0 or v < -1 or (v == -1 and not allow_dynamic):
                raise bad(entry, f"dimension {v} is not a positive integer")
            if v > 1 << 20:
                raise bad(entry, f"dimension {v} is implausibly large")
        shapes[name] = vals
    return shapes


def format_input_shape(shapes: dict[str, tuple[int, ...]]) -> str:
    return ";".join(f"{k}:{','.join(str(d) for d in v)}" for k, v in shapes.items())


@dataclass
class LayerStrategy:
    op_type: str
    quant_strategy: str = FLOAT
    activation_range: str | None = None

    @property
    def quantized(self) -> bool:
        return self.quant_strategy != FLOAT


@dataclass
class QuantConfig:
    path: str | None
    input_shape: str | None
    layers: dict[str, LayerStrategy]
    options: dict = field(default_factory=dict)

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return parse_input_shape(self.input_shape, file=self.path) if self.input_shape else {}

    def quantized_layers(self) -> list[str]:
        return [k for k, v in self.layers.items() if v.quantized]

    def range_algorithm(self, layer: str) -> str:
        ls = self.layers.get(layer)
        return (ls and ls.activation_range) or self.options.get("activation_range",
                                                                 DEFAULT_RANGE_ALGORITHM)


def hint_key(op_type: str) -> str:
    return f"quant_strategy_for op '{op_type}'"


def write_config(dst_path, layers: dict[str, str], strategies_by_op: dict[str, list[str]],
                 input_shape: str | None = None) -> dict:
    """Write the reference JSON: hints, ``input_shape`` (if any), ``layer_strategy``."""
    doc: dict = {}
    for op_type, strategies in strategies_by_op.items():
        doc[hint_key(op_type)] = [s for s in strategies if s != FLOAT]
    if input_shape is not None:
        doc["input_shape"] = input_shape
    doc["layer_strategy"] = {name: {"op_type": op, "quant_strategy": FLOAT}
                             for name, op in layers.items()}
    write_json_atomic(dst_path, doc)
    return doc


def _load_json(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DoptError("the configuration file does not exist", file=str(path),
                        hint="generate it with generate_config_file(...) first") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DoptError(f"the configuration file cannot be read ({e.__class__.__name__})",
                        file=str(path), hint="check the path and that it is UTF-8 JSON") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DoptError(f"the configuration file is not valid JSON: {e.msg} at line {e.lineno} "
                        f"column {e.colno}", file=str(path),
                        hint="fix the JSON syntax there (note: JSON allows no comments "
                             "or trailing commas)") from None


def load_config(path) -> QuantConfig:
    """Parse and check the file's own structure (not yet against a model)."""
    path = Path(path)
    doc = _load_json(path)
    f = str(path)
    if not isinstance(doc, dict):
        raise DoptError("the configuration must be a JSON object", file=f,
                        expected="{... \"layer_strategy\": {...}}", found=type(doc).__name__)
    ls = doc.get("layer_strategy")
    if not isinstance(ls, dict):
        raise DoptError("missing or malformed 'layer_strategy'", file=f, field="layer_strategy",
                        expected="an object mapping layer names to {op_type, quant_strategy}",
                        found=type(ls).__name__ if ls is not None else "nothing",
                        hint="regenerate the file with generate_config_file(...)")
    shape = doc.get("input_shape")
    if shape is not None:
        if not isinstance(shape, str):
            raise DoptError("'input_shape' must be a string", file=f, field="input_shape",
                            expected="'name:n,c,h,w'", found=repr(shape))
        parse_input_shape(shape, file=f)
    options = doc.get("dopt_options", {})
    if not isinstance(options, dict):
        raise DoptError("'dopt_options' must be an object", file=f, field="dopt_options")
    layers = {}
    for name, entry in ls.items():
        fld = f"layer_strategy.{name}"
        if not isinstance(entry, dict):
            raise DoptError("a layer entry must be an object", file=f, field=fld,
                            expected='{"op_type": ..., "quant_strategy": ...}', found=repr(entry))
        strat = entry.get("quant_strategy", FLOAT)
        if strat not in STRATEGIES:
            raise DoptError(f"unknown quant_strategy for layer '{name}'", file=f,
                            field=f"{fld}.quant_strategy", expected=" or ".join(STRATEGIES),
                            found=repr(strat), hint="use one of the strategies listed in the "
                            "file's \"quant_strategy_for op ...\" hints")
        op_type = entry.get("op_type")
        if not isinstance(op_type, str):
            raise DoptError(f"layer '{name}' has no op_type", file=f, field=f"{fld}.op_type",
                            hint="keep the op_type that generate_config_file wrote")
        ar = entry.get("activation_range")
        if ar is not None and not isinstance(ar, str):
            raise DoptError("activation_range must be a string", file=f,
                            field=f"{fld}.activation_range", found=repr(ar))
        layers[name] = LayerStrategy(op_type, strat, ar)
    return QuantConfig(f, shape, layers, options)


def check_against_model(cfg: QuantConfig, model_layers: dict[str, str],
                        allowed: dict[str, tuple[str, ...]],
                        resolve_algorithm: Callable[..., str] | None = None) -> None:
    """Every configured layer must exist with the same op type and an allowed strategy.

    ``resolve_algorithm`` is ``dopt.calib.loop.resolve_algorithm`` (the one check of a
    range-algorithm name; passed in because this layer sits below the plugin manager).
    """
    for name, ls in cfg.layers.items():
        fld = f"layer_strategy.{name}"
        if name not in model_layers:
            close = difflib.get_close_matches(name, list(model_layers), n=3)
            raise DoptError(f"the configuration names layer '{name}', which the model does not "
                            f"have (or which is not quantizable)", file=cfg.path, field=fld,
                            expected="one of the model's quantizable layers"
                                     + (f" (did you mean {', '.join(close)}?)" if close else ""),
                            hint="remove the entry or regenerate the file with "
                                 "generate_config_file(...) for this model")
        actual = model_layers[name]
        if ls.op_type != actual:
            raise DoptError(f"layer '{name}' has a different op_type in the model", file=cfg.path,
                            field=f"{fld}.op_type", expected=repr(actual), found=repr(ls.op_type),
                            hint="regenerate the file for this model")
        ok = allowed.get(actual, (FLOAT,))
        if ls.quant_strategy not in ok:
            raise DoptError(f"strategy '{ls.quant_strategy}' is not supported for layer '{name}' "
                            f"of op type {actual}", file=cfg.path, field=f"{fld}.quant_strategy",
                            expected=" or ".join(ok))
        if resolve_algorithm is not None:
            resolve_algorithm(cfg.range_algorithm(name), file=cfg.path,
                              field=f"{fld}.activation_range", layer=name, default=None)
