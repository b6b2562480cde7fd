"""``deploy.yaml``: read, check every field, name the line of every mistake.

Everything is validated before anything is written: an unknown key, a wrong type, a file
that does not exist or a regression gate without its baseline report is one paragraph
(``DoptError``) naming the file, the line and the field. Relative paths are resolved
against the folder of ``deploy.yaml``, so a CI job can run it from anywhere.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DoptError
from ..formats.fileio import existing_file

MAX_CONFIG_BYTES = 1 << 20
FRAMEWORKS = ("auto", "pytorch", "onnx", "tensorflow")
RANKINGS = ("sqnr", "metric")


class _Lines(dict):
    """Dotted field path -> 1-based line number in deploy.yaml."""


def _compose(text: str, file: str) -> tuple[Any, _Lines]:
    """YAML -> plain values, recording each key's line; duplicate keys are errors."""
    import yaml
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise DoptError(f"deploy.yaml is not valid YAML{where}: "
                        f"{getattr(e, 'problem', None) or e}", file=file,
                        hint="compare with the example in docs/deploy.md") from None
    lines = _Lines()
    if root is None:
        return None, lines

    def conv(node, path):
        if isinstance(node, yaml.MappingNode):
            out = {}
            for k, v in node.value:
                if not isinstance(k, yaml.ScalarNode):
                    raise DoptError("a key must be a plain name", file=file,
                                    field=f"line {k.start_mark.line + 1}")
                key = k.value
                sub = f"{path}.{key}" if path else key
                if key in out:
                    raise DoptError(f"key '{key}' is given twice", file=file,
                                    field=f"{sub} (line {k.start_mark.line + 1})",
                                    hint="keep one of them")
                lines[sub] = k.start_mark.line + 1
                out[key] = conv(v, sub)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [conv(v, f"{path}[{i}]") for i, v in enumerate(node.value)]
        return scalars.construct_object(node, deep=True)

    scalars = yaml.constructor.SafeConstructor()
    return conv(root, ""), lines


# --- the schema ---------------------------------------------------------------------

@dataclass
class Gate:
    """One gate as configured (``kind``: accuracy, agreement, latency, ...)."""
    kind: str
    settings: dict


@dataclass
class EvalSpec:
    kind: str                         # "images" | "binary" | "function"
    path: Path                        # folder, .bin file, or module .py
    labels: Path | None = None
    function: str | None = None       # attribute name in the module
    limit: int | None = None
    batch_size: int = 256
    name: str = "top-1 accuracy (%)"


@dataclass
class MixedSpec:
    enabled: bool = True
    max_evaluations: int = 16
    ranking: str = "sqnr"
    sensitivity_samples: int = 256    # calibration samples for the cheap per-layer error
    worst_samples: int = 64           # of those, the worst (largest INT8 error) are used


@dataclass
class DeployConfig:
    path: Path                        # deploy.yaml
    model: str                        # as resolved (file path, or net.py:Name)
    framework: str                    # pytorch | onnx | tensorflow
    input_shape: str
    input_shapes: dict
    calibration: Path
    evaluation: EvalSpec
    output: Path
    weights: Path | None = None
    input_format: str = "NCHW"
    out_nodes: str | None = None
    profile: str = "kirin9000"
    mixed: MixedSpec = field(default_factory=MixedSpec)
    gates: dict[str, dict] = field(default_factory=dict)
    signing_key: Path | None = None
    signing_password_env: str | None = None
    lines: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)

    def where(self, dotted: str) -> str:
        line = self.lines.get(dotted)
        return f"{dotted} (line {line})" if line else dotted


TOP_KEYS = {"model", "weights", "framework", "input_shape", "input_format", "out_nodes",
            "calibration", "evaluation", "profile", "mixed_precision", "gates", "signing",
            "output"}
EVAL_KEYS = {"images", "binary", "labels", "function", "limit", "batch_size", "metric_name"}
MIXED_KEYS = {"enabled", "max_evaluations", "ranking", "sensitivity_samples", "worst_samples"}
SIGN_KEYS = {"key", "password_env"}
GATE_KEYS = {
    "accuracy": {"max_drop"},
    "agreement": {"min"},
    "latency": {"max_ms", "fp16_max_ms"},
    "size": {"max_mb"},
    "memory": {"max_mb"},
    "placement": {"max_cpu_nodes", "strict"},
    "regression": {"baseline", "accuracy_tolerance", "latency_tolerance", "size_tolerance"},
}


class _Checker:
    def __init__(self, file: Path, lines: _Lines):
        self.file, self.lines = str(file), lines
        self.base = file.resolve().parent

    def err(self, dotted: str, what: str, **kw) -> DoptError:
        line = self.lines.get(dotted)
        fld = f"{dotted} (line {line})" if line else dotted
        kw.setdefault("hint", "see docs/deploy.md for every field of deploy.yaml")
        return DoptError(what, file=self.file, field=fld, **kw)

    def keys(self, d: dict, allowed: set, prefix: str, *, what: str) -> None:
        for k in d:
            if k not in allowed:
                dotted = f"{prefix}.{k}" if prefix else k
                raise self.err(dotted, f"unknown key '{k}' in {what}",
                               expected="one of " + ", ".join(sorted(allowed)),
                               hint="check the spelling (see docs/deploy.md)")

    def mapping(self, v, dotted: str) -> dict:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise self.err(dotted, "must be a mapping of settings",
                           found=f"{type(v).__name__} {v!r}"[:120])
        return v

    def string(self, v, dotted: str) -> str:
        if not isinstance(v, str) or not v.strip():
            raise self.err(dotted, "must be a non-empty string",
                           found=f"{type(v).__name__} {v!r}"[:120])
        return v.strip()

    def number(self, v, dotted: str, *, lo: float | None = None, integer: bool = False):
        ok = isinstance(v, int) and not isinstance(v, bool) if integer else \
            isinstance(v, (int, float)) and not isinstance(v, bool)
        if not ok or (isinstance(v, float) and not math.isfinite(v)):
            raise self.err(dotted, f"must be {'an integer' if integer else 'a number'}",
                           found=f"{type(v).__name__} {v!r}"[:120])
        if lo is not None and v < lo:
            raise self.err(dotted, f"must be >= {lo}", found=repr(v))
        return v

    def boolean(self, v, dotted: str) -> bool:
        if not isinstance(v, bool):
            raise self.err(dotted, "must be true or false", found=f"{type(v).__name__} {v!r}")
        return v

    def path(self, v, dotted: str, *, kind: str = "file", what: str = "file") -> Path:
        s = self.string(v, dotted)
        p = Path(s) if os.path.isabs(s) else self.base / s
        ok = p.is_file() if kind == "file" else p.is_dir() if kind == "dir" else p.exists()
        if not ok:
            raise self.err(dotted, f"the {what} does not exist",
                           found=f"{s!r} (resolved to {p})",
                           hint="paths are relative to the folder of deploy.yaml")
        return p


def _framework(model: str, given: str, c: _Checker) -> str:
    if given != "auto":
        return given
    low = model.lower()
    name = Path(model.split(":")[0] if ".py:" in model else model).name.lower()
    if low.endswith(".onnx"):
        return "onnx"
    if name.endswith(".py") or ".py:" in low:
        return "pytorch"
    if low.endswith((".pb", ".keras", ".h5")) or Path(model).is_dir():
        return "tensorflow"
    raise c.err("model", "cannot tell the model's framework from its name",
                expected="an .onnx file, a PyTorch net.py (or net.py:ClassName) with "
                         "weights:, a TensorFlow .pb / .keras file or SavedModel folder",
                found=repr(model), hint="or name it: framework: onnx|pytorch|tensorflow")


def parse_max_drop(v, c: _Checker, dotted: str) -> tuple[float, bool]:
    """``0.5`` (absolute, metric units) or ``"1%"`` (relative to the float metric)."""
    if isinstance(v, str) and v.strip().endswith("%"):
        try:
            x = float(v.strip()[:-1])
        except ValueError:
            x = float("nan")
        if not math.isfinite(x) or x < 0:
            raise c.err(dotted, "a relative drop must be a number >= 0 followed by %",
                        found=repr(v))
        return x / 100.0, True
    return float(c.number(v, dotted, lo=0)), False


def load_config(path, *, output: str | None = None) -> DeployConfig:
    """Read and validate ``deploy.yaml``; every referenced file must exist."""
    p = existing_file(path, field="-c", max_bytes=MAX_CONFIG_BYTES, what="deploy.yaml")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DoptError(f"deploy.yaml is not UTF-8 text (byte offset {e.start})",
                        file=str(path), hint="save the file as UTF-8") from None
    data, lines = _compose(text, str(path))
    c = _Checker(p, lines)
    if not isinstance(data, dict):
        raise DoptError("deploy.yaml must be a mapping of settings (model:, input_shape:, "
                        "calibration:, evaluation:, gates: ...)", file=str(path),
                        hint="see the example in docs/deploy.md")
    c.keys(data, TOP_KEYS, "", what="deploy.yaml")
    for req in ("model", "input_shape", "calibration", "evaluation"):
        if req not in data:
            raise c.err(req, f"the required key '{req}' is missing",
                        hint=f"add '{req}:' (see docs/deploy.md)")
    fw = data.get("framework", "auto")
    if fw not in FRAMEWORKS:
        raise c.err("framework", "unknown framework", expected=" | ".join(FRAMEWORKS),
                    found=repr(fw))
    model_s = c.string(data["model"], "model")
    spec_path, sep, attr = model_s.rpartition(":") if ".py:" in model_s else (model_s, "", "")
    framework = _framework(model_s, fw, c)
    mpath = c.path(spec_path, "model", kind="any", what="model file")
    model = f"{mpath}{sep}{attr}" if sep else str(mpath)
    weights = None
    if framework == "pytorch":
        if "weights" not in data:
            raise c.err("weights", "a PyTorch model needs its weights",
                        expected="weights: net.pth (a state dict)")
        weights = c.path(data["weights"], "weights", what="weights file")
    elif "weights" in data:
        raise c.err("weights", f"weights: is only used for PyTorch models (this model is "
                    f"{framework})", hint="delete the line")
    from ..formats.strategy_config import parse_input_shape
    shape_s = c.string(data["input_shape"], "input_shape")
    try:
        shapes = parse_input_shape(shape_s.replace("，", ",").replace("；", ";"),
                                   source="input_shape")
    except DoptError as e:
        raise c.err("input_shape", f"cannot parse the input shape ({e.what})",
                    expected="'name:n,c,h,w' (several inputs separated by ';')",
                    found=repr(shape_s)) from None
    fmt = data.get("input_format", "NCHW")
    if fmt not in ("NCHW", "NHWC"):
        raise c.err("input_format", "unknown input format", expected="NCHW or NHWC",
                    found=repr(fmt))
    out_nodes = c.string(data["out_nodes"], "out_nodes") if "out_nodes" in data else None
    calib = c.path(data["calibration"], "calibration", what="calibration config "
                   "(config.prototxt)")
    evaluation = _evaluation(c, c.mapping(data["evaluation"], "evaluation"), shapes)
    mixed = _mixed(c, c.mapping(data.get("mixed_precision"), "mixed_precision"))
    gates = _gates(c, c.mapping(data.get("gates"), "gates"))
    sign = c.mapping(data.get("signing"), "signing")
    c.keys(sign, SIGN_KEYS, "signing", what="signing")
    key = c.path(sign["key"], "signing.key", what="private key") if "key" in sign else None
    pw_env = c.string(sign["password_env"], "signing.password_env") \
        if "password_env" in sign else None
    profile = c.string(data.get("profile", "kirin9000"), "profile")
    from ..npu.profile import load_profile
    try:
        load_profile(profile)
    except DoptError as e:
        raise c.err("profile", f"unknown hardware profile ({e.what})") from None
    out_s = output if output is not None else data.get("output", "deploy_out")
    out_s = c.string(out_s, "output")
    out = Path(out_s) if os.path.isabs(out_s) or output is not None else c.base / out_s
    if not out.resolve().parent.is_dir():
        raise c.err("output", "the output folder's parent does not exist", found=str(out))
    return DeployConfig(path=p, model=model, framework=framework, input_shape=shape_s,
                        input_shapes=shapes, calibration=calib, evaluation=evaluation,
                        output=out, weights=weights, input_format=fmt, out_nodes=out_nodes,
                        profile=profile, mixed=mixed, gates=gates, signing_key=key,
                        signing_password_env=pw_env, lines=dict(lines), raw=data)


def _evaluation(c: _Checker, ev: dict, shapes: dict) -> EvalSpec:
    c.keys(ev, EVAL_KEYS, "evaluation", what="evaluation")
    kinds = [k for k in ("images", "binary", "function") if k in ev]
    if len(kinds) != 1:
        raise c.err("evaluation", "give exactly one evaluation set",
                    expected="images: FOLDER (one sub-folder per class), binary: FILE.bin with "
                             "labels: FILE, or function: module.py:evaluate",
                    found=", ".join(kinds) or "none")
    kind = kinds[0]
    limit = c.number(ev["limit"], "evaluation.limit", lo=1, integer=True) \
        if "limit" in ev else None
    batch = c.number(ev.get("batch_size", 256), "evaluation.batch_size", lo=1, integer=True)
    name = c.string(ev["metric_name"], "evaluation.metric_name") if "metric_name" in ev \
        else None
    if kind != "function" and len(shapes) != 1:
        raise c.err(f"evaluation.{kind}", "a labelled set feeds one model input; this model "
                    f"has {len(shapes)}", hint="use function: module.py:evaluate")
    if kind == "images":
        if "labels" in ev:
            raise c.err("evaluation.labels", "an image set takes its labels from the class "
                        "sub-folders", hint="delete labels:")
        folder = c.path(ev["images"], "evaluation.images", kind="dir", what="image folder")
        return EvalSpec("images", folder, limit=limit, batch_size=batch,
                        name=name or "top-1 accuracy (%)")
    if kind == "binary":
        if "labels" not in ev:
            raise c.err("evaluation.labels", "a BINARY evaluation set needs its labels",
                        expected="labels: FILE (.npy of integers, or one integer per line)")
        f = c.path(ev["binary"], "evaluation.binary", what="BINARY data file")
        labels = c.path(ev["labels"], "evaluation.labels", what="labels file")
        return EvalSpec("binary", f, labels=labels, limit=limit, batch_size=batch,
                        name=name or "top-1 accuracy (%)")
    if "labels" in ev:
        raise c.err("evaluation.labels", "a user function computes its own metric",
                    hint="delete labels:")
    spec = c.string(ev["function"], "evaluation.function")
    file_s, sep, attr = spec.rpartition(":")
    if not sep or not file_s.endswith(".py") or not attr.isidentifier():
        raise c.err("evaluation.function", "must name a function in a Python file",
                    expected="module.py:evaluate", found=repr(spec))
    f = c.path(file_s, "evaluation.function", what="evaluation module")
    return EvalSpec("function", f, function=attr, limit=limit, batch_size=batch,
                    name=name or "metric")


def _mixed(c: _Checker, mp: dict) -> MixedSpec:
    c.keys(mp, MIXED_KEYS, "mixed_precision", what="mixed_precision")
    m = MixedSpec()
    if "enabled" in mp:
        m.enabled = c.boolean(mp["enabled"], "mixed_precision.enabled")
    if "max_evaluations" in mp:
        m.max_evaluations = c.number(mp["max_evaluations"], "mixed_precision.max_evaluations",
                                     lo=1, integer=True)
    if "ranking" in mp:
        if mp["ranking"] not in RANKINGS:
            raise c.err("mixed_precision.ranking", "unknown ranking",
                        expected=" or ".join(RANKINGS), found=repr(mp["ranking"]))
        m.ranking = mp["ranking"]
    for k in ("sensitivity_samples", "worst_samples"):
        if k in mp:
            setattr(m, k, c.number(mp[k], f"mixed_precision.{k}", lo=1, integer=True))
    return m


def _gates(c: _Checker, g: dict) -> dict[str, dict]:
    c.keys(g, set(GATE_KEYS), "gates", what="gates")
    out: dict[str, dict] = {}
    for kind, settings in g.items():
        d = c.mapping(settings, f"gates.{kind}")
        c.keys(d, GATE_KEYS[kind], f"gates.{kind}", what=f"gates.{kind}")
        if not d:
            raise c.err(f"gates.{kind}", "the gate sets no threshold",
                        expected=", ".join(sorted(GATE_KEYS[kind])))
        s: dict = {}
        pre = f"gates.{kind}"
        if kind == "accuracy":
            if "max_drop" not in d:
                raise c.err(pre, "the accuracy gate needs max_drop",
                            expected="max_drop: 0.5 (metric units) or max_drop: '1%'")
            s["max_drop"], s["relative"] = parse_max_drop(d["max_drop"], c, f"{pre}.max_drop")
        elif kind == "agreement":
            s["min"] = float(c.number(d["min"], f"{pre}.min", lo=0))
            if s["min"] > 100:
                raise c.err(f"{pre}.min", "agreement is a percentage", expected="0 ... 100",
                            found=repr(d["min"]))
        elif kind in ("latency", "size", "memory"):
            for k, v in d.items():
                s[k] = float(c.number(v, f"{pre}.{k}", lo=0))
        elif kind == "placement":
            if "max_cpu_nodes" in d:
                s["max_cpu_nodes"] = c.number(d["max_cpu_nodes"], f"{pre}.max_cpu_nodes", lo=0,
                                              integer=True)
            if "strict" in d:
                s["strict"] = c.boolean(d["strict"], f"{pre}.strict")
        elif kind == "regression":
            if "baseline" not in d:
                raise c.err(pre, "a regression gate needs the report of an earlier run",
                            expected="baseline: path/to/report.json",
                            hint="point baseline: to the report.json of the run to compare "
                                 "with, or delete the regression gate")
            s["baseline"] = c.path(d["baseline"], f"{pre}.baseline", what="baseline report")
            for k in ("accuracy_tolerance", "latency_tolerance", "size_tolerance"):
                s[k] = float(c.number(d.get(k, 0.0), f"{pre}.{k}", lo=0))
        out[kind] = s
    return out
