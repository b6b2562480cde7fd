"""Stage 3's quantization parameter file: layout, writer helpers and the checker.

``quant_params.json`` indexes every quantized layer; the arrays live beside it in
``quant_params.npz`` (read with ``allow_pickle=False``) and, unless ``embedding_in_omc``, the
embedding table in ``embedding.bin``. Per layer: the weight's integer codes (two 4-bit codes
per byte, low nibble first, for ``bit <= 4``), per-(row, group) ``scale``/``zero`` or, with
``lut_mode``, the per-group lookup table ``[rows, groups, 2**bit]``, the explicit column
``group_bounds`` (the last group is shorter when the group size does not divide the row),
and the INT16 input scale. A tied lm_head carries ``tied_to`` instead of arrays.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..quant import lowbit
from ..errors import DoptError
from .fileio import existing_file

FORMAT = "dopt-llm-quant-params"
VERSION = 1
EMBED_MAGIC = b"DOPTEMB1"
MAX_JSON_BYTES = 256 << 20
MAX_ARRAY_BYTES = 16 << 30


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    q = np.asarray(q, dtype=np.uint8)
    if bits > 4:
        return q
    if q.shape[1] % 2:
        q = np.pad(q, ((0, 0), (0, 1)))
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)


def unpack_codes(p: np.ndarray, bits: int, cols: int) -> np.ndarray:
    p = np.asarray(p, dtype=np.uint8)
    if bits > 4:
        return p
    out = np.empty((p.shape[0], p.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2] = p & 0x0F
    out[:, 1::2] = p >> 4
    return out[:, :cols]


def embedding_bin(codes: np.ndarray, tables: dict, bits: int) -> tuple[bytes, dict]:
    """``embedding.bin`` bytes and its layout: magic, header, then each array raw (C order)."""
    rows, cols = codes.shape
    packed = pack_codes(codes, bits)
    parts, layout, offset = [], {}, len(EMBED_MAGIC) + 16
    for name, arr in [("codes", packed)] + list(tables.items()):
        arr = np.ascontiguousarray(arr)
        layout[name] = {"offset": offset, "dtype": arr.dtype.str, "shape": list(arr.shape)}
        parts.append(arr.tobytes())
        offset += arr.nbytes
    header = EMBED_MAGIC + struct.pack("<IIII", rows, cols, bits, len(layout))
    return header + b"".join(parts), layout


def _read_bin_array(path: Path, blob: bytes, name: str, spec: dict) -> np.ndarray:
    try:
        dtype = np.dtype(spec["dtype"])
        shape = tuple(int(s) for s in spec["shape"])
        offset = int(spec["offset"])
    except (KeyError, TypeError, ValueError):
        raise DoptError("the embedding layout is malformed", file=str(path), field=name) from None
    if dtype.kind not in "uif" or any(s < 0 for s in shape):
        raise DoptError("the embedding layout has a bad dtype or shape", file=str(path),
                        field=name, found=f"{dtype} {shape}")
    size = int(np.prod(shape)) * dtype.itemsize
    if offset < 0 or offset + size > len(blob):
        raise DoptError("the embedding file is shorter than its layout says", file=str(path),
                        field=name, expected=f"{offset + size} bytes", found=f"{len(blob)}")
    return np.frombuffer(blob, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)


def _fail(path, field, what, **kw):
    return DoptError(what, file=str(path), field=field, **kw)


def load_quant_params(json_path) -> dict:
    """Read and check the parameter file; return ``{layer: {"w": dequantized weight, ...}}``.

    Every length comes from the file and is checked against the arrays before use.
    """
    p = existing_file(json_path, field="quant_params", max_bytes=MAX_JSON_BYTES,
                      what="quantization parameter file")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(p, None, "the parameter file is not valid JSON", found=str(e)) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _fail(p, "format", "not a dopt LLM parameter file", expected=repr(FORMAT))
    if doc.get("version") != VERSION:
        raise _fail(p, "version", "unsupported parameter file version",
                    expected=str(VERSION), found=repr(doc.get("version")))
    arrays_path = p.parent / str(doc.get("arrays", ""))
    existing_file(arrays_path, field="arrays", max_bytes=MAX_ARRAY_BYTES, what="array file")
    with np.load(arrays_path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    emb_arrays = {}
    if doc.get("embedding_file"):
        ep = existing_file(p.parent / doc["embedding_file"]["file"], field="embedding_file",
                           max_bytes=MAX_ARRAY_BYTES, what="embedding file")
        blob = ep.read_bytes()
        if blob[:len(EMBED_MAGIC)] != EMBED_MAGIC:
            raise _fail(ep, "magic", "not a dopt embedding file", expected=repr(EMBED_MAGIC))
        emb_arrays = {k: _read_bin_array(ep, blob, k, v)
                      for k, v in doc["embedding_file"]["layout"].items()}
    lut_mode = bool(doc.get("lut_mode"))
    layers = doc.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise _fail(p, "layers", "the parameter file lists no layers")
    out = {}
    for name, rec in layers.items():
        if "tied_to" in rec:
            if rec["tied_to"] not in layers:
                raise _fail(p, f"layers.{name}.tied_to", "tied to a layer that is not listed")
            continue
        src = emb_arrays if rec.get("in_embedding_file") else arrays
        out[name] = _check_layer(p, name, rec, src, lut_mode)
    for name, rec in layers.items():
        if "tied_to" in rec:
            out[name] = dict(out[rec["tied_to"]], input=rec.get("input"), tied_to=rec["tied_to"])
    return out


def _get(p, src, name, key):
    key = key.lstrip(".")  # the embedding file's arrays carry no layer prefix
    if key not in src:
        raise _fail(p, f"layers.{name}", f"array '{key}' is missing")
    return src[key]


def _check_layer(p, name, rec, src, lut_mode):
    w = rec.get("weight", {})
    try:
        rows, cols = (int(v) for v in rec["shape"])
        bits = int(w["bit"])
        bounds = [tuple(int(v) for v in b) for b in w["group_bounds"]]
    except (KeyError, TypeError, ValueError):
        raise _fail(p, f"layers.{name}", "a layer record lacks shape / weight.bit / "
                    "weight.group_bounds") from None
    if bits not in lowbit.WEIGHT_BITS:
        raise _fail(p, f"layers.{name}.weight.bit", "unsupported bit width", found=str(bits))
    if bounds != lowbit.group_bounds(cols, int(w.get("group_size", -1))):
        raise _fail(p, f"layers.{name}.weight.group_bounds", "group bounds do not match "
                    "group_size and the row length", found=str(bounds[-2:]))
    key = rec.get("prefix", name)
    codes = unpack_codes(_get(p, src, name, f"{key}.codes"), bits, cols)
    if codes.shape != (rows, cols):
        raise _fail(p, f"layers.{name}", "the code array has the wrong shape",
                    expected=str((rows, cols)), found=str(codes.shape))
    if int(codes.max(initial=0)) > lowbit.qmax(bits):
        raise _fail(p, f"layers.{name}", "codes exceed the bit width")
    G = len(bounds)
    if lut_mode:
        table = _get(p, src, name, f"{key}.lut")
        if table.shape != (rows, G, lowbit.qmax(bits) + 1):
            raise _fail(p, f"layers.{name}.lut", "the lookup table has the wrong shape",
                        expected=str((rows, G, lowbit.qmax(bits) + 1)), found=str(table.shape))
        if not np.all(np.diff(table, axis=2) > 0):
            raise _fail(p, f"layers.{name}.lut", "lookup table entries must increase with the code")
        col_group = np.repeat(np.arange(G), [b - a for a, b in bounds])
        deq = table[np.arange(rows)[:, None], col_group[None, :], codes]
    else:
        scale = _get(p, src, name, f"{key}.scale")
        zero = _get(p, src, name, f"{key}.zero")
        if scale.shape != (rows, G) or zero.shape != (rows, G):
            raise _fail(p, f"layers.{name}", "scale/zero have the wrong shape",
                        expected=str((rows, G)), found=f"{scale.shape} / {zero.shape}")
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise _fail(p, f"layers.{name}.scale", "scales must be finite and positive")
        if int(zero.min()) < 0 or int(zero.max()) > lowbit.qmax(bits):
            raise _fail(p, f"layers.{name}.zero", "zero points outside the code range")
        deq = lowbit.dequantize_weight(codes, scale, zero, int(w.get("group_size", -1)))
    inp = rec.get("input")
    if inp is not None:
        if not (isinstance(inp.get("scale"), (int, float)) and inp["scale"] > 0):
            raise _fail(p, f"layers.{name}.input.scale", "the input scale must be positive")
    return {"w": deq.astype(np.float32), "input": inp, "bits": bits}
