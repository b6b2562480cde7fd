"""Swap a HuggingFace causal LM's layers for fake-quant ones, per ``dopt_config.json``."""
from __future__ import annotations

from torch import nn

from dopt.dopt_llm.config import (check_tied, default_dopt_config, read_json,
                                  resolve_layers)
from dopt.errors import DoptError
from dopt.log import Logger

from .quant_modules import QuantEmbedding, QuantLinear, quant_modules

RUN_MODES = ("hardware", "train")


def _type_str(module) -> str:
    return str(type(module))


def _name_of(model, module) -> str | None:
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def quantizable_layers(model) -> tuple[dict, list]:
    """``({name: (kind, type string)}, [(embedding, lm_head)] if tied)``."""
    if not hasattr(model, "get_input_embeddings") or not hasattr(model, "get_output_embeddings"):
        raise DoptError("the LLM API needs a HuggingFace causal LM",
                        expected="a model from AutoModelForCausalLM",
                        found=type(model).__name__)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    emb_name, head_name = _name_of(model, emb), _name_of(model, head)
    layers: dict = {}
    if emb_name is not None:
        layers[emb_name] = ("embedding", _type_str(emb))
    for name, m in model.named_modules():
        if (isinstance(m, (nn.Linear, QuantLinear)) and m is not head
                and name != head_name):
            layers[name] = ("linear", _type_str(m) if isinstance(m, nn.Linear)
                            else str(nn.Linear))
    if head_name is not None:
        layers[head_name] = ("lm_head", _type_str(head))
    tied = []
    if emb is not None and head is not None and head.weight is emb.weight:
        tied.append((emb_name, head_name))
    return layers, tied


def generate_config(model, dst_path, defaults: dict) -> dict:
    layers, tied = quantizable_layers(model)
    cfg = default_dopt_config(layers, **defaults)
    from dopt.formats.fileio import write_json_atomic
    write_json_atomic(dst_path, cfg)
    n = sum(1 for k, _ in layers.values() if k == "linear")
    Logger.info(f"wrote {dst_path}: {n} decoder Linear layers (Quant_act_weight_eco, "
                f"w{defaults['w_bits']} g{defaults['group_size']}), embedding and lm_head "
                f"(8-bit per row{', tied' if tied else ''})")
    return cfg


def _set_module(model, name: str, new) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def optimize_model(model, config_path, cli_defaults: dict | None = None, data=None):
    """Swap configured layers in place and return the model (the reference returns it too)."""
    if quant_modules(model):
        raise DoptError("optimize_model was given a model that is already quantized",
                        hint="pass the float model loaded with AutoModelForCausalLM")
    if data is None:
        data = read_json(config_path, field="dopt_config", what="dopt_config.json")
    layers, tied = quantizable_layers(model)
    specs = resolve_layers(config_path, data, layers, cli_defaults)
    check_tied(config_path, specs, tied)
    if cli_defaults:
        _note_cli_differences(specs, cli_defaults)
    for name, spec in specs.items():
        old = model.get_submodule(name)
        if spec.strategy == "Quant_Embed_MinMax":
            new = QuantEmbedding(old, spec.w_bits, spec.group_size, spec.in_bits, spec.strategy)
        else:
            new = QuantLinear(old, spec.w_bits, spec.group_size, spec.in_bits, spec.strategy,
                              learn_clip=spec.strategy == "Quant_act_weight_eco")
        _set_module(model, name, new)
    model._dopt_llm = {"config": str(config_path), "specs": specs, "tied": tied}
    return model


def _note_cli_differences(specs, cli: dict) -> None:
    differ = [n for n, s in specs.items() if s.strategy == "Quant_act_weight_eco"
              and (s.w_bits, s.group_size) != (cli.get("w_bits"), cli.get("group_size"))]
    if differ:
        s = specs[differ[0]]
        Logger.warning(f"dopt_config.json sets {len(differ)} decoder layers differently from "
                       f"--w-bits {cli.get('w_bits')} --group-size {cli.get('group_size')} "
                       f"(e.g. {differ[0]}: w{s.w_bits} g{s.group_size}); the per-layer file "
                       f"wins")


def _require_quantized(model):
    mods = quant_modules(model)
    if not mods:
        raise DoptError("the model has no dopt quantization layers",
                        hint="call optimize_model(base_model, dopt_config) first")
    return mods


def set_quant_state(model, weight_state: bool, input_state: bool):
    for _, m in _require_quantized(model):
        m.weight_quant = bool(weight_state)
        m.input_quant = bool(input_state) and isinstance(m, QuantLinear)
    return model


def set_calibrate_state(model, flag: bool):
    for _, m in _require_quantized(model):
        m.calibrating = bool(flag) and isinstance(m, QuantLinear)
    return model


def set_run_mode(model, mode: str):
    if mode not in RUN_MODES:
        raise DoptError("unknown run mode", field="mode", expected=" or ".join(RUN_MODES),
                        found=repr(mode))
    for _, m in _require_quantized(model):
        m.hardware = mode == "hardware"
        m._cache = None
    if mode == "hardware":
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    return model

