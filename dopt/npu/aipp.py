"""AIPP numerics, written once: raw UINT8 frames -> the model's FP16 input.

The order is the reference's chapter order: decode -> crop -> channel swap -> CSC ->
resize -> DTC -> rotation -> padding; ``docs/numerics.md`` ("AIPP") states every step
with golden vectors. Integer steps stay integer (CSC is the Q8 matrix with
``(acc + 128) >> 8``); the first float step is DTC, whose result is rounded to FP16.

A *spec* is one ``aipp_op`` as ``dopt.npu.aipp_config`` checked it; *params* are the
run-time values of its dynamic sub-functions (``resolve``).
"""
from __future__ import annotations

import numpy as np

from ..errors import DoptError
from .aipp_config import (AX_SWAP_FORMATS, COLOR_SPACES, CSC_FROM_RGB, CSC_FROM_YUV,
                          CSC_TO_RGB, CSC_TO_YUV, FORMATS, FUNCS, MAX_SRC, PAD_MAX,
                          RB_SWAP_FORMATS, RESIZE_MAX, RESIZE_MIN, ROTATIONS, SCHEMA,
                          UV_SWAP_FORMATS)

# Kr, Kb of each standard; "wide" is full range (0..255), "narrow" studio range (16..235).
_KRB = {"601": (0.299, 0.114), "709": (0.2126, 0.0722)}
_SPACE = {"JPEG": ("601", False), "BT_601_WIDE": ("601", False),
          "BT_601_NARROW": ("601", True), "BT_709_WIDE": ("709", False),
          "BT_709_NARROW": ("709", True)}


def csc_float(color_space: str, output_format: str):
    """The float formula of a preset: ``(matrix 3x3, input bias, output bias)`` with
    ``out = matrix @ (in - input_bias) + output_bias``; rows in ``output_format`` order."""
    kr, kb = _KRB[_SPACE[color_space][0]]
    narrow = _SPACE[color_space][1]
    kg = 1.0 - kr - kb
    ys, cs = (255 / 219, 255 / 224) if narrow else (1.0, 1.0)
    to_rgb = np.array([[ys, 0.0, 2 * (1 - kr) * cs],
                       [ys, -2 * kb * (1 - kb) / kg * cs, -2 * kr * (1 - kr) / kg * cs],
                       [ys, 2 * (1 - kb) * cs, 0.0]])
    if output_format in CSC_TO_RGB:
        m = to_rgb if output_format == "RGB888_U8" else to_rgb[::-1]
        return m, np.array([16.0 if narrow else 0.0, 128.0, 128.0]), np.zeros(3)
    m = np.linalg.inv(to_rgb)              # RGB -> (Y, U, V) around the biases
    ob = np.array([16.0 if narrow else 0.0, 128.0, 128.0])
    if output_format == "YVU444SP_U8":
        m, ob = m[[0, 2, 1]], ob[[0, 2, 1]]
    elif output_format == "YUV400_U8":
        m, ob = m[:1], ob[:1]
    return m, np.zeros(3), ob


def csc_preset(color_space: str, output_format: str):
    """The Q8 integer form of a preset (``round(256 * matrix)``, integer biases)."""
    m, ib, ob = csc_float(color_space, output_format)
    return (np.rint(m * 256).astype(np.int64), np.rint(ib).astype(np.int64),
            np.rint(ob).astype(np.int64))


def csc(x: np.ndarray, matrix, in_bias, out_bias) -> np.ndarray:
    """``clip(((M @ (x - ib)) + 128) >> 8 + ob, 0, 255)`` per pixel; x (..., 3) uint8."""
    m = np.asarray(matrix, np.int64)
    d = x.astype(np.int64) - np.asarray(in_bias, np.int64)
    acc = np.einsum("...j,rj->...r", d, m)
    out = ((acc + 128) >> 8) + np.asarray(out_bias, np.int64)[: m.shape[0]]
    return np.clip(out, 0, 255).astype(np.uint8)


def frame_bytes(fmt: str, w: int, h: int) -> int:
    """Bytes of one ``w x h`` frame in ``fmt``."""
    per = {"YUV420SP_U8": 1.5, "YUV422SP_U8": 2, "YUYV_U8": 2, "YUV400_U8": 1,
           "RGB888_U8": 3}.get(fmt, 4)
    return int(w * h * per)


def raw_shape(fmt: str, w: int, h: int) -> list[int]:
    """Per-sample shape of a raw frame (after the batch dimension): rows, columns, bytes."""
    return {"YUV420SP_U8": [h * 3 // 2, w, 1], "YUV422SP_U8": [h * 2, w, 1],
            "YUYV_U8": [h, w, 2], "YUV400_U8": [h, w, 1], "RGB888_U8": [h, w, 3]}.get(
                fmt, [h, w, 4])


def decode(raw: np.ndarray, fmt: str, w: int, h: int) -> np.ndarray:
    """``(N, ...)`` uint8 frames -> ``(N, h, w, C)``: YUV formats as Y, U, V with chroma
    repeated over the pixels that share it; 4-byte formats keep A/X as channel 0."""
    n = raw.shape[0]
    b = np.ascontiguousarray(raw, np.uint8).reshape(n, -1)
    if fmt == "YUV420SP_U8":
        y = b[:, : h * w].reshape(n, h, w)
        uv = b[:, h * w:].reshape(n, h // 2, w // 2, 2).repeat(2, 1).repeat(2, 2)
        return np.concatenate([y[..., None], uv], axis=-1)
    if fmt == "YUV422SP_U8":
        y = b[:, : h * w].reshape(n, h, w)
        uv = b[:, h * w:].reshape(n, h, w // 2, 2).repeat(2, 2)
        return np.concatenate([y[..., None], uv], axis=-1)
    if fmt == "YUYV_U8":
        p = b.reshape(n, h, w // 2, 4)     # Y0 U Y1 V
        y = p[..., [0, 2]].reshape(n, h, w)
        uv = p[..., [1, 3]].repeat(2, 2)
        return np.concatenate([y[..., None], uv], axis=-1)
    c = {"YUV400_U8": 1, "RGB888_U8": 3}.get(fmt, 4)
    return b.reshape(n, h, w, c)


def bilinear(x: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """Bilinear resize of ``(N, H, W, C)`` uint8, half-pixel centres (``src = (d + 0.5)
    * in / out - 0.5``, clamped at the edges), float32 weights, round half to even."""
    n, h, w, c = x.shape
    if (h, w) == (oh, ow):
        return x

    def axis(o, i):
        s = ((np.arange(o, dtype=np.float32) + np.float32(0.5)) * np.float32(i / o)
             - np.float32(0.5))
        s = np.clip(s, 0, i - 1).astype(np.float32)
        lo = np.floor(s).astype(np.int64)
        hi = np.minimum(lo + 1, i - 1)
        return lo, hi, (s - lo).astype(np.float32)
    y0, y1, fy = axis(oh, h)
    x0, x1, fx = axis(ow, w)
    a = x.astype(np.float32)
    top = a[:, y0] * (1 - fy)[None, :, None, None] + a[:, y1] * fy[None, :, None, None]
    out = top[:, :, x0] * (1 - fx)[None, None, :, None] + top[:, :, x1] * fx[None, None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def channels_of(spec: dict, fmt: str | None = None) -> int:
    """Channels AIPP produces before the model's own layout choice (A/X may be dropped)."""
    fmt = fmt or spec["format"]
    cs = spec["csc"]
    if cs["switch"]:
        out = cs.get("output_format")
        if out == "YUV400_U8":
            return 1
        if out or any(k.startswith("matrix_") for k in cs):
            return 3
    if fmt is None:
        return 3
    return {"YUV400_U8": 1, "RGB888_U8": 3, "YUV420SP_U8": 3, "YUV422SP_U8": 3,
            "YUYV_U8": 3}.get(fmt, 4)


def output_hw(spec: dict) -> tuple[int, int]:
    """The compiled output height and width (dynamic sizes at their configured maxima)."""
    h, w = spec["src_image_size_h"], spec["src_image_size_w"]
    if spec["crop"]["switch"]:
        h, w = spec["crop"]["crop_size_h"], spec["crop"]["crop_size_w"]
    if spec["resize"]["switch"]:
        h, w = spec["resize"]["resize_output_h"], spec["resize"]["resize_output_w"]
    ro = spec["rotation"]
    if ro["switch"] and ro["rotation_angle"] in (90, 270):
        h, w = w, h
    pd = spec["padding"]
    if pd["switch"]:
        h += pd.get("top_padding_size", 0) + pd.get("bottom_padding_size", 0)
        w += pd.get("left_padding_size", 0) + pd.get("right_padding_size", 0)
    return h, w


# -- run-time parameters of dynamic sub-functions -----------------------------------------
_FIELD_FUNC = {k: fn for fn in FUNCS for k in SCHEMA[f"{fn}_func"] if k not in
               ("switch", "dynamic")}


def resolve(spec: dict, params: dict | None, *, what: str = "aipp") -> dict:
    """The spec with the run-time values of its dynamic sub-functions, checked against
    the compiled maxima. Keys are the config's field names (``crop_size_w``, ``color_space``,
    ``mean_chn_0``, ...) plus ``format``/``src_image_size_w``/``src_image_size_h`` for a
    dynamic model; a sub-function's ``switch`` is ``<func>_switch`` (``crop_switch``)."""
    params = dict(params or {})
    s = {k: (dict(v) if isinstance(v, dict) else v) for k, v in spec.items()}
    dyn = spec.get("mode") == "dynamic"

    def bad(msg, key, expected=None, found=None, hint=None):
        return DoptError(msg, field=f"{what}.{key}", expected=expected, found=found,
                         hint=hint or "see the AIPP section of docs/omg.md for the run-time "
                                      "fields")
    for key, v in params.items():
        if key in ("format", "src_image_size_w", "src_image_size_h"):
            if not dyn:
                raise bad("this model's AIPP is static: its input format and size are fixed",
                          key)
            if key == "format":
                if spec["format"] and v != spec["format"]:
                    raise bad("the input format was fixed at compile time", key,
                              expected=spec["format"], found=repr(v))
                if v not in FORMATS:
                    raise bad("unknown input format", key, expected=", ".join(FORMATS),
                              found=repr(v))
            elif not (isinstance(v, int) and 1 <= v <= MAX_SRC):
                raise bad("image size out of range", key, expected="1 to 4096", found=repr(v))
            s[key] = v
            continue
        fn = key[: -len("_switch")] if key.endswith("_switch") and key[:-7] in FUNCS else None
        fn = fn or _FIELD_FUNC.get(key)
        if fn is None:
            raise bad(f"unknown AIPP run-time field '{key}'", key,
                      expected="a field of a dynamic sub-function, e.g. crop_size_w")
        if not spec[fn]["dynamic"]:
            raise bad(f"{fn}_func is static in this model: its parameters are baked in", key,
                      hint="recompile with dynamic: true in that block")
        if key == f"{fn}_switch":
            s[fn]["switch"] = bool(v)
            continue
        kind, lo, hi = SCHEMA[f"{fn}_func"][key]
        if kind == "bool":
            ok = isinstance(v, bool)
        elif kind == "enum":
            ok = v in lo
        elif kind in ("uint", "int"):
            ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool) and lo <= v <= hi
        else:
            ok = isinstance(v, (int, float, np.number)) and not isinstance(v, bool) \
                and np.isfinite(v) and (lo is None or lo <= v <= hi)
        if not ok:
            raise bad(f"run-time value of '{key}' is invalid", key,
                      expected={"bool": "true or false", "enum": f"one of {lo}"}.get(
                          kind, f"a number in [{lo}, {hi}]"), found=repr(v))
        if key == "output_format" and spec["csc"].get("output_format") not in (None, v):
            raise bad("output_format cannot change at run time", key,
                      expected=spec["csc"]["output_format"], found=repr(v))
        s[fn][key] = v
        if kind == "bool" and fn == "swap":
            s[fn]["switch"] = bool(s[fn].get("rbuv_swap_switch") or s[fn].get("ax_swap_switch"))
    _check_runtime(spec, s, bad)
    return s


def _check_runtime(spec, s, bad) -> None:
    fmt, w, h = s["format"], s["src_image_size_w"], s["src_image_size_h"]
    if not (fmt and w and h):
        raise bad("the input format and size of a dynamic AIPP must be given at run time",
                  "format", expected="aipp={'format': ..., 'src_image_size_w': W, "
                  "'src_image_size_h': H}")
    cap = spec["max_src_image_size"] or frame_bytes("ARGB8888_U8", spec["src_image_size_w"],
                                                    spec["src_image_size_h"])
    if frame_bytes(fmt, w, h) > cap:
        raise bad("the frame is larger than the compiled maximum", "src_image_size_w",
                  expected=f"at most {cap} bytes (max_src_image_size)",
                  found=f"{frame_bytes(fmt, w, h)} bytes ({fmt} {w}x{h})")
    if fmt in ("YUV420SP_U8", "YUV422SP_U8", "YUYV_U8", "AYUV444_U8") and (w % 2 or h % 2):
        raise bad(f"{fmt} frames need an even width and height", "src_image_size_w",
                  found=f"{w}x{h}")
    cr, mx = s["crop"], spec["crop"]
    if cr["switch"]:
        cw, ch = cr.get("crop_size_w", 0), cr.get("crop_size_h", 0)
        if cr["dynamic"] and (cw > mx.get("crop_size_w", 0) or ch > mx.get("crop_size_h", 0)):
            raise bad("crop size over the compiled maximum", "crop_size_w",
                      expected=f"at most {mx.get('crop_size_w')}x{mx.get('crop_size_h')}",
                      found=f"{cw}x{ch}")
        x0, y0 = cr.get("load_start_pos_w", 0), cr.get("load_start_pos_h", 0)
        if not (cw and ch) or x0 + cw > w or y0 + ch > h:
            raise bad("the crop window leaves the image", "crop_size_w",
                      expected=f"inside {w}x{h}", found=f"x {x0}..{x0 + cw}, y {y0}..{y0 + ch}")
    sw = s["swap"]
    if sw.get("ax_swap_switch") and fmt not in AX_SWAP_FORMATS:
        raise bad(f"AX swap is not available for {fmt}", "ax_swap_switch")
    if sw.get("rbuv_swap_switch") and fmt not in UV_SWAP_FORMATS + RB_SWAP_FORMATS:
        raise bad(f"RB/UV swap is not available for {fmt}", "rbuv_swap_switch")
    cs = s["csc"]
    if cs["switch"] and fmt not in CSC_FROM_YUV + CSC_FROM_RGB:
        raise bad(f"colour-space conversion is not available from {fmt}", "csc_switch")
    rs, mr = s["resize"], spec["resize"]
    if rs["switch"]:
        ow, oh = rs.get("resize_output_w", 0), rs.get("resize_output_h", 0)
        if not (RESIZE_MIN <= ow <= RESIZE_MAX and RESIZE_MIN <= oh <= RESIZE_MAX):
            raise bad("resize output out of range", "resize_output_w",
                      expected=f"{RESIZE_MIN} to {RESIZE_MAX}", found=f"{ow}x{oh}")
        if rs["dynamic"] and (ow > mr.get("resize_output_w", 0) or
                              oh > mr.get("resize_output_h", 0)):
            raise bad("resize output over the compiled maximum", "resize_output_w",
                      expected=f"at most {mr.get('resize_output_w')}x"
                               f"{mr.get('resize_output_h')}", found=f"{ow}x{oh}")
    for side in ("left", "right", "top", "bottom"):
        if s["padding"].get(f"{side}_padding_size", 0) > PAD_MAX:
            raise bad("padding too large", f"{side}_padding_size", expected=f"at most {PAD_MAX}")
    if s["rotation"].get("rotation_angle", 0) not in ROTATIONS:
        raise bad("rotation angle not supported", "rotation_angle")
    if output_hw(s) != output_hw(spec):
        raise bad("the run-time AIPP parameters give an output of another size than the "
                  "model's input", "resize_output_w", expected="%dx%d (h x w)" % output_hw(spec),
                  found="%dx%d" % output_hw(s),
                  hint="choose crop/resize/padding so the output matches the compiled shape")


# -- the pipeline ------------------------------------------------------------------------
def _csc_params(cs: dict, fmt: str):
    if any(k.startswith("matrix_") for k in cs):
        m = np.array([[cs.get(f"matrix_r{r}c{c}", 0) for c in range(3)] for r in range(3)])
        ib = np.array([cs.get(f"input_bias_{i}", 0) for i in range(3)])
        ob = np.array([cs.get(f"output_bias_{i}", 0) for i in range(3)])
        if cs.get("output_format") == "YUV400_U8":
            m, ob = m[:1], ob[:1]
        return m, ib, ob
    out = cs.get("output_format") or ("RGB888_U8" if fmt in CSC_FROM_YUV else "YUV444SP_U8")
    return csc_preset(cs.get("color_space") or "JPEG", out)


def run(spec: dict, raw: np.ndarray, channels: int, params: dict | None = None,
        *, layout: str = "NCHW") -> np.ndarray:
    """Raw ``(N, ...)`` uint8 frames -> the model input ``(N, C, H, W)`` (or NHWC), FP16."""
    s = resolve(spec, params) if spec.get("mode") == "dynamic" else spec
    fmt, w, h = s["format"], s["src_image_size_w"], s["src_image_size_h"]
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise DoptError("an AIPP input takes raw UINT8 frames", field="input",
                        expected="dtype uint8", found=str(raw.dtype))
    n = raw.shape[0] if raw.ndim else 0
    need = frame_bytes(fmt, w, h)
    if raw.ndim < 2 or raw[0].size != need:
        raise DoptError(f"raw frame has the wrong size for {fmt} {w}x{h}", field="input",
                        expected=f"(N, {', '.join(map(str, raw_shape(fmt, w, h)))}) uint8 = "
                                 f"{need} bytes per frame",
                        found=str(list(raw.shape)))
    x = decode(raw, fmt, w, h)
    if n and x.shape[-1] == 4:
        if s["swap"].get("ax_swap_switch"):       # A/X is the last byte of the frame
            x = x[..., [3, 0, 1, 2]]
    cr = s["crop"]
    if cr["switch"]:
        x0, y0 = cr.get("load_start_pos_w", 0), cr.get("load_start_pos_h", 0)
        x = x[:, y0:y0 + cr["crop_size_h"], x0:x0 + cr["crop_size_w"]]
    if s["swap"].get("rbuv_swap_switch"):          # R<->B, or U<->V (NV21, YVYU, ...)
        k = 1 if x.shape[-1] == 4 else 0
        order = list(range(x.shape[-1]))
        if fmt in RB_SWAP_FORMATS:
            order[k], order[k + 2] = order[k + 2], order[k]
        else:
            order[k + 1], order[k + 2] = order[k + 2], order[k + 1]
        x = x[..., order]
    alpha = None
    if x.shape[-1] == 4:
        alpha, x = x[..., :1], x[..., 1:]
    if s["csc"]["switch"]:
        x = csc(x, *_csc_params(s["csc"], fmt))
        alpha = None
    if alpha is not None and channels == 4:
        x = np.concatenate([alpha, x], axis=-1)
    if x.shape[-1] != channels:
        raise DoptError(f"AIPP produces {x.shape[-1]} channel(s) from {fmt}, the model's "
                        f"input has {channels}", field="format",
                        hint="pick an input format (or csc output_format) with the model's "
                             "channel count")
    rs = s["resize"]
    if rs["switch"]:
        x = bilinear(x, rs["resize_output_h"], rs["resize_output_w"])
    y = x.astype(np.float32)
    dt = s["dtc"]
    if dt["switch"]:
        c = y.shape[-1]
        mean = np.array([dt.get(f"mean_chn_{i}", 0) for i in range(c)], np.float32)
        mn = np.array([dt.get(f"min_chn_{i}", 0.0) for i in range(c)], np.float16)
        var = np.array([dt.get(f"var_reci_chn_{i}", 1.0) for i in range(c)], np.float16)
        y = (y - mean - mn.astype(np.float32)) * var.astype(np.float32)
    y = y.astype(np.float16)
    ro = s["rotation"]
    if ro["switch"] and ro["rotation_angle"]:
        y = np.rot90(y, k=-(ro["rotation_angle"] // 90), axes=(1, 2))   # clockwise
    pd = s["padding"]
    if pd["switch"]:
        t, b = pd.get("top_padding_size", 0), pd.get("bottom_padding_size", 0)
        lft, r = pd.get("left_padding_size", 0), pd.get("right_padding_size", 0)
        if t or b or lft or r:
            c = y.shape[-1]
            val = np.array([pd.get(f"padding_value_chn_{i}", 0.0) for i in range(c)],
                           np.float16)
            out = np.empty((y.shape[0], y.shape[1] + t + b, y.shape[2] + lft + r, c),
                           np.float16)
            out[...] = val
            out[:, t:t + y.shape[1], lft:lft + y.shape[2]] = y
            y = out
    if layout == "NCHW":
        y = y.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(y)


__all__ = ["COLOR_SPACES", "CSC_TO_YUV", "bilinear", "csc", "csc_float", "csc_preset",
           "decode", "frame_bytes", "output_hw", "raw_shape", "resolve", "run"]
