"""Residual blocks a PyTorch model can lose whole (depth pruning, ``dopt.prune``).

A block ``y = x + f(x)`` whose output has its input's shape computes ``y = x`` without
``f``, so it can be replaced by ``nn.Identity`` with nothing else changed: every kernel of
``f`` (and the add) leaves the NPU graph. That is what lowers the estimate of a small,
launch-bound network, where channel counts barely matter. A block ending in ``relu(x +
f(x))`` qualifies when its input is never negative on sample data (it comes out of a ReLU),
so that ``relu(x) = x``.

The residual is found in the module's own code, traced with ``torch.fx``: an add whose one
operand is the block's input, feeding the block's output directly or through a ReLU. A
module ``torch.fx`` cannot trace is not offered.
"""
from __future__ import annotations

import operator

import torch
from torch import nn

#: group names of removable blocks: this prefix + the module's qualified name
BLOCK = "block:"

_ADDS = {operator.add, operator.iadd, torch.add}
_RELUS = {torch.relu, torch.nn.functional.relu}
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _is_add(n) -> bool:
    return ((n.op == "call_function" and n.target in _ADDS)
            or (n.op == "call_method" and n.target in ("add", "add_")))


def _is_relu(n, gm) -> bool:
    if n.op == "call_function" and n.target in _RELUS:
        return True
    if n.op == "call_method" and n.target in ("relu", "relu_"):
        return True
    return n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU)


def residual_form(module: nn.Module) -> str | None:
    """``"add"`` (``y = x + f(x)``), ``"add_relu"`` (``y = relu(x + f(x))``) or None."""
    import torch.fx as fx
    try:
        gm = fx.symbolic_trace(module)
    except Exception:  # noqa: BLE001 - untraceable user code: not offered for removal
        return None
    nodes = list(gm.graph.nodes)
    ins = [n for n in nodes if n.op == "placeholder"]
    outs = [n for n in nodes if n.op == "output"]
    if len(ins) != 1 or len(outs) != 1 or not isinstance(outs[0].args[0], fx.Node):
        return None
    x, y = ins[0], outs[0].args[0]
    form = "add"
    if _is_relu(y, gm) and len(y.all_input_nodes) == 1:
        y, form = y.all_input_nodes[0], "add_relu"
    if not _is_add(y) or len(y.args) < 2:
        return None
    a, b = y.args[0], y.args[1]
    if not ((a is x) ^ (b is x)) or (y.kwargs.get("alpha", 1) != 1):
        return None
    return form


def find_blocks(model: nn.Module, example: torch.Tensor, excluded=()) -> dict[str, str]:
    """``{qualified name: form}`` of the removable residual blocks of ``model``, outermost
    first; a block inside another removable block is left out (the outer one decides).
    ``excluded``: module names that must stay (they and the blocks holding them)."""
    seen: dict[str, tuple] = {}
    hooks = []
    for name, m in model.named_modules():
        if not name or isinstance(m, _CONTAINERS) or not any(True for _ in m.children()):
            continue

        def hook(mod, args, out, name=name):
            if len(args) == 1 and torch.is_tensor(args[0]) and torch.is_tensor(out):
                seen[name] = (tuple(args[0].shape), tuple(out.shape),
                              float(args[0].min()) if args[0].numel() else 0.0)
        hooks.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    blocks: dict[str, str] = {}
    for name, (shape_in, shape_out, lo) in seen.items():
        if shape_in != shape_out or any(name == e or e.startswith(name + ".")
                                        for e in excluded):
            continue
        if any(name.startswith(b + ".") for b in blocks):
            continue
        form = residual_form(model.get_submodule(name))
        if form is None or (form == "add_relu" and lo < 0):
            continue
        blocks[name] = form
    return blocks


def block_influence(model: nn.Module, names, batches) -> dict[str, float]:
    """Per block, ``mean ||y - x|| / ||y||`` over ``batches``: the share of its output the
    block's branch contributes (0: the block does nothing; removing it changes nothing)."""
    acc = {n: [0.0, 0] for n in names}
    hooks = []
    for n in names:
        def hook(mod, args, out, n=n):
            x = args[0].detach().float()
            y = out.detach().float()
            acc[n][0] += float((y - x).norm() / (y.norm() + 1e-12))
            acc[n][1] += 1
        hooks.append(model.get_submodule(n).register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return {n: (s / k if k else 1.0) for n, (s, k) in acc.items()}


def remove_blocks(model: nn.Module, names) -> None:
    """Replace each named block by ``nn.Identity`` (in place)."""
    for name in names:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
