"""The AIPP configuration file (``dopt omg --insert_op_conf``), as the reference writes it.

A protobuf-text-like file of one or more ``aipp_op { ... }`` blocks. ``parse_text``
returns one plain-JSON *spec* per block (what the compiler bakes into the ``.om`` and
the runtime executes with ``dopt.npu.aipp``); every rule the reference states is
checked here and reported as a one-paragraph ``DoptError`` naming the line and field.

Static or dynamic is decided as the reference does: the model is *dynamic* when any
sub-function says ``dynamic: true`` or no sub-function is switched on; otherwise
static. In a dynamic model each dynamic sub-function takes its parameters at run time
(the configured sizes are the maxima); static sub-functions stay baked in.
"""
from __future__ import annotations

import difflib
import re

from ..errors import DoptError
from ..formats.fileio import existing_file

MAX_BYTES = 1 << 20
MAX_OPS = 32
MAX_DEPTH = 4
MAX_SRC = 4096

FORMATS = ("YUV420SP_U8", "XRGB8888_U8", "ARGB8888_U8", "YUYV_U8", "YUV422SP_U8",
           "AYUV444_U8", "YUV400_U8", "RGB888_U8")
YUV_FORMATS = ("YUV420SP_U8", "YUYV_U8", "YUV422SP_U8", "AYUV444_U8", "YUV400_U8")
# The reference's swap and CSC tables.
AX_SWAP_FORMATS = ("ARGB8888_U8", "XRGB8888_U8", "AYUV444_U8")
UV_SWAP_FORMATS = ("YUV420SP_U8", "YUV422SP_U8", "YUYV_U8", "AYUV444_U8")
RB_SWAP_FORMATS = ("ARGB8888_U8", "XRGB8888_U8", "RGB888_U8")
CSC_FROM_YUV = ("YUV420SP_U8", "YUYV_U8", "YUV422SP_U8", "AYUV444_U8")
CSC_FROM_RGB = ("XRGB8888_U8", "ARGB8888_U8", "RGB888_U8")
CSC_TO_RGB = ("RGB888_U8", "BGR888_U8")
CSC_TO_YUV = ("YVU444SP_U8", "YUV444SP_U8", "YUV400_U8")
COLOR_SPACES = ("JPEG", "BT_601_NARROW", "BT_601_WIDE", "BT_709_NARROW", "BT_709_WIDE")
ROTATIONS = (0, 90, 180, 270)
RESIZE_MIN, RESIZE_MAX = 16, 448
PAD_MAX = 32

# field -> (kind, low, high); kinds: bool, uint, int, float, enum:<tuple name>, str
_B, _U = ("bool", None, None), ("uint", 0, 2 ** 32 - 1)
_MATRIX = {f"matrix_r{r}c{c}": ("int", -32768, 32767) for r in range(3) for c in range(3)}
_BIAS = {f"{k}_bias_{i}": ("uint", 0, 255) for k in ("input", "output") for i in range(3)}
SCHEMA: dict[str, dict] = {
    "aipp_op": {"input_name": ("str", None, None), "related_input_rank": _U,
                "node_after_aipp": ("str", None, None), "input_edge_idx": _U},
    "input_para": {"format": ("enum", FORMATS, None), "max_src_image_size": _U},
    "shape": {"src_image_size_w": ("uint", 0, MAX_SRC), "src_image_size_h": ("uint", 0, MAX_SRC)},
    "crop_func": {"switch": _B, "dynamic": _B, "load_start_pos_w": ("uint", 0, MAX_SRC),
                  "load_start_pos_h": ("uint", 0, MAX_SRC), "crop_size_w": ("uint", 0, MAX_SRC),
                  "crop_size_h": ("uint", 0, MAX_SRC)},
    "swap_func": {"dynamic": _B, "rbuv_swap_switch": _B, "ax_swap_switch": _B},
    "resize_func": {"switch": _B, "dynamic": _B, "resize_output_w": ("uint", 0, MAX_SRC),
                    "resize_output_h": ("uint", 0, MAX_SRC)},
    "csc_func": {"switch": _B, "dynamic": _B, **_MATRIX, **_BIAS,
                 "output_format": ("enum", CSC_TO_RGB + CSC_TO_YUV, None),
                 "color_space": ("enum", COLOR_SPACES, None)},
    "dtc_func": {"switch": _B, "dynamic": _B,
                 **{f"mean_chn_{i}": ("uint", 0, 255) for i in range(4)},
                 **{f"min_chn_{i}": ("float", -65504.0, 65504.0) for i in range(4)},
                 **{f"var_reci_chn_{i}": ("float", -65504.0, 65504.0) for i in range(4)}},
    "rotation_func": {"switch": _B, "dynamic": _B, "rotation_angle": ("float", None, None)},
    "padding_func": {"switch": _B, "dynamic": _B,
                     **{f"{s}_padding_size": ("uint", 0, 2 ** 16)
                        for s in ("left", "right", "top", "bottom")},
                     **{f"padding_value_chn_{i}": ("float", -65504.0, 65504.0)
                        for i in range(4)}},
}
CHILDREN = {"": ("aipp_op",), "aipp_op": ("input_para", "crop_func", "swap_func", "resize_func",
                                          "csc_func", "dtc_func", "rotation_func",
                                          "padding_func"),
            "input_para": ("shape",)}
# The reference spells the rotation block three ways and its angle two ways.
BLOCK_ALIASES = {"rotate_para": "rotation_func", "rotate_func": "rotation_func"}
FIELD_ALIASES = {"rotate_angle": "rotation_angle"}
FUNCS = ("crop", "swap", "resize", "csc", "dtc", "rotation", "padding")

_TOKEN = re.compile(r'\s*(?:(#.*)|([{}:])|("(?:[^"\\]|\\.)*")|([A-Za-z0-9_.+\-]+)|(\S))')


class _Entry:
    __slots__ = ("key", "line", "value", "children")

    def __init__(self, key, line, value=None, children=None):
        self.key, self.line, self.value, self.children = key, line, value, children


def _tokens(text: str, file):
    for ln, line in enumerate(text.splitlines(), 1):
        pos = 0
        while pos < len(line):
            m = _TOKEN.match(line, pos)
            if not m or m.end() == pos:
                break
            pos = m.end()
            comment, punct, string, word, other = m.groups()
            if comment is not None:
                break
            if other is not None:
                raise DoptError(f"unexpected character {other!r} in the AIPP config", file=file,
                                field=f"line {ln}", expected="'name: value', 'name {' or '}'")
            if punct or string or word:
                yield ln, (punct or string or word), bool(string)


def _tree(text: str, file) -> list:
    """Tokens -> nested ``_Entry`` lists; syntax errors name the line."""
    root: list = []
    stack: list = [(root, "", 0)]
    toks = list(_tokens(text, file))
    i = 0
    while i < len(toks):
        ln, tok, quoted = toks[i]
        if tok == "}" and not quoted:
            if len(stack) == 1:
                raise DoptError("'}' without a matching block", file=file, field=f"line {ln}",
                                hint="remove the extra '}'")
            stack.pop()
            i += 1
            continue
        if quoted or tok in "{:":
            raise DoptError(f"expected a field or block name, found {tok!r}", file=file,
                            field=f"line {ln}", expected="'name: value' or 'name {'")
        key = tok
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if nxt and nxt[1] == ":" and not nxt[2]:
            val = toks[i + 2] if i + 2 < len(toks) else None
            if val is not None and val[1] == "{" and not val[2]:
                nxt, i = val, i + 1          # 'name: {' is also protobuf text
            else:
                if val is None or (not val[2] and val[1] in "{}:"):
                    raise DoptError(f"field '{key}' has no value", file=file, field=f"line {ln}",
                                    expected=f"'{key}: <value>'")
                stack[-1][0].append(_Entry(key, ln, (val[1], val[2])))
                i += 3
                continue
        if nxt and nxt[1] == "{" and not nxt[2]:
            if len(stack) > MAX_DEPTH:
                raise DoptError("blocks nested too deeply", file=file, field=f"line {ln}",
                                expected=f"at most {MAX_DEPTH} levels (aipp_op > input_para > "
                                         f"shape)")
            e = _Entry(key, ln, children=[])
            stack[-1][0].append(e)
            stack.append((e.children, key, ln))
            i += 2
            continue
        raise DoptError(f"'{key}' is followed by neither ':' nor '{{'", file=file,
                        field=f"line {ln}", expected=f"'{key}: <value>' or '{key} {{ ... }}'")
    if len(stack) > 1:
        _, key, ln = stack[-1]
        raise DoptError(f"block '{key}' opened on line {ln} is never closed", file=file,
                        field=f"line {ln}", hint="add the missing '}'")
    return root


def _value(raw, quoted, kind, lo, hi, *, where, file, line):
    def bad(expected):
        return DoptError(f"field '{where}' has a value of the wrong kind", file=file,
                         field=f"line {line}: {where}", expected=expected, found=raw[:40])
    if kind == "str":
        if not quoted:
            raise bad('a quoted string, e.g. "data"')
        return raw[1:-1]
    if quoted:
        raw = raw[1:-1]
    if kind == "bool":
        if raw not in ("true", "false"):
            raise bad("true or false")
        return raw == "true"
    if kind == "enum":
        if raw not in lo:
            near = difflib.get_close_matches(raw, lo, 1)
            raise DoptError(f"field '{where}' has an unknown value", file=file,
                            field=f"line {line}: {where}", expected="one of " + ", ".join(lo),
                            found=repr(raw), hint=f"did you mean {near[0]}?" if near else None)
        return raw
    if kind in ("uint", "int"):
        if not re.fullmatch(r"[+-]?\d{1,12}", raw):
            raise bad("an integer")
        v = int(raw)
    else:
        try:
            v = float(raw)
        except ValueError:
            raise bad("a number") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise bad("a finite number")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise DoptError(f"field '{where}' is out of range", file=file,
                        field=f"line {line}: {where}", expected=f"a value in [{lo}, {hi}]",
                        found=str(v))
    return v


def _fields(entries, block: str, path: str, file) -> dict:
    """Scalar fields and child blocks of one block, typed; duplicates and unknowns refused."""
    out: dict = {"_line": {}}
    schema = SCHEMA.get(block, {})
    kids = CHILDREN.get(block, ())
    for e in entries:
        key = e.key
        if e.children is not None:
            key = BLOCK_ALIASES.get(key, key)
            if key not in kids:
                near = difflib.get_close_matches(key, list(kids) + list(BLOCK_ALIASES), 1)
                raise DoptError(f"unknown block '{e.key}' in {path or 'the file'}", file=file,
                                field=f"line {e.line}", expected="one of " + ", ".join(kids)
                                if kids else "no block here",
                                hint=f"did you mean '{near[0]}'?" if near else None)
            if key == "aipp_op":
                out.setdefault("aipp_op", []).append(e)
                continue
            if key in out:
                raise DoptError(f"block '{key}' given twice in {path}", file=file,
                                field=f"line {e.line}", hint="merge the two blocks")
            out[key] = _fields(e.children, key, f"{path}.{key}", file)
            out["_line"][key] = e.line
            continue
        key = FIELD_ALIASES.get(key, key)
        if key not in schema:
            near = difflib.get_close_matches(key, list(schema) + list(FIELD_ALIASES), 1)
            raise DoptError(f"unknown field '{e.key}' in {path or 'the file'}", file=file,
                            field=f"line {e.line}",
                            expected=("one of " + ", ".join(schema)) if schema else
                            "only aipp_op blocks at the top level",
                            hint=f"did you mean '{near[0]}'?" if near else None)
        if key in out:
            raise DoptError(f"field '{key}' given twice in {path}", file=file,
                            field=f"line {e.line}", hint="keep one")
        kind, lo, hi = schema[key]
        out[key] = _value(e.value[0], e.value[1], kind, lo, hi, where=f"{path}.{key}",
                          file=file, line=e.line)
        out["_line"][key] = e.line
    return out


class _Ctx:
    def __init__(self, file, path, lines):
        self.file, self.path, self.lines = file, path, lines

    def err(self, what, field, *, block=None, expected=None, found=None, hint=None):
        line = self.lines.get(block, {}).get(field) or self.lines.get(block, {}).get("_block") \
            or self.lines.get("", {}).get("_block")
        where = f"{self.path}.{block}.{field}" if block else f"{self.path}.{field}"
        return DoptError(what, file=self.file, field=f"line {line}: {where}" if line else where,
                         expected=expected, found=found, hint=hint)


def _op_spec(e: _Entry, idx: int, file) -> dict:
    path = f"aipp_op[{idx}]"
    f = _fields(e.children, "aipp_op", path, file)
    para = f.get("input_para", {"_line": {}})
    shape = para.get("shape", {"_line": {}})
    lines = {"": {**f["_line"], "_block": e.line}, "input_para": para["_line"],
             "shape": shape["_line"]}
    for fn in FUNCS:
        blk = f.get(f"{fn}_func", {"_line": {}})
        lines[fn] = {**blk["_line"], "_block": f["_line"].get(f"{fn}_func")}
    c = _Ctx(file, path, lines)
    spec = {"line": e.line, "input_name": f.get("input_name"),
            "related_input_rank": f.get("related_input_rank"),
            "node_after_aipp": f.get("node_after_aipp"),
            "input_edge_idx": f.get("input_edge_idx"),
            "format": para.get("format"),
            "src_image_size_w": shape.get("src_image_size_w", 0),
            "src_image_size_h": shape.get("src_image_size_h", 0),
            "max_src_image_size": para.get("max_src_image_size", 0)}
    for fn in FUNCS:
        blk = {k: v for k, v in f.get(f"{fn}_func", {}).items() if k != "_line"}
        if fn == "swap":
            blk["switch"] = bool(blk.get("rbuv_swap_switch") or blk.get("ax_swap_switch"))
        blk.setdefault("switch", False)
        blk.setdefault("dynamic", False)
        spec[fn] = blk
    _check_op(spec, c)
    spec["lines"] = {k: v for k, v in lines.items() if k}
    return spec


def is_dynamic(spec: dict) -> bool:
    """The reference's rule: any ``dynamic: true``, or no sub-function switched on."""
    funcs = [spec[fn] for fn in FUNCS]
    return any(b["dynamic"] for b in funcs) or not any(b["switch"] for b in funcs)


def _check_op(s: dict, c: _Ctx) -> None:
    dyn = is_dynamic(s)
    s["mode"] = "dynamic" if dyn else "static"
    fmt, w, h = s["format"], s["src_image_size_w"], s["src_image_size_h"]
    if s["related_input_rank"] is not None and s["related_input_rank"] > 64:
        raise c.err("related_input_rank is larger than any model's input count",
                    "related_input_rank", expected="a small input index, e.g. 0")
    if fmt in YUV_FORMATS and fmt != "YUV400_U8":
        for k, v in (("src_image_size_w", w), ("src_image_size_h", h)):
            if v % 2:
                raise c.err(f"{fmt} images need an even {k}", k, block="shape",
                            expected="an even number (YUV formats other than YUV400 share "
                                     "chroma between pixel pairs)", found=str(v))
    if not dyn:
        if fmt is None:
            raise c.err("a static AIPP needs the input image format", "format",
                        block="input_para", expected="input_para { format: ... } with one of "
                        + ", ".join(FORMATS))
        if not (w and h):
            raise c.err("a static AIPP needs the input image size", "src_image_size_w",
                        block="shape", expected="input_para { shape { src_image_size_w: W "
                        "src_image_size_h: H } } with W, H in [1, 4096]")
    elif not (w and h) and not s["max_src_image_size"]:
        raise c.err("a dynamic AIPP without the image size needs max_src_image_size",
                    "max_src_image_size", block="input_para",
                    expected="input_para { max_src_image_size: <bytes of the largest frame> }, "
                    "or shape { src_image_size_w ... src_image_size_h ... }")
    cr = s["crop"]
    if cr["switch"]:
        cw, ch = cr.get("crop_size_w", 0), cr.get("crop_size_h", 0)
        if not (cw and ch):
            raise c.err("crop is switched on without a crop size", "crop_size_w", block="crop",
                        expected="crop_size_w and crop_size_h of at least 1")
        x0, y0 = cr.get("load_start_pos_w", 0), cr.get("load_start_pos_h", 0)
        if w and h and (x0 + cw > w or y0 + ch > h):
            raise c.err("the crop window leaves the image", "crop_size_w", block="crop",
                        expected=f"load_start_pos + crop_size inside {w}x{h}",
                        found=f"x {x0}..{x0 + cw}, y {y0}..{y0 + ch}",
                        hint="shrink the crop or move its start")
    sw = s["swap"]
    for key, allowed, kind in (("ax_swap_switch", AX_SWAP_FORMATS, "AX swap"),
                               ("rbuv_swap_switch", UV_SWAP_FORMATS + RB_SWAP_FORMATS,
                                "RB/UV swap")):
        if sw.get(key) and fmt and fmt not in allowed:
            raise c.err(f"{kind} is not available for {fmt}", key, block="swap",
                        expected="a format among " + ", ".join(allowed),
                        hint=f"switch {key} off or change input_para.format")
    cs = s["csc"]
    if cs["switch"]:
        matrix = any(k.startswith("matrix_") for k in cs)
        if fmt and fmt not in CSC_FROM_YUV + CSC_FROM_RGB:
            raise c.err(f"colour-space conversion is not available from {fmt}", "switch",
                        block="csc", expected="an input format among "
                        + ", ".join(CSC_FROM_YUV + CSC_FROM_RGB),
                        hint="switch csc_func off")
        out = cs.get("output_format")
        if out and fmt:
            ok = CSC_TO_RGB if fmt in CSC_FROM_YUV else CSC_TO_YUV
            if out not in ok:
                raise c.err(f"colour-space conversion from {fmt} to {out} is not available",
                            "output_format", block="csc", expected="one of " + ", ".join(ok))
        if not cs["dynamic"] and not matrix:
            raise c.err("a static csc_func needs its matrix", "matrix_r0c0", block="csc",
                        expected="matrix_r0c0 ... matrix_r2c2 (Q8 integers, 256 = 1.0)")
        if cs["dynamic"] and not matrix and not out:
            raise c.err("a dynamic csc_func needs output_format (and color_space)",
                        "output_format", block="csc", expected="output_format: RGB888_U8 or "
                        "another of " + ", ".join(CSC_TO_RGB + CSC_TO_YUV))
        if matrix and not any(cs.get(f"matrix_r{r}c{k}", 0) for r in range(3)
                              for k in range(3)):
            raise c.err("the csc matrix is all zeros", "matrix_r0c0", block="csc",
                        hint="give the Q8 matrix, e.g. the JPEG one in docs/omg.md")
    rs = s["resize"]
    if rs["switch"]:
        for k in ("resize_output_w", "resize_output_h"):
            v = rs.get(k, 0)
            if not RESIZE_MIN <= v <= RESIZE_MAX:
                raise c.err("resize output out of range", k, block="resize",
                            expected=f"{RESIZE_MIN} to {RESIZE_MAX}", found=str(v))
    ro = s["rotation"]
    ang = ro.get("rotation_angle", 0.0)
    if ang not in ROTATIONS:
        raise c.err("rotation angle not supported", "rotation_angle", block="rotation",
                    expected="0, 90, 180 or 270", found=str(ang))
    ro["rotation_angle"] = int(ang)
    if ro["switch"] and ang and dyn:
        raise c.err("rotation is supported only in a static AIPP model (the reference: "
                    "dynamic and mixed configurations cannot rotate)", "rotation_angle",
                    block="rotation", hint="drop the rotation, or make every sub-function "
                    "static")
    pd = s["padding"]
    for side in ("left", "right", "top", "bottom"):
        k = f"{side}_padding_size"
        v = pd.get(k, 0)
        if v > PAD_MAX:
            raise c.err("padding too large", k, block="padding", expected=f"at most {PAD_MAX}",
                        found=str(v))
        if pd["switch"] and pd["dynamic"] and v:
            raise c.err("a dynamic padding_func must give its sizes as 0 (the sizes are set at "
                        "run time, and the crop/resize output is the model's input shape)", k,
                        block="padding", expected="0", found=str(v))


def parse_text(text: str, *, file: str | None = None) -> list[dict]:
    """Every ``aipp_op`` of the file as a checked spec (see the module docstring)."""
    if len(text) > MAX_BYTES:
        raise DoptError("AIPP config too large", file=file, expected=f"at most {MAX_BYTES} bytes")
    top = _fields(_tree(text, file), "", "", file)
    ops = top.get("aipp_op", [])
    if not ops:
        raise DoptError("the AIPP config has no aipp_op block", file=file, field="aipp_op",
                        expected="aipp_op { input_para { ... } ... }")
    if len(ops) > MAX_OPS:
        raise DoptError("too many aipp_op blocks", file=file, field="aipp_op",
                        expected=f"at most {MAX_OPS}", found=str(len(ops)))
    return [_op_spec(e, i, file) for i, e in enumerate(ops)]


def parse_file(path: str) -> list[dict]:
    p = existing_file(path, field="--insert_op_conf", max_bytes=MAX_BYTES, what="AIPP config")
    try:
        text = p.read_text("utf-8")
    except UnicodeDecodeError as e:
        raise DoptError(f"the AIPP config is not UTF-8 text ({e.reason} at byte {e.start})",
                        file=path) from None
    return parse_text(text, file=path)
