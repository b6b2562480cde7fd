"""Load and validate an NPU hardware profile (``dopt/npu/profiles/<name>.json``).

The profile is the one source of truth for what the target NPU supports and how fast, so a
broken profile must fail loudly here, with file and field, rather than as a wrong
placement decision deep inside the compiler. Pure standard library: importable anywhere.
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DoptError
from ..formats.fileio import DuplicateKeyError, reject_duplicate_keys

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
DEFAULT_PROFILE = "kirin9000"
MAX_BYTES = 4 * 1024 * 1024  # a profile is a table, not a model: refuse anything huge

TOP_LEVEL_KEYS = ("name", "version", "numerics", "alignment", "operators", "fusions",
                  "networks", "cost_model")
OPERATOR_KEYS = ("category", "stars", "int8", "int8_form", "shape_only", "fusable_into_conv",
                 "guide_zh", "guide_en")
ALIGNMENT_KEYS = ("fp16_channel_block", "int8_channel_block", "int8_min_cin",
                  "concat_split_inplace_block")
# cost_model: rates (> 0), overheads and sizes (>= 0), efficiencies (0, 1], switches
COST_MODEL_RATES = ("fp16_tops", "int8_tops", "ddr_gbps", "cpu_gflops", "cpu_npu_transfer_gbps",
                    "low_recommendation_slowdown", "depthwise_block_utilization", "vector_gops")
COST_MODEL_AMOUNTS = ("onchip_buffer_kb", "kernel_launch_us", "cpu_op_us",
                      "cpu_npu_transfer_latency_us", "epilogue_max_ops")
COST_MODEL_FRACTIONS: tuple[str, ...] = ()
COST_MODEL_FLAGS = ("calibrated", "fuse_activation_into_conv")


@dataclass(frozen=True)
class HardwareProfile:
    """A validated profile. Shared through a cache, so treat every dict as read-only."""

    name: str
    version: str
    operators: dict
    alignment: dict
    fusions: list
    networks: list
    cost_model: dict
    raw: dict
    path: str

    def op(self, name: str) -> dict | None:
        return self.operators.get(name)

    def int8_form(self, name: str) -> str | None:
        entry = self.operators.get(name)
        return entry["int8_form"] if entry else None

    def is_shape_only(self, name: str) -> bool:
        entry = self.operators.get(name)
        return bool(entry and entry["shape_only"])

    def stars(self, name: str) -> int | None:
        entry = self.operators.get(name)
        return entry["stars"] if entry else None

    def channel_block(self, int8: bool) -> int:
        return self.alignment["int8_channel_block" if int8 else "fp16_channel_block"]

    def stamp(self) -> dict:
        """What a compiled artefact records, so a result can be traced to the exact table."""
        return {"name": self.name, "version": self.version}


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def load_profile(name_or_path: str | os.PathLike = DEFAULT_PROFILE) -> HardwareProfile:
    """A bare name picks a built-in profile (cached); anything path-like is read fresh."""
    s = os.fspath(name_or_path)
    if re.fullmatch(r"[A-Za-z0-9_.-]+", s) and not s.endswith(".json"):
        path = PROFILES_DIR / f"{s}.json"
        if not path.is_file():
            raise DoptError(f"unknown hardware profile '{s}'", field="profile",
                            expected="one of " + ", ".join(available_profiles()), found=s,
                            hint="pass a built-in profile name or the path of a profile JSON file")
        return _load_builtin(str(path))
    return _load(str(Path(s)))


@functools.lru_cache(maxsize=None)
def _load_builtin(path: str) -> HardwareProfile:
    return _load(path)


def _load(path: str) -> HardwareProfile:
    try:
        size = os.stat(path).st_size
        if size > MAX_BYTES:
            raise DoptError("the hardware profile is too large", file=path,
                            expected=f"at most {MAX_BYTES} bytes", found=f"{size} bytes",
                            hint="point at a hardware-profile JSON file, not a model or data file")
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise DoptError("cannot read the hardware profile", file=path, found=e.strerror or str(e),
                        hint="check the path and its permissions") from None
    except UnicodeDecodeError as e:
        raise DoptError("the hardware profile is not UTF-8 text", file=path,
                        found=f"byte offset {e.start}", hint="save the file as UTF-8") from None
    try:
        raw = json.loads(text, object_pairs_hook=reject_duplicate_keys)
    except json.JSONDecodeError as e:
        raise DoptError("the hardware profile is not valid JSON", file=path,
                        found=f"line {e.lineno}, column {e.colno}: {e.msg}",
                        hint="fix the JSON syntax at that position") from None
    except DuplicateKeyError as e:
        raise DoptError("the hardware profile repeats a key", file=path, field=e.key,
                        hint="each key, operator names included, may appear only once") from None
    _validate(raw, path)
    return HardwareProfile(name=raw["name"], version=raw["version"], operators=raw["operators"],
                           alignment=raw["alignment"], fusions=raw["fusions"],
                           networks=raw["networks"], cost_model=raw["cost_model"], raw=raw,
                           path=path)


def _validate(raw: Any, path: str) -> None:
    def bad(field: str, what: str, expected: str, found: Any) -> DoptError:
        return DoptError(what, file=path, field=field, expected=expected, found=repr(found),
                         hint="correct this entry in the hardware-profile JSON")

    if not isinstance(raw, dict):
        raise bad("<top level>", "the hardware profile must be a JSON object", "an object",
                  type(raw).__name__)
    for key in TOP_LEVEL_KEYS:
        if key not in raw:
            raise bad(key, "a required top-level key is missing", f"key '{key}'", "nothing")
    for key in ("name", "version"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise bad(key, "must be a non-empty string", "a string", raw[key])
    for key, kind in (("numerics", dict), ("alignment", dict), ("operators", dict),
                      ("fusions", list), ("networks", list), ("cost_model", dict)):
        if not isinstance(raw[key], kind):
            raise bad(key, "has the wrong type", f"a JSON {'object' if kind is dict else 'array'}",
                      type(raw[key]).__name__)

    align = raw["alignment"]
    for key in ALIGNMENT_KEYS:
        if key not in align:
            raise bad(f"alignment.{key}", "a required alignment value is missing",
                      "a positive integer", "nothing")
    for key, value in align.items():
        if key == "notes":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise bad(f"alignment.{key}", "alignment values must be positive integers",
                      "a positive integer", value)

    _validate_cost_model(raw["cost_model"], bad)
    for i, f in enumerate(raw["fusions"]):
        if not isinstance(f, dict):
            raise bad(f"fusions[{i}]", "a fusion entry must be an object", "an object",
                      type(f).__name__)
        if f.get("kind") == "kernel" and not (
                isinstance(f.get("id"), str) and isinstance(f.get("ops"), list) and f["ops"]):
            raise bad(f"fusions[{i}]", "a kernel fusion needs an 'id' and a non-empty 'ops' "
                      "list", "{\"id\": ..., \"kind\": \"kernel\", \"ops\": [...]}", f)

    ops = raw["operators"]
    for name, entry in ops.items():
        if not isinstance(entry, dict):
            raise bad(f"operators.{name}", "an operator entry must be an object", "an object",
                      type(entry).__name__)
        for key in OPERATOR_KEYS:
            if key not in entry:
                raise bad(f"operators.{name}.{key}", "an operator entry is missing a key",
                          f"key '{key}'", "nothing")
        stars = entry["stars"]
        if isinstance(stars, bool) or not isinstance(stars, int) or not 1 <= stars <= 5:
            raise bad(f"operators.{name}.stars", "the recommendation is out of range",
                      "an integer 1..5", stars)
        form = entry["int8_form"]
        if form is not None and form not in ops:
            raise bad(f"operators.{name}.int8_form", "names an operator not in the table",
                      "null or an operator listed under 'operators'", form)


def _validate_cost_model(cm: dict, bad) -> None:
    band = cm.get("band")
    for prec in ("fp16", "int8"):
        pair = band.get(prec) if isinstance(band, dict) else None
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair)
                and 0 < pair[0] <= 1 <= pair[1] < float("inf")):
            raise bad(f"cost_model.band.{prec}", "the estimate's uncertainty band is missing or "
                      "malformed", "[low, high] factors of estimate/measurement with "
                      "0 < low <= 1 <= high", pair if isinstance(band, dict) else band)
    for key in COST_MODEL_FLAGS:
        if not isinstance(cm.get(key), bool):
            raise bad(f"cost_model.{key}", "a cost-model switch is missing or not a boolean",
                      "true or false", cm.get(key, "nothing"))
    for keys, lo_ok, expected in ((COST_MODEL_RATES, False, "a positive number"),
                                  (COST_MODEL_AMOUNTS, True, "a number >= 0"),
                                  (COST_MODEL_FRACTIONS, False, "a number in (0, 1]")):
        for key in keys:
            value = cm.get(key)
            ok = (not isinstance(value, bool) and isinstance(value, (int, float))
                  and (value > 0 or (lo_ok and value == 0)) and value < float("inf")
                  and (keys is not COST_MODEL_FRACTIONS or value <= 1))
            if not ok:
                raise bad(f"cost_model.{key}", "a cost-model constant is missing or out of range",
                          expected, "nothing" if key not in cm else value)
