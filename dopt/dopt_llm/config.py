"""The LLM pipeline's two user files, validated before any model is loaded.

``config.yaml`` (the reference's keys, nothing else: a misspelt key is an error, not a
silently ignored setting) and the per-layer ``dopt_config.json``. Both are checked here,
framework-free; the adapter only matches layer names against the model.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DoptError
from ..formats.fileio import DuplicateKeyError, existing_file, reject_duplicate_keys
from ..quant.lowbit import ACT_BITS, WEIGHT_BITS

MAX_CONFIG_BYTES = 64 << 20

STRATEGIES = {
    "Quant_act_weight_eco": "linear",   # decoder Linear: W4 group + learned clipping, INT16 input
    "Quant_lm_head": "lm_head",         # the output projection
    "Quant_Embed_MinMax": "embedding",  # the token embedding, min/max per row group
}
KINDS = {kind: strategy for strategy, kind in STRATEGIES.items()}

# key -> (default, kind); kinds: bool, int>=0, int>=1, float>=0, float>0, str:<choices>, list
_KD = {
    "enable": (True, "bool"), "loss": ("mse", "str:mse"), "micro_batch_size": (2, "int>=1"),
    "gradient_accumulation_steps": (4, "int>=1"), "weight_decay": (0.0, "float>=0"),
    "warmup_steps": (10, "int>=0"), "num_epochs": (3, "int>=0"),
    "learning_rate": (1e-4, "float>0"), "eval_step": (1, "int>=1"),
    "logging_step": (50, "int>=1"), "lr_scheduler_type": ("cosine", "str:cosine,linear,constant"),
    "trainable_keys": (["quant_alpha", "norm"], "keys"),
    "no_split_module_classes": ([], "list"),
}
_DATASET = {"train_files": (None, "files"), "train_samples": (None, "int>=1|null"),
            "ptq_samples": (None, "int>=1|null")}
_EXTRA = {"fp16": (True, "bool")}
_TOP = {"cutoff_len": (128, "int>=8"), "num_samples": (256, "int>=1"),
        "lut_mode": (False, "bool"), "embedding_in_omc": (False, "bool")}
TRAINABLE_KEYS = ("quant_alpha", "norm")


@dataclass
class OptimizeConfig:
    """``config.yaml`` after validation; ``path`` resolves relative dataset files."""
    path: str
    kd: dict
    dataset: dict
    extra_training_config: dict
    cutoff_len: int
    num_samples: int
    lut_mode: bool
    embedding_in_omc: bool
    train_files: list = field(default_factory=list)


def _bad(path, key, expected, found, hint=None):
    return DoptError("invalid setting in config.yaml", file=str(path), field=key,
                     expected=expected, found=repr(found), hint=hint or f"set {key} to {expected}")


def _coerce(path, key, value, kind):
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise _bad(path, key, "True or False", value)
    if kind.startswith("int"):
        if value is None and kind.endswith("|null"):
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(path, key, "an integer", value)
        low = int(kind[5:].split("|")[0])
        if value < low:
            raise _bad(path, key, f"an integer >= {low}", value)
        return value
    if kind.startswith("float"):
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise _bad(path, key, "a number", value) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(path, key, "a number", value)
        value = float(value)
        if value != value or (kind == "float>0" and value <= 0) or value < 0:
            raise _bad(path, key, "a number " + kind[5:], value)
        return value
    if kind.startswith("str:"):
        choices = kind[4:].split(",")
        if value not in choices:
            raise _bad(path, key, "one of " + ", ".join(choices), value)
        return value
    if kind in ("list", "keys"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _bad(path, key, "a list of strings", value)
        if kind == "keys":
            unknown = [v for v in value if v not in TRAINABLE_KEYS]
            if unknown:
                raise _bad(path, key, "entries from " + ", ".join(TRAINABLE_KEYS), unknown)
        return list(value)
    if kind == "files":
        files = [value] if isinstance(value, str) else value
        if not isinstance(files, list) or not files or not all(isinstance(v, str) for v in files):
            raise _bad(path, key, "a JSON file name or a list of them", value)
        return list(files)
    raise AssertionError(kind)


def _section(path, data, name, spec):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _bad(path, name, "a mapping", data)
    unknown = sorted(set(data) - set(spec))
    if unknown:
        prefix = f"{name}." if name else ""
        raise DoptError("unknown key in config.yaml", file=str(path), field=prefix + unknown[0],
                        expected="one of " + ", ".join(prefix + k for k in spec),
                        hint="check the spelling; the keys are those of the reference config.yaml")
    out = {}
    for key, (default, kind) in spec.items():
        full = f"{name}.{key}" if name else key
        out[key] = (copy.deepcopy(default) if key not in data
                    else _coerce(path, full, data[key], kind))
    return out


def load_optimize_config(path) -> OptimizeConfig:
    """Read and validate ``config.yaml``; the dataset file must exist."""
    import yaml

    p = existing_file(path, field="--optimize-config", max_bytes=MAX_CONFIG_BYTES,
                      what="config.yaml")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise DoptError(f"config.yaml is not valid YAML{where}", file=str(p),
                        found=str(getattr(e, "problem", e)),
                        hint="compare with the config.yaml example in docs/llm.md") from None
    if not isinstance(data, dict):
        raise DoptError("config.yaml must be a mapping of settings", file=str(p),
                        found=type(data).__name__)
    sections = {"kd": _KD, "dataset": _DATASET, "extra_training_config": _EXTRA}
    top = {k: v for k, v in data.items() if k not in sections}
    values = _section(p, top, "", _TOP)
    kd = _section(p, data.get("kd"), "kd", _KD)
    dataset = _section(p, data.get("dataset"), "dataset", _DATASET)
    extra = _section(p, data.get("extra_training_config"), "extra_training_config", _EXTRA)
    if dataset["train_files"] is None:
        raise _bad(p, "dataset.train_files", "a JSON dataset file with a 'text' field", None)
    files = []
    for name in dataset["train_files"]:
        f = Path(name)
        if not f.is_absolute() and not f.exists():
            f = p.parent / name  # relative to config.yaml when not relative to the cwd
        if not f.is_file():
            raise DoptError("the dataset file does not exist", file=name,
                            field="dataset.train_files",
                            hint="give a path relative to the working directory or to "
                                 "config.yaml")
        files.append(str(f))
    return OptimizeConfig(path=str(p), kd=kd, dataset=dataset, extra_training_config=extra,
                          train_files=files, **values)


def check_bits(value, *, field: str, allowed=WEIGHT_BITS, file: str | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise DoptError("unsupported bit width", file=file, field=field,
                        expected="one of " + ", ".join(map(str, allowed)), found=repr(value),
                        hint=f"set {field} to one of " + ", ".join(map(str, allowed)))
    return value


def check_group_size(value, *, field: str, file: str | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value == 0 or value < -1:
        raise DoptError("invalid group size", file=file, field=field,
                        expected="a positive number of input columns, or -1 for one group per "
                                 "row", found=repr(value))
    return value


# --- dopt_config.json -------------------------------------------------------------------


@dataclass
class LayerSpec:
    strategy: str
    w_bits: int
    group_size: int
    in_bits: int
    type: str = ""

    def as_json(self) -> dict:
        return {"type": self.type, "quant_strategy": self.strategy,
                "weight": {"bit": self.w_bits, "group_size": self.group_size},
                "input": {"bit": self.in_bits}}


def read_json(path, *, field: str, what: str):
    p = existing_file(path, field=field, max_bytes=MAX_CONFIG_BYTES, what=what)
    try:
        return json.loads(p.read_text(encoding="utf-8"), object_pairs_hook=reject_duplicate_keys)
    except DuplicateKeyError as e:
        raise DoptError(f"{what} repeats a key", file=str(p), field=e.key,
                        hint="keep one entry per key") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno}, column {e.colno}" if hasattr(e, "lineno") else ""
        raise DoptError(f"{what} is not valid JSON{where}", file=str(p), found=str(e),
                        hint="JSON has no comments and needs commas between entries") from None


def _entry_spec(path, name, entry, defaults: LayerSpec | None, kind_of: str | None):
    where = f"layer_strategy.{name}"
    if not isinstance(entry, dict):
        raise DoptError("a layer entry must be an object", file=path, field=where,
                        found=type(entry).__name__)
    unknown = sorted(set(entry) - {"type", "quant_strategy", "weight", "input", "pattern"})
    if unknown:
        raise DoptError("unknown key in a layer entry", file=path, field=f"{where}.{unknown[0]}",
                        expected="type, quant_strategy, weight {bit, group_size}, input {bit}")
    strategy = entry.get("quant_strategy", defaults.strategy if defaults else None)
    if strategy not in STRATEGIES:
        raise DoptError("unknown quant_strategy", file=path, field=f"{where}.quant_strategy",
                        expected="one of " + ", ".join(STRATEGIES), found=repr(strategy),
                        hint="decoder Linear layers use Quant_act_weight_eco, lm_head "
                             "Quant_lm_head, the embedding Quant_Embed_MinMax; delete the entry "
                             "to keep a layer in float")
    if kind_of is not None and STRATEGIES[strategy] != kind_of:
        raise DoptError(f"quant_strategy {strategy} does not fit this layer", file=path,
                        field=f"{where}.quant_strategy", expected=KINDS[kind_of],
                        found=strategy)
    weight = entry.get("weight", {})
    inp = entry.get("input", {})
    for sub, val, keys in (("weight", weight, {"bit", "group_size"}), ("input", inp, {"bit"})):
        if not isinstance(val, dict) or set(val) - keys:
            raise DoptError(f"invalid '{sub}' in a layer entry", file=path, field=f"{where}.{sub}",
                            expected="{" + ", ".join(sorted(keys)) + "}", found=repr(val))
    w_bits = check_bits(weight.get("bit", defaults.w_bits if defaults else None),
                        field=f"{where}.weight.bit", file=path)
    group = check_group_size(weight.get("group_size", defaults.group_size if defaults else None),
                             field=f"{where}.weight.group_size", file=path)
    in_bits = check_bits(inp.get("bit", defaults.in_bits if defaults else None),
                         field=f"{where}.input.bit", allowed=ACT_BITS, file=path)
    return LayerSpec(strategy, w_bits, group, in_bits, entry.get("type", defaults.type
                                                                   if defaults else ""))


def resolve_layers(path, data, layers: dict[str, tuple[str, str]],
                   cli_defaults: dict | None = None) -> dict[str, LayerSpec]:
    """Match ``dopt_config.json`` against the model's quantizable layers.

    ``layers`` maps each quantizable module name to ``(kind, type string)``; kinds are
    ``linear``, ``lm_head`` and ``embedding``. ``overrides`` (a dopt addition) is a list of
    ``{"pattern": regex, ...}`` applied in order on top of ``layer_strategy``; a pattern that
    matches no configured layer is an error, as is a ``layer_strategy`` name the model lacks.
    ``cli_defaults`` (``w_bits``/``group_size``/``act_bits``) fill fields an entry leaves out.
    """
    path = str(path)
    if not isinstance(data, dict) or not isinstance(data.get("layer_strategy"), dict):
        raise DoptError("dopt_config.json needs a 'layer_strategy' object", file=path,
                        field="layer_strategy",
                        hint="regenerate it with generate_quant_config (delete the file and "
                             "run stage1 once)")
    unknown = sorted(set(data) - {"layer_strategy", "overrides", "version", "model"})
    if unknown:
        raise DoptError("unknown top-level key in dopt_config.json", file=path,
                        field=unknown[0], expected="layer_strategy, overrides")
    cli = cli_defaults or {}
    out: dict[str, LayerSpec] = {}
    for name, entry in data["layer_strategy"].items():
        if name not in layers:
            close = [n for n in layers if n.endswith(name.split(".")[-1])][:3]
            raise DoptError("dopt_config.json names a layer the model does not have", file=path,
                            field=f"layer_strategy.{name}",
                            expected="a Linear or Embedding module name of the model",
                            found=f"no such module (e.g. {', '.join(close)})" if close else None,
                            hint="regenerate the file for this model, or fix the name")
        kind, type_str = layers[name]
        defaults = LayerSpec(KINDS[kind], cli.get("w_bits", 4) if kind == "linear" else 8,
                             cli.get("group_size", 128) if kind == "linear" else -1,
                             cli.get("act_bits", 16), type_str)
        out[name] = _entry_spec(path, name, entry, defaults, kind)
    overrides = data.get("overrides", [])
    if not isinstance(overrides, list):
        raise DoptError("'overrides' must be a list", file=path, field="overrides")
    for i, ov in enumerate(overrides):
        pattern = ov.get("pattern") if isinstance(ov, dict) else None
        if not isinstance(pattern, str):
            raise DoptError("an override needs a 'pattern' (a regular expression)", file=path,
                            field=f"overrides[{i}]")
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise DoptError("invalid regular expression", file=path,
                            field=f"overrides[{i}].pattern", found=f"{pattern!r}: {e}") from None
        hits = [n for n in out if rx.fullmatch(n)]
        if not hits:
            raise DoptError("an override matches no configured layer", file=path,
                            field=f"overrides[{i}].pattern", found=repr(pattern),
                            hint="patterns must match whole layer names of layer_strategy")
        for n in hits:
            merged = dict(ov)
            merged.pop("pattern")
            out[n] = _entry_spec(path, f"{n} (override {i})", merged, out[n], layers[n][0])
    return out


def default_dopt_config(layers: dict[str, tuple[str, str]], *, w_bits=4, group_size=128,
                        act_bits=16) -> dict:
    """What ``generate_quant_config`` writes: every quantizable layer with its strategy."""
    strategy = {}
    for name, (kind, type_str) in layers.items():
        spec = LayerSpec(KINDS[kind], w_bits if kind == "linear" else 8,
                         group_size if kind == "linear" else -1, act_bits, type_str)
        strategy[name] = spec.as_json()
    return {"layer_strategy": strategy}


def check_tied(path, specs: dict[str, LayerSpec], tied: list[tuple[str, str]]) -> None:
    """Tied embedding / lm_head share one weight, so they must share one quantization."""
    for a, b in tied:
        sa, sb = specs.get(a), specs.get(b)
        if (sa is None) != (sb is None) or (sa and (sa.w_bits, sa.group_size)
                                            != (sb.w_bits, sb.group_size)):
            def fmt(s):
                return "float" if s is None else f"{s.w_bits}-bit, group {s.group_size}"
            raise DoptError("tied layers are configured differently", file=str(path),
                            field=f"layer_strategy.{b}",
                            expected=f"the same weight bit/group_size as {a} (they share one "
                                     f"weight matrix)", found=f"{a}: {fmt(sa)}; {b}: {fmt(sb)}",
                            hint="give both entries the same weight settings, or delete both")
