"""Which modules are quantizable, and which convolution feeds exactly one BatchNorm."""
from __future__ import annotations

import warnings

from torch import nn

from dopt.formats.strategy_config import FLOAT, INT8

# op_type strings are the reference's: str(type(module)) of the torch class.
QUANTIZABLE = (nn.Conv2d, nn.Linear)
STRATEGIES = {str(nn.Conv2d): (FLOAT, INT8), str(nn.Linear): (FLOAT, INT8)}


def op_type(module) -> str:
    for cls in QUANTIZABLE:
        if isinstance(module, cls):
            return str(cls)
    raise TypeError(type(module))


def quantizable_layers(model: nn.Module) -> dict[str, str]:
    """``{qualified name: op_type}`` in registration order."""
    return {name: op_type(m) for name, m in model.named_modules()
            if name and isinstance(m, QUANTIZABLE)}


def trace(model: nn.Module):
    """The model's torch.fx graph module, or ``None`` (with a warning) when its forward does
    not trace: such a model keeps its BatchNorms unfolded (still correct, just not folded)."""
    import torch.fx

    class _Tracer(torch.fx.Tracer):
        # a Conv2d / Linear / BatchNorm2d subclass (TF-"SAME" padding convolutions of
        # EfficientNet and timm ports) is one call, as nn's own are: traced into, its conv
        # would be a bare function call and its BatchNorm would go unfolded
        def is_leaf_module(self, m, qualname):
            return isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) \
                or super().is_leaf_module(m, qualname)

    try:
        root = _Tracer().trace(model)
        return torch.fx.GraphModule(model, root, type(model).__name__)
    except Exception as e:  # untraceable forward: no folding, which is still correct
        warnings.warn(f"dopt: could not trace {type(model).__name__} with torch.fx ({e}); "
                      "BatchNorm layers will not be folded into convolutions", stacklevel=3)
        return None


def conv_bn_pairs(model: nn.Module, gm=False) -> dict[str, str]:
    """``{conv name: bn name}`` where a Conv2d's only consumer is a BatchNorm2d.

    Found on the model's torch.fx graph ``gm`` (traced here unless given; ``None``: the
    model did not trace, no pairs).
    """
    if gm is False:
        gm = trace(model)
    if gm is None:
        return {}
    mods = dict(model.named_modules())
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    pairs = {}
    for n in gm.graph.nodes:
        if n.op != "call_module" or not isinstance(mods.get(n.target), nn.Conv2d):
            continue
        users = list(n.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        bn = mods.get(users[0].target)
        conv = mods[n.target]
        if isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels \
                and calls[n.target] == 1 and calls[users[0].target] == 1 \
                and bn.track_running_stats:
            pairs[n.target] = users[0].target
    return pairs


def get_parent(model: nn.Module, name: str):
    parts = name.split(".")
    parent = model
    for p in parts[:-1]:
        parent = getattr(parent, p)
    return parent, parts[-1]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, leaf = get_parent(model, name)
    setattr(parent, leaf, new)
