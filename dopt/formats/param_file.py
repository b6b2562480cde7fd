"""The quantization parameter file (what ``dopt omg --compress_conf`` reads).

Schema ``dopt.quant_param`` version 1 (JSON, documented in docs/param_file.md):

    {"format": "dopt.quant_param", "version": 1,
     "producer": {"name": "dopt", "version": ..., "framework": ...},
     "model": "<file name of the graph the records are keyed against>",
     "layers": {
        "<graph node name>": {
            "op_type": "Conv" | "Gemm" | "MatMul",
            "strategy": "Quant_INT8-8",
            "source_layer": "<framework layer name>",
            "input":  {"tensor": str, "bits": 8, "scale": float, "offset": int,
                       "range": [lo, hi], "algorithm": str},
            "weight": {"tensor": str, "bits": 8, "per_channel": true, "symmetric": true,
                       "scales": [one float per output channel]},
            "bias":   {"tensor": str, "bits": 32} | null,
            "folded_bn": "<BN layer folded into this one>" | null}}}

Floats are the exact float32 values the fake-quant used, written as decimal
float64 text, so the file round-trips bit-for-bit.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .strategy_config import INT8
from ..errors import DoptError
from .fileio import reject_duplicate_keys, write_json_atomic

FORMAT = "dopt.quant_param"
VERSION = 1
MAX_FILE_BYTES = 256 << 20
MIN_SCALE = 1e-12
# ONNX op types, plus the TensorFlow op types of records keyed by TF op names (frozen .pb);
# `dopt omg --framework 3` re-keys those onto the converted ONNX graph.
ONNX_OP_TYPES = ("Conv", "Gemm", "MatMul", "ConvTranspose")
TF_OP_TYPES = ("Conv2D", "DepthwiseConv2dNative", "MatMul")
QUANT_OP_TYPES = tuple(dict.fromkeys(ONNX_OP_TYPES + TF_OP_TYPES))


def read_params(path) -> dict:
    path = Path(path)
    f = str(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise DoptError("the quantization parameter file does not exist", file=f,
                        hint="pass the file written by generate_final_model / dopt_so") from None
    if size > MAX_FILE_BYTES:
        raise DoptError("the quantization parameter file is too large", file=f,
                        expected=f"at most {MAX_FILE_BYTES} bytes", found=f"{size} bytes")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=reject_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise DoptError(f"the quantization parameter file is not valid JSON{where}: {e}", file=f,
                        hint="regenerate it; do not edit it by hand") from None
    validate_params(doc, file=f)
    return doc


def write_params(path, doc: dict) -> None:
    validate_params(doc, file=str(path))
    write_json_atomic(path, doc)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_scale(v, *, file, field) -> None:
    if not _num(v) or not math.isfinite(v) or v < MIN_SCALE:
        raise DoptError("degenerate quantization scale", file=file, field=field,
                        expected=f"a finite number >= {MIN_SCALE}", found=repr(v),
                        hint="recalibrate: the layer saw no data or only constant data")


def validate_params(doc, *, file=None, graph: dict | None = None,
                    expected_layers=None) -> None:
    """Check the schema; with ``graph`` ({node: {"op_type", "weight_shape"}}) check placement.

    ``expected_layers``: the set of node names that must carry a record - every
    quantized node has exactly one record and every record a quantized node.
    """
    if not isinstance(doc, dict):
        raise DoptError("the parameter file must be a JSON object", file=file)
    if doc.get("format") != FORMAT:
        raise DoptError("not a dopt quantization parameter file", file=file, field="format",
                        expected=repr(FORMAT), found=repr(doc.get("format")))
    if doc.get("version") != VERSION:
        raise DoptError("unsupported parameter file version", file=file, field="version",
                        expected=str(VERSION), found=repr(doc.get("version")),
                        hint="regenerate the file with this version of dopt")
    layers = doc.get("layers")
    if not isinstance(layers, dict):
        raise DoptError("'layers' must be an object keyed by graph node name", file=file,
                        field="layers")
    for node, rec in layers.items():
        p = f"layers.{node}"
        if not isinstance(rec, dict):
            raise DoptError("a layer record must be an object", file=file, field=p)
        if rec.get("strategy") != INT8:
            raise DoptError("unsupported strategy", file=file, field=f"{p}.strategy",
                            expected=repr(INT8), found=repr(rec.get("strategy")))
        if rec.get("op_type") not in QUANT_OP_TYPES:
            raise DoptError("op_type cannot be quantized", file=file, field=f"{p}.op_type",
                            expected=" or ".join(QUANT_OP_TYPES), found=repr(rec.get("op_type")))
        inp, w = rec.get("input"), rec.get("weight")
        if not isinstance(inp, dict) or not isinstance(w, dict):
            raise DoptError("a layer record needs 'input' and 'weight' objects", file=file,
                            field=p)
        if inp.get("bits") != 8 or w.get("bits") != 8:
            raise DoptError("Quant_INT8-8 needs 8-bit input and weight", file=file,
                            field=f"{p}.input.bits/weight.bits",
                            found=f"{inp.get('bits')}/{w.get('bits')}")
        _check_scale(inp.get("scale"), file=file, field=f"{p}.input.scale")
        off = inp.get("offset")
        if not isinstance(off, int) or isinstance(off, bool) or not -128 <= off <= 127:
            raise DoptError("activation offset out of range", file=file,
                            field=f"{p}.input.offset", expected="an integer in [-128, 127]",
                            found=repr(off))
        if not isinstance(inp.get("tensor"), str) or not isinstance(w.get("tensor"), str):
            raise DoptError("input and weight records must name their tensors", file=file,
                            field=f"{p}.input.tensor/weight.tensor")
        scales = w.get("scales")
        if not isinstance(scales, list) or not scales or len(scales) > 1 << 20:
            raise DoptError("weight scales must be a non-empty list", file=file,
                            field=f"{p}.weight.scales")
        for i, s in enumerate(scales):
            _check_scale(s, file=file, field=f"{p}.weight.scales[{i}]")
        if w.get("per_channel") is not True:
            raise DoptError("weight scales must be per output channel", file=file,
                            field=f"{p}.weight.per_channel", expected="true",
                            found=repr(w.get("per_channel")))
        b = rec.get("bias")
        if b is not None and (not isinstance(b, dict) or b.get("bits") != 32):
            raise DoptError("bias record must be null or {tensor, bits: 32}", file=file,
                            field=f"{p}.bias", found=repr(b))
        if graph is not None:
            g = graph.get(node)
            if g is None:
                raise DoptError(f"the parameter file has a record for node '{node}', which the "
                                f"model does not have", file=file, field=p,
                                hint="use the parameter file produced together with this model")
            if g.get("op_type") != rec["op_type"]:
                raise DoptError(f"node '{node}' has another op type in the model", file=file,
                                field=f"{p}.op_type", expected=repr(g.get("op_type")),
                                found=repr(rec["op_type"]))
            ws = g.get("weight_shape")
            if ws and len(scales) != ws[0]:
                raise DoptError(f"node '{node}' has {ws[0]} output channels", file=file,
                                field=f"{p}.weight.scales", expected=f"{ws[0]} scales",
                                found=f"{len(scales)}")
    fl = doc.get("float_layers")
    if fl is not None:
        if not isinstance(fl, list) or not all(isinstance(x, str) for x in fl):
            raise DoptError("'float_layers' must be a list of node names", file=file,
                            field="float_layers")
        both = sorted(set(fl) & set(layers))
        if both:
            raise DoptError(f"node(s) both quantized and listed as float: {', '.join(both)}",
                            file=file, field="float_layers")
        if graph is not None:
            unknown = sorted(set(fl) - set(graph))
            if unknown:
                raise DoptError(f"float_layers names node(s) the model does not have: "
                                f"{', '.join(unknown)}", file=file, field="float_layers",
                                hint="use the parameter file produced together with this model")
    if expected_layers is not None:
        expected = set(expected_layers)
        missing = sorted(expected - set(layers))
        extra = sorted(set(layers) - expected)
        if missing:
            raise DoptError(f"quantized node(s) without a record: {', '.join(missing)}",
                            file=file, field="layers",
                            hint="regenerate the parameter file together with the model")
        if extra:
            raise DoptError(f"record(s) for node(s) that are not quantized: {', '.join(extra)}",
                            file=file, field="layers",
                            hint="regenerate the parameter file together with the model")


def new_params(producer: dict, model_file: str) -> dict:
    return {"format": FORMAT, "version": VERSION, "producer": producer, "model": model_file,
            "layers": {}}
