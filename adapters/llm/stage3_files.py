"""Stage 3 outputs from a calibrated model: ``fake_quant_weight.pth`` and the parameter file
(layout in ``dopt.formats.llm_param_file``)."""
from __future__ import annotations

import json

import numpy as np
import torch

from dopt.quant import lowbit
from dopt.formats.llm_param_file import FORMAT, VERSION, embedding_bin, pack_codes

from .model_opt import quantizable_layers
from .quant_modules import QuantEmbedding, QuantLinear, group_qparams, quant_modules

ARRAYS_FILE = "quant_params.npz"
EMBED_FILE = "embedding.bin"


def fake_quant_state(model) -> dict:
    """The base model's state dict (HuggingFace keys) with every quantized weight replaced by
    its dequantized grid values; tied weights stay one tensor."""
    qmods = dict(quant_modules(model))
    replaced: dict[int, torch.Tensor] = {}
    for m in qmods.values():
        if id(m.weight) not in replaced:
            with torch.no_grad():
                replaced[id(m.weight)] = m.qweight().detach().clone().contiguous()
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name.endswith((".quant_alpha", ".input_amax")):
            continue
        out[name] = replaced.get(id(t), t.detach())
    return out


def _layer_arrays(m) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    w = m.weight.detach().float()
    with torch.no_grad():
        scale, zero = group_qparams(w, m.w_bits, m.group_size, m.clip_factors())
    scale = scale.numpy().astype(np.float32)
    zero = zero.numpy().astype(np.int32)
    codes = lowbit.quantize_weight(w.numpy(), scale, zero, m.w_bits, m.group_size)
    return codes, scale, zero


def write_quant_params(model, json_path, *, lut_mode: bool, embedding_in_omc: bool) -> dict:
    """Write ``quant_params.json`` + arrays beside it; return ``{kind: file name}``."""
    layers, tied = quantizable_layers(model)
    tied_heads = {head: emb for emb, head in tied}
    arrays, emb_tables, records = {}, None, {}
    written = {"quant_params": json_path.name, "arrays": ARRAYS_FILE}
    emb_layout = None
    for name, m in quant_modules(model):
        kind = layers[name][0]
        cols = m.weight.shape[1]
        rec = {"quant_strategy": m.strategy, "kind": kind, "shape": list(m.weight.shape),
               "weight": {"bit": m.w_bits, "group_size": m.group_size,
                          "group_bounds": [list(b) for b in lowbit.group_bounds(cols,
                                                                               m.group_size)],
                          "packing": "uint4x2, low nibble first" if m.w_bits <= 4 else "uint8"}}
        if isinstance(m, QuantLinear):
            amax = float(m.input_amax)
            rec["input"] = {"bit": m.in_bits, "amax": amax,
                            "scale": float(lowbit.act_scale(amax, m.in_bits)), "offset": 0}
        if name in tied_heads:
            rec["tied_to"] = tied_heads[name]
            records[name] = rec
            continue
        codes, scale, zero = _layer_arrays(m)
        tables = ({"lut": lowbit.lut(scale, zero, m.w_bits)} if lut_mode
                  else {"scale": scale, "zero": zero})
        if isinstance(m, QuantEmbedding) and not embedding_in_omc:
            blob, emb_layout = embedding_bin(codes, tables, m.w_bits)
            emb_tables = blob
            rec["in_embedding_file"] = True
            rec["prefix"] = ""
        else:
            arrays[f"{name}.codes"] = pack_codes(codes, m.w_bits)
            for k, v in tables.items():
                arrays[f"{name}.{k}"] = v
        records[name] = rec
    doc = {"format": FORMAT, "version": VERSION, "strategy": "Quant_INT16-4",
           "lut_mode": bool(lut_mode), "embedding_in_omc": bool(embedding_in_omc),
           "arrays": ARRAYS_FILE, "layers": records}
    out_dir = json_path.parent
    np.savez(out_dir / ARRAYS_FILE, **arrays)
    if emb_tables is not None:
        (out_dir / EMBED_FILE).write_bytes(emb_tables)
        doc["embedding_file"] = {"file": EMBED_FILE, "layout": emb_layout}
        written["embedding"] = EMBED_FILE
    json_path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return written
