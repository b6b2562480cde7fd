"""``scen.yaml``: the reference's NASEA scenario file, read with the line of every key.

Every key of the reference is accepted with its type, range and default (docs/nas.md has the
table); a misspelt key, a wrong type, a value out of range or a missing dataset folder is a
one-paragraph ``DoptError`` naming the key and its line, raised before anything is written.
The reference's own example parses as printed, including its full-width colon after
``pre_train_dir`` and ``input_shape: (224, 224, 3)`` written as a tuple.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DoptError

MAX_BYTES = 1 << 20
APPLICATIONS = {"image_classification": "classification", "object_detection": "detection",
                "semantic_segmentation": "segmentation"}
FRAMEWORKS = {"pytorch": "pytorch", "tensorflow": "tensorflow"}
RESOURCES = {"pytorch": "pytorch_standalone", "tensorflow": "tensorflow_standalone"}
CONSTRAINTS = ("size", "flops", "latency")
#: ``processor_version`` -> hardware profile (dopt/npu/profiles/<name>.json)
PROCESSORS = {"npu_v1": "kirin9000"}
_FULLWIDTH_KEY = re.compile(r"^(\s*(?:-\s+)?[A-Za-z_][\w.-]*)\s*\uff1a(\s*)")


@dataclass
class Node:
    """A parsed YAML value with the (1-based) line it starts on."""

    value: Any
    line: int


@dataclass
class ScenConfig:
    """The validated scenario; ``lines`` maps a dotted key to its line for later errors."""

    path: str
    framework: str                 # "pytorch" | "tensorflow"
    batch_size: int
    epochs: int
    application_type: str
    constraint_type: str
    constraint_value: float
    processor_version: str
    profile: str
    latency_precision: str         # "int8" | "fp16" (dopt's addition)
    input_shape: tuple             # as written (CHW for channels_first, HWC for channels_last)
    data_format: str
    filters: list
    strides: list
    feature_choose: list | None
    optimizer: dict
    pre_train_dir: str | None
    train_dir: str
    val_dir: str
    generation_num: int
    pop_size: int
    seed: int
    width_multipliers: list
    resource_name: str
    gpu_ids: list
    lines: dict = field(default_factory=dict)

    @property
    def app_short(self) -> str:
        """``classification`` / ``segmentation`` / ``detection`` (the log folder's suffix)."""
        return APPLICATIONS[self.application_type]

    @property
    def input_chw(self) -> tuple:
        s = self.input_shape
        return tuple(s) if self.data_format == "channels_first" else (s[2], s[0], s[1])

    def fingerprint(self) -> dict:
        """What a saved supernet / study depends on: a resumed run must agree on all of it."""
        return {"framework": self.framework, "application_type": self.application_type,
                "input_shape": list(self.input_shape), "data_format": self.data_format,
                "filters": list(self.filters), "strides": list(self.strides),
                "feature_choose": self.feature_choose, "width_multipliers": self.width_multipliers,
                "constraint_type": self.constraint_type,
                "constraint_value": self.constraint_value, "profile": self.profile,
                "latency_precision": self.latency_precision, "pop_size": self.pop_size,
                "seed": self.seed}


# --- YAML with lines ------------------------------------------------------------------------


def _yaml():
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml ships with the extras
        raise DoptError("reading scen.yaml needs the Python package 'pyyaml'",
                        hint="pip install pyyaml") from None
    return yaml


def _to_nodes(node, path: str, yaml, constructor) -> Node:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Node] = {}
        for k, v in node.value:
            key = constructor.construct_object(k, deep=True)
            if not isinstance(key, str):
                raise DoptError(f"the key {key!r} is not a name", file=path,
                                field=f"line {k.start_mark.line + 1}",
                                hint="keys are the names of the reference's scen.yaml table")
            if key in out:
                raise DoptError(f"the key '{key}' appears twice in the same section", file=path,
                                field=f"{key} (lines {out[key].line} and "
                                      f"{k.start_mark.line + 1})",
                                hint="keep one of them")
            out[key] = _to_nodes(v, path, yaml, constructor)
            out[key].line = k.start_mark.line + 1
        return Node(out, line)
    if isinstance(node, yaml.SequenceNode):
        return Node([_to_nodes(v, path, yaml, constructor).value for v in node.value], line)
    return Node(constructor.construct_object(node, deep=True), line)


def read_yaml(path: str) -> Node:
    """The file as a tree of ``Node``; YAML syntax errors name the line."""
    yaml = _yaml()
    p = Path(path)
    if not p.is_file():
        raise DoptError("the scenario file does not exist", file=str(path), field="-c",
                        hint="pass the path of your scen.yaml")
    if p.stat().st_size > MAX_BYTES:
        raise DoptError("the scenario file is too large to be a scen.yaml", file=str(path),
                        expected=f"at most {MAX_BYTES} bytes")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DoptError("the scenario file is not UTF-8 text", file=str(path),
                        found=f"byte offset {e.start}", hint="save it as UTF-8") from None
    # the reference's example writes `pre_train_dir：` with a full-width colon
    text = "\n".join(_FULLWIDTH_KEY.sub(r"\1:\2 ", ln) for ln in text.split("\n"))
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        constructor = yaml.constructor.SafeConstructor()
        tree = _to_nodes(root, str(path), yaml, constructor) if root is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise DoptError("the scenario file is not valid YAML", file=str(path),
                        field=f"line {mark.line + 1}, column {mark.column + 1}" if mark else None,
                        found=str(e.problem or e.context) + (
                            f" ({e.context} from line {e.context_mark.line + 1})"
                            if e.problem and e.context and e.context_mark else ""),
                        hint="indent each section under its parent with spaces and write "
                             "`key: value`") from None
    except yaml.YAMLError as e:
        raise DoptError("the scenario file is not valid YAML", file=str(path),
                        found=str(e).splitlines()[0]) from None
    if tree is None or not isinstance(tree.value, dict):
        raise DoptError("the scenario file has no `scenario:` section", file=str(path),
                        expected="a mapping with the top-level key 'scenario'")
    return tree


# --- schema -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    kind: str                      # int, number, str, list, shape, ids, section
    required: bool = False
    default: Any = None
    doc: str = ""


# section name -> {key: Key | dict}; dopt's additions are marked in docs/nas.md
SCHEMA: dict = {
    "scenario": {
        "strategy": {
            "name": Key("str", True, doc="NASEA"),
            "framework": Key("str", True, doc="TensorFlow or PyTorch"),
            "batch_size": Key("int", True),
            "epochs": Key("int", True),
            "constraint": {
                "application_type": Key("str", True),
                "constraint_type": Key("str", True),
                "constraint_value": Key("number", True),
                "processor_version": Key("str", False, "npu_v1"),
                "latency_precision": Key("str", False, "int8"),
            },
            "supernet": {
                "input_shape": Key("shape", False, (224, 224, 3)),
                "data_format": Key("str", False, None),
                "filters": Key("list", False, [64, 64, 128, 128, 256, 256]),
                "strides": Key("list", False, [1, 1, 2, 1, 2, 1]),
                "feature_choose": Key("list", False, None),
                "width_multipliers": Key("list", False, [0.5, 0.75, 1.0, 1.25]),
            },
            "optimizer": {
                "weights_optimizer": {
                    "type": Key("str", False, None),
                    "betas": Key("list", False, [0.9, 0.999]),
                    "learning_rate": Key("number", False, None),
                    "momentum": Key("number", False, 0.9),
                },
            },
            "dataset": {
                "pre_train_dir": Key("str", False, None),
                "train_dir": Key("str", True),
                "val_dir": Key("str", True),
            },
            "searcher": {
                "generation_num": Key("int", False, 20),
                "pop_size": Key("int", False, 40),
                "seed": Key("int", False, 0),
            },
        },
        "resource": {
            "name": Key("str", True),
            "gpu_id": Key("ids", True),
        },
    },
}


class _Reader:
    def __init__(self, path: str):
        self.path = path
        self.lines: dict[str, int] = {}

    def err(self, key: str, line: int | None, what: str, **kw) -> DoptError:
        where = f"{key} (line {line})" if line else key
        return DoptError(what, file=self.path, field=where, **kw)

    def walk(self, node: Node, schema: dict, prefix: str, out: dict) -> None:
        values = node.value
        if not isinstance(values, dict):
            raise self.err(prefix, node.line, "this section must hold `key: value` lines",
                           found=type(values).__name__)
        for k, sub in values.items():
            dotted = f"{prefix}.{k}" if prefix else k
            if k not in schema:
                close = difflib.get_close_matches(k, list(schema), n=1, cutoff=0.6)
                raise self.err(dotted, sub.line, f"unknown key '{k}' in section "
                               f"'{prefix or '(top)'}'",
                               expected="one of " + ", ".join(schema),
                               hint=(f"did you mean '{close[0]}'?" if close
                                     else "remove the line or check its indentation"))
            self.lines[dotted] = sub.line
        for k, spec in schema.items():
            dotted = f"{prefix}.{k}" if prefix else k
            sub = values.get(k)
            if isinstance(spec, dict):
                if sub is None:
                    if _has_required(spec):
                        raise self.err(dotted, node.line, f"the section '{k}' is missing",
                                       expected="keys " + ", ".join(_required(spec, dotted)),
                                       hint="see the scen.yaml table in docs/nas.md")
                    sub = Node({}, node.line)
                if sub.value is None:
                    sub = Node({}, sub.line)
                self.walk(sub, spec, dotted, out)
                continue
            if sub is None or sub.value is None:
                if spec.required:
                    raise self.err(dotted, node.line if sub is None else sub.line,
                                   f"the key '{k}' is required",
                                   hint=f"add `{k}:` under `{prefix.rsplit('.', 1)[-1]}:`")
                out[dotted] = (spec.default, None)
                continue
            out[dotted] = (self.typed(dotted, sub, spec.kind), sub.line)

    def typed(self, key: str, node: Node, kind: str):
        v = node.value

        def bad(expected):
            return self.err(key, node.line, "the value has the wrong type", expected=expected,
                            found=f"{v!r} ({type(v).__name__})")
        if kind == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad("an integer")
            return v
        if kind == "number":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise bad("a number")
            return float(v)
        if kind == "str":
            if not isinstance(v, str):
                raise bad("a string")
            return v.strip()
        if kind == "list":
            if isinstance(v, str):
                v2 = _parse_tuple(v)
                if v2 is None:
                    raise bad("a list such as [64, 64, 128]")
                v = v2
            if not isinstance(v, (list, tuple)):
                raise bad("a list such as [64, 64, 128]")
            return list(v)
        if kind == "shape":
            t = _parse_tuple(v) if isinstance(v, str) else v
            if not isinstance(t, (list, tuple)) or len(t) != 3 or not all(
                    isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in t):
                raise bad("three positive integers such as (224, 224, 3)")
            return tuple(t)
        if kind == "ids":
            if isinstance(v, int) and not isinstance(v, bool):
                return [v]
            s = str(v).replace(" ", "")
            if not re.fullmatch(r"\d+(,\d+)*", s):
                raise bad("a GPU id or a comma-separated list such as 0,1,2,3")
            return [int(x) for x in s.split(",")]
        raise AssertionError(kind)  # pragma: no cover


def _parse_tuple(s: str):
    m = re.fullmatch(r"\s*[\(\[]?\s*([^\)\]]*?)\s*[\)\]]?\s*", s)
    if not m:
        return None
    out = []
    for part in (p.strip() for p in m.group(1).split(",")):
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            try:
                out.append(float(part))
            except ValueError:
                return None
    return out or None


def _has_required(spec: dict) -> bool:
    return any(_has_required(v) if isinstance(v, dict) else v.required for v in spec.values())


def _required(spec: dict, prefix: str) -> list[str]:
    out = []
    for k, v in spec.items():
        if isinstance(v, dict):
            out += _required(v, f"{prefix}.{k}")
        elif v.required:
            out.append(k)
    return out


def _int_list(r: _Reader, vals: dict, key: str, *, lo: int, hi: int | None = None) -> list:
    v, line = vals[key]
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int) or x < lo or (hi is not None and x > hi):
            rng = f"integers >= {lo}" if hi is None else f"integers in [{lo}, {hi}]"
            raise r.err(key, line, "a list entry is out of range", expected=rng, found=repr(x))
    return list(v)


def _hoist_resource(tree: Node) -> None:
    """The reference's printed example indents ``resource:`` under ``strategy:`` while its
    table names it ``scenario.resource``: accept both places (not both at once)."""
    scen = tree.value.get("scenario")
    if scen is None or not isinstance(scen.value, dict):
        return
    strat = scen.value.get("strategy")
    if strat is None or not isinstance(strat.value, dict) or "resource" not in strat.value:
        return
    if "resource" in scen.value:
        raise DoptError("the section 'resource' appears twice", field=f"resource (lines "
                        f"{scen.value['resource'].line} and {strat.value['resource'].line})",
                        hint="keep the one directly under `scenario:`")
    scen.value["resource"] = strat.value.pop("resource")


def load_scen(path: str, *, check_dirs: bool = True, base_dir: str | None = None) -> ScenConfig:
    """Read and validate ``scen.yaml``. Dataset folders are checked relative to the current
    directory (the reference passes them unchanged to the user's dataset function)."""
    tree = read_yaml(path)
    r = _Reader(str(path))
    _hoist_resource(tree)
    vals: dict[str, tuple[Any, int | None]] = {}
    r.walk(tree, SCHEMA, "", vals)
    S = "scenario.strategy."

    def get(k):
        return vals[k][0]

    def line(k):
        return vals[k][1] or r.lines.get(k)

    def choice(k, options: dict | tuple, what: str):
        v = get(k)
        low = str(v).lower()
        opts = options if isinstance(options, dict) else {o: o for o in options}
        if low not in opts:
            close = difflib.get_close_matches(low, list(opts), n=1, cutoff=0.5)
            raise r.err(k, line(k), f"unsupported {what} '{v}'",
                        expected="one of " + ", ".join(opts),
                        hint=f"did you mean '{close[0]}'?" if close else None)
        return opts[low]

    if str(get(S + "name")).upper() != "NASEA":
        raise r.err(S + "name", line(S + "name"), f"unsupported strategy '{get(S + 'name')}'",
                    expected="NASEA (the architecture search strategy)")
    framework = choice(S + "framework", FRAMEWORKS, "framework")
    for k in (S + "batch_size", S + "epochs", S + "searcher.generation_num",
              S + "searcher.pop_size"):
        if get(k) < 1:
            raise r.err(k, line(k), "the value must be positive", found=str(get(k)))
    if get(S + "searcher.pop_size") < 2:
        k = S + "searcher.pop_size"
        raise r.err(k, line(k), "the population needs at least 2 members", found=str(get(k)))
    app = choice(S + "constraint.application_type", tuple(APPLICATIONS), "application type")
    ctype = choice(S + "constraint.constraint_type", CONSTRAINTS, "constraint type")
    cval = get(S + "constraint.constraint_value")
    if not cval > 0:
        k = S + "constraint.constraint_value"
        raise r.err(k, line(k), "the constraint value must be positive", found=str(cval),
                    hint="size: parameters, flops: multiply-accumulates, latency: milliseconds")
    proc = choice(S + "constraint.processor_version", PROCESSORS, "processor version")
    precision = choice(S + "constraint.latency_precision", ("int8", "fp16"), "latency precision")

    fmt_default = "channels_first" if framework == "pytorch" else "channels_last"
    data_format = get(S + "supernet.data_format") or fmt_default
    data_format = choice(S + "supernet.data_format", ("channels_first", "channels_last"),
                         "data format") if get(S + "supernet.data_format") else data_format
    if framework == "pytorch" and data_format != "channels_first":
        k = S + "supernet.data_format"
        raise r.err(k, line(k), "PyTorch supports only channels_first (as the reference)",
                    found=data_format, hint="write data_format: \"channels_first\" and give "
                    "input_shape as (C, H, W)")
    shape = tuple(get(S + "supernet.input_shape"))
    if vals[S + "supernet.input_shape"][1] is None and data_format == "channels_first":
        shape = (3, 224, 224)
    filters = _int_list(r, vals, S + "supernet.filters", lo=1, hi=8192)
    strides = _int_list(r, vals, S + "supernet.strides", lo=1, hi=2)
    if not filters:
        k = S + "supernet.filters"
        raise r.err(k, line(k), "the skeleton needs at least one layer", found="[]")
    if len(filters) != len(strides):
        k = S + "supernet.strides"
        raise r.err(k, line(k), "filters and strides must have one entry per searchable layer",
                    found=f"{len(filters)} filters and {len(strides)} strides")
    fc = get(S + "supernet.feature_choose")
    if fc is not None:
        fc = _int_list(r, vals, S + "supernet.feature_choose", lo=0, hi=len(filters) - 1)
        if len(set(fc)) != len(fc) or fc != sorted(fc):
            k = S + "supernet.feature_choose"
            raise r.err(k, line(k), "feature_choose must list distinct layers in increasing order",
                        found=str(fc))
    wm = get(S + "supernet.width_multipliers")
    k = S + "supernet.width_multipliers"
    if not wm or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                         and 0.1 <= x <= 4 for x in wm):
        raise r.err(k, line(k), "width multipliers must be numbers in [0.1, 4]", found=str(wm))

    opt_type = get(S + "optimizer.weights_optimizer.type")
    k = S + "optimizer.weights_optimizer.type"
    if opt_type is None:
        opt_type = "Momentum" if (app == "semantic_segmentation" and framework == "tensorflow") \
            else "Adam"
    else:
        allowed = ("sgd", "adam") if framework == "pytorch" else ("sgd", "momentum", "adam")
        if opt_type.lower() not in allowed:
            raise r.err(k, line(k), f"unsupported optimizer '{opt_type}' for {framework}",
                        expected="one of " + ", ".join(a.upper() if a == "sgd" else a.capitalize()
                                                       for a in allowed))
        opt_type = {"sgd": "SGD", "adam": "Adam", "momentum": "Momentum"}[opt_type.lower()]
    lr = get(S + "optimizer.weights_optimizer.learning_rate")
    if lr is None:
        lr = 1e-5 if app == "semantic_segmentation" else 1e-4
    for key, v in ((S + "optimizer.weights_optimizer.learning_rate", lr),
                   (S + "optimizer.weights_optimizer.momentum",
                    get(S + "optimizer.weights_optimizer.momentum"))):
        if not 0 < v < 1:
            raise r.err(key, line(key), "the value must lie in (0, 1)", found=str(v))
    betas = get(S + "optimizer.weights_optimizer.betas")
    k = S + "optimizer.weights_optimizer.betas"
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                  and 0 < b < 1 for b in betas):
        raise r.err(k, line(k), "betas must be two numbers in (0, 1)", found=str(betas),
                    hint="e.g. [0.9, 0.999]")

    base = Path(base_dir) if base_dir else Path(os.getcwd())
    dirs = {}
    for name in ("train_dir", "val_dir", "pre_train_dir"):
        key = S + "dataset." + name
        v = get(key)
        if name == "pre_train_dir" and v is None:
            if app != "image_classification":
                raise r.err(key, r.lines.get(S + "dataset"),
                            f"pre_train_dir is required for {app}",
                            hint="give the folder of the pre-training data or of a supernet "
                                 "checkpoint (supernet.pt) from a classification run")
            dirs[name] = None
            continue
        if check_dirs and not (base / v).is_dir():
            raise r.err(key, line(key), f"the {name} folder does not exist", found=repr(v),
                        hint="give an existing folder (relative paths are read from the "
                             "current directory)")
        dirs[name] = v
    res = choice("scenario.resource.name", {v: v for v in RESOURCES.values()}, "resource name")
    if res != RESOURCES[framework]:
        k = "scenario.resource.name"
        raise r.err(k, line(k), f"the resource '{get(k)}' does not match framework "
                    f"{get(S + 'framework')}", expected=RESOURCES[framework])
    if app == "object_detection":
        k = S + "constraint.application_type"
        raise r.err(k, line(k), "object_detection is not supported yet",
                    expected="image_classification or semantic_segmentation",
                    hint="search a classification backbone, then attach your detection head")
    if app == "semantic_segmentation" and framework != "pytorch":
        k = S + "constraint.application_type"
        raise r.err(k, line(k), "semantic_segmentation is supported with PyTorch only (as in "
                    "the reference's PyTorch demos)", found=f"framework {framework}")
    return ScenConfig(
        path=str(path), framework=framework, batch_size=get(S + "batch_size"),
        epochs=get(S + "epochs"), application_type=app, constraint_type=ctype,
        constraint_value=cval, processor_version=str(get(S + "constraint.processor_version")).lower(),
        profile=proc, latency_precision=precision, input_shape=shape, data_format=data_format,
        filters=filters, strides=strides, feature_choose=fc,
        optimizer={"type": opt_type, "learning_rate": lr, "betas": [float(b) for b in betas],
                   "momentum": get(S + "optimizer.weights_optimizer.momentum")},
        pre_train_dir=dirs["pre_train_dir"], train_dir=dirs["train_dir"],
        val_dir=dirs["val_dir"], generation_num=get(S + "searcher.generation_num"),
        pop_size=get(S + "searcher.pop_size"), seed=get(S + "searcher.seed"),
        width_multipliers=[float(x) for x in wm], resource_name=res,
        gpu_ids=get("scenario.resource.gpu_id"), lines=dict(r.lines))
