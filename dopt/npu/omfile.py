"""The ``.om`` container: versioned, checksummed, read without pickle or eval.

Layout (little-endian)::

    0   8 bytes  magic  b"DOPTOM\\x00\\x01"
    8   u32      format version (1)
    12  u32      flags (0)
    16  u64      manifest length M (UTF-8 JSON, at most 64 MiB)
    24  u64      payload length P
    32  32 bytes SHA-256 of manifest + payload
    64  M bytes  manifest: {"format_version", "profile": {name, version}, "graph": ...,
                 "quant": ..., "meta": ..., "tensors": [{"name", "dtype", "shape",
                 "offset", "nbytes"}]}
    64+M P bytes payload: tensor data, each tensor 64-byte aligned, C order

Every length read from a file is bounded before use; any inconsistency is a
``DoptError`` naming the file and the offset or field. ``to_json``/``from_json``
are the ``--mode 1`` round trip (tensor data base64-encoded).
"""
from __future__ import annotations

import base64
import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DoptError
from ..formats.fileio import DuplicateKeyError, atomic_path, reject_duplicate_keys

MAGIC = b"DOPTOM\x00\x01"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQQ32s")  # 64 bytes
ALIGN = 64
MAX_MANIFEST = 64 << 20
MAX_FILE = 8 << 30
MAX_TENSORS = 1 << 20
MAX_RANK = 8
MAX_GEARS = 16   # --dynamic_dims
DTYPES = {"float16": np.float16, "float32": np.float32, "int8": np.int8, "uint8": np.uint8,
          "int32": np.int32, "int64": np.int64, "bool": np.bool_,
          "float64": np.float64}


@dataclass
class OmModel:
    graph: dict
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    profile: dict = field(default_factory=dict)
    quant: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def _bad(path, what, *, field=None, expected=None, found=None):
    return DoptError(f"corrupt or unsupported .om file: {what}", file=str(path), field=field,
                     expected=expected, found=found,
                     hint="recompile the model with dopt omg; the file may be truncated or "
                          "tampered with")


def _tensor_bytes(a: np.ndarray) -> memoryview:
    """The tensor's bytes in C order, without a copy when it is contiguous already."""
    if a.ndim and a.size:
        return memoryview(np.ascontiguousarray(a)).cast("B")
    return memoryview(a.tobytes())   # 0-d or empty: small


def write_om(path, model: OmModel) -> None:
    """Written in one pass over the tensors, hashed in another, nothing concatenated: the
    weights are never held twice (a joined payload and the hash input each cost the model's
    size again)."""
    entries, offset = [], 0
    arrays = []
    for name, arr in model.tensors.items():
        a = np.asarray(arr, order="C")   # keeps 0-d (ascontiguousarray makes it 1-d)
        dt = str(a.dtype)
        if dt not in DTYPES:
            raise DoptError(f"tensor '{name}' has dtype {dt}, which .om files do not hold",
                            expected=", ".join(DTYPES))
        offset += (-offset) % ALIGN
        nbytes = a.size * a.itemsize
        entries.append({"name": name, "dtype": dt, "shape": list(a.shape), "offset": offset,
                        "nbytes": nbytes})
        arrays.append(a)
        offset += nbytes
    manifest = json.dumps({"format_version": FORMAT_VERSION, "profile": model.profile,
                           "graph": model.graph, "quant": model.quant, "meta": model.meta,
                           "tensors": entries}, ensure_ascii=False,
                          separators=(",", ":")).encode("utf-8")

    def payload():
        """``(bytes)`` chunks of the payload in order: padding, then each tensor."""
        at = 0
        for e, a in zip(entries, arrays):
            if e["offset"] > at:
                yield b"\x00" * (e["offset"] - at)
            yield _tensor_bytes(a)
            at = e["offset"] + e["nbytes"]
    h = hashlib.sha256(manifest)
    for chunk in payload():
        h.update(chunk)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(manifest), offset, h.digest()))
            f.write(manifest)
            for chunk in payload():
                f.write(chunk)


def read_om(path) -> OmModel:
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError:
        raise DoptError("the .om file does not exist", file=str(path)) from None
    if size < HEADER.size:
        raise _bad(path, "shorter than the 64-byte header", found=f"{size} bytes")
    if size > MAX_FILE:
        raise _bad(path, "file too large", expected=f"at most {MAX_FILE} bytes")
    with open(p, "rb") as f:
        magic, ver, flags, mlen, plen, digest = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise _bad(path, "not a dopt .om file (bad magic at offset 0)",
                       expected=repr(MAGIC), found=repr(magic))
        if ver != FORMAT_VERSION:
            raise _bad(path, "unsupported format version (offset 8)",
                       expected=str(FORMAT_VERSION), found=str(ver))
        if flags != 0:
            raise _bad(path, "unknown flags (offset 12)", found=str(flags))
        if mlen > MAX_MANIFEST or mlen > size - HEADER.size:
            raise _bad(path, "manifest length out of bounds (offset 16)", found=str(mlen))
        if plen != size - HEADER.size - mlen:
            raise _bad(path, "payload length does not match the file size (offset 24)",
                       expected=str(size - HEADER.size - mlen), found=str(plen))
        manifest_bytes = f.read(mlen)
        payload = bytearray(plen)          # the tensors are views into it: read once, no copy
        if f.readinto(payload) != plen:
            raise _bad(path, "truncated payload", found=f"{size} bytes")
    h = hashlib.sha256(manifest_bytes)
    h.update(payload)
    if h.digest() != digest:
        raise _bad(path, "checksum mismatch (offset 32): the file was modified or truncated")
    try:
        man = json.loads(manifest_bytes.decode("utf-8"), object_pairs_hook=reject_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, DuplicateKeyError) as e:
        raise _bad(path, f"manifest is not valid JSON ({e})", field="manifest") from None
    return _from_manifest(path, man, payload)


def _from_manifest(path, man, payload: bytes) -> OmModel:
    if not isinstance(man, dict) or man.get("format_version") != FORMAT_VERSION:
        raise _bad(path, "manifest has no supported format_version", field="format_version")
    for key, typ in (("graph", dict), ("profile", dict), ("quant", dict), ("meta", dict),
                     ("tensors", list)):
        if not isinstance(man.get(key), typ):
            raise _bad(path, f"manifest field '{key}' missing or of the wrong type", field=key,
                       expected=typ.__name__)
    entries = man["tensors"]
    if len(entries) > MAX_TENSORS:
        raise _bad(path, "too many tensors", field="tensors", found=str(len(entries)))
    tensors = {}
    for i, e in enumerate(entries):
        fld = f"tensors[{i}]"
        if not isinstance(e, dict):
            raise _bad(path, "tensor entry is not an object", field=fld)
        name, dt, shape = e.get("name"), e.get("dtype"), e.get("shape")
        off, nb = e.get("offset"), e.get("nbytes")
        if not isinstance(name, str) or name in tensors:
            raise _bad(path, "tensor name missing or repeated", field=f"{fld}.name",
                       found=repr(name))
        if dt not in DTYPES:
            raise _bad(path, f"tensor '{name}' has an unknown dtype", field=f"{fld}.dtype",
                       expected=", ".join(DTYPES), found=repr(dt))
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 1 << 40
                for d in shape):
            raise _bad(path, f"tensor '{name}' has a malformed shape", field=f"{fld}.shape",
                       found=repr(shape))
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (off, nb)):
            raise _bad(path, f"tensor '{name}' has a malformed offset/nbytes", field=fld)
        itemsize = np.dtype(DTYPES[dt]).itemsize
        count = 1
        for d in shape:
            count *= d
        if count * itemsize != nb or off + nb > len(payload):
            raise _bad(path, f"tensor '{name}' does not fit its shape or the payload",
                       field=fld, found=f"offset {off}, nbytes {nb}, shape {shape}, "
                       f"payload {len(payload)} bytes")
        tensors[name] = np.frombuffer(payload, DTYPES[dt], count, off).reshape(shape)
    return OmModel(man["graph"], tensors, man["profile"], man["quant"], man["meta"])


_KERNEL_KEYS = {"name": str, "op": (str, type(None)), "onnx_op": str, "device": str,
                "precision": str, "inputs": list, "outputs": list, "out_dtypes": list,
                "attrs": dict}
_ATTR_KINDS = ("float", "int", "str", "tensor", "floats", "ints", "strs")
MAX_KERNELS = 1 << 20


def check_graph(model: OmModel, path=None) -> None:
    """The compiled graph is well formed: every kernel reads only what exists before it.

    The checksum catches accidental damage; this catches a well-formed file whose graph
    was written by something else, before any engine trusts it.
    """
    g = model.graph
    def bad(what, fld):
        return _bad(path or "<memory>", what, field=fld)
    dyn = g.get("dynamic")
    if dyn is not None:
        gears = dyn.get("gears") if isinstance(dyn, dict) else None
        if not isinstance(gears, list) or not 1 <= len(gears) <= MAX_GEARS or not all(
                isinstance(x, dict) and isinstance(x.get("shapes"), dict)
                and isinstance(x.get("graph"), (dict, type(None))) for x in gears):
            raise bad(f"graph.dynamic must hold 1 to {MAX_GEARS} gears with their shapes",
                      "graph.dynamic")
        for i, x in enumerate(gears[1:], 1):
            if x["graph"] is None:
                raise bad(f"gear {i} has no graph", f"graph.dynamic.gears[{i}]")
            check_graph(OmModel({**x["graph"], "dynamic": None}, model.tensors), path)
    for key, typ in (("inputs", list), ("outputs", list), ("kernels", list), ("opset", int)):
        if not isinstance(g.get(key), typ):
            raise bad(f"graph.{key} missing or of the wrong type", f"graph.{key}")
    if len(g["kernels"]) > MAX_KERNELS:
        raise bad("too many kernels", "graph.kernels")
    known = set(model.tensors)
    for i, inp in enumerate(g["inputs"]):
        if not (isinstance(inp, dict) and isinstance(inp.get("name"), str)
                and isinstance(inp.get("shape"), list) and inp.get("dtype") in DTYPES):
            raise bad("graph input entry malformed", f"graph.inputs[{i}]")
        known.add(inp["name"])
    for i, k in enumerate(g["kernels"]):
        fld = f"graph.kernels[{i}]"
        if not isinstance(k, dict):
            raise bad("kernel entry is not an object", fld)
        for key, typ in _KERNEL_KEYS.items():
            if not isinstance(k.get(key), typ):
                raise bad(f"kernel field '{key}' missing or of the wrong type", f"{fld}.{key}")
        if k["device"] not in ("npu", "cpu"):
            raise bad(f"kernel '{k['name']}' has an unknown device", f"{fld}.device")
        if len(k["outputs"]) != len(k["out_dtypes"]) or not all(
                d in DTYPES for d in k["out_dtypes"]):
            raise bad(f"kernel '{k['name']}' has malformed output types", f"{fld}.out_dtypes")
        for t in k["inputs"]:
            if not isinstance(t, str) or (t and t not in known):
                raise bad(f"kernel '{k['name']}' reads '{t}', which nothing produces before it",
                          f"{fld}.inputs")
        for name, a in k["attrs"].items():
            if not isinstance(a, dict) or a.get("kind") not in _ATTR_KINDS or "value" not in a:
                raise bad(f"kernel '{k['name']}' has a malformed attribute '{name}'",
                          f"{fld}.attrs.{name}")
            if a["kind"] == "tensor" and a["value"] not in model.tensors:
                raise bad(f"kernel '{k['name']}' attribute '{name}' names a missing tensor",
                          f"{fld}.attrs.{name}")
        for t in k["outputs"]:
            if not isinstance(t, str):
                raise bad(f"kernel '{k['name']}' has a malformed output", f"{fld}.outputs")
            known.add(t)
    for i, o in enumerate(g["outputs"]):
        if not isinstance(o, dict) or o.get("name") not in known:
            raise bad("graph output is not produced by any kernel", f"graph.outputs[{i}]")


def to_json(model: OmModel) -> dict:
    """``--mode 1``: the whole model as JSON (tensors base64-encoded, exact)."""
    return {"format": "dopt.om.json", "format_version": FORMAT_VERSION,
            "profile": model.profile, "graph": model.graph, "quant": model.quant,
            "meta": model.meta,
            "tensors": {k: {"dtype": str(v.dtype), "shape": list(v.shape),
                            "data": base64.b64encode(np.asarray(v, order="C").tobytes())
                            .decode("ascii")} for k, v in model.tensors.items()}}


def from_json(doc: dict, *, file=None) -> OmModel:
    if not isinstance(doc, dict) or doc.get("format") != "dopt.om.json":
        raise DoptError("not a dopt .om JSON dump", file=file, field="format",
                        expected="'dopt.om.json'")
    tensors = {}
    for name, t in (doc.get("tensors") or {}).items():
        try:
            raw = base64.b64decode(t["data"], validate=True)
            arr = np.frombuffer(raw, DTYPES[t["dtype"]]).reshape(t["shape"]).copy()
        except (KeyError, TypeError, ValueError) as e:
            raise DoptError(f"tensor '{name}' cannot be decoded ({e.__class__.__name__})",
                            file=file, field=f"tensors.{name}") from None
        tensors[name] = arr
    for key in ("graph", "profile", "quant", "meta"):
        if not isinstance(doc.get(key, {}), dict):
            raise DoptError(f"'{key}' must be an object", file=file, field=key)
    return OmModel(doc.get("graph", {}), tensors, doc.get("profile", {}), doc.get("quant", {}),
                   doc.get("meta", {}))
