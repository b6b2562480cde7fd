"""Activations an exporter spelled out op by op become the NPU's one operator.

TensorFlow has no hard-sigmoid or hard-swish kernel, so a Keras MobileNetV3 reaches ONNX as
``relu6(x + 3) * (1/6)`` and ``x * relu6(x + 3) * (1/6)``: three or four element-wise nodes
where a PyTorch export has one ``HardSigmoid`` / ``HardSwish``. The NPU has both as IR
operators (operator guide: HardSwish ☆☆☆☆☆), and a converter maps the formula to them;
left spelled out, the emulated NPU would run, and the latency estimate would price, three
extra kernels per activation, so the same network would cost more from Keras than from
PyTorch. The rewrite is exact up to float rounding (``clip(x / 6 + 0.5, 0, 1)`` instead of
``clip(x + 3, 0, 6) / 6``), keeps the name of the node that wrote the result, and only
touches chains whose intermediate tensors nothing else reads.
"""
from __future__ import annotations

import numpy as np

from .lower import _attr

_TOL = 1e-5


class _Graph:
    def __init__(self, model):
        from onnx import numpy_helper
        g = model.graph
        self.g = g
        self.outputs = {o.name for o in g.output}
        self.scalars = {t.name: float(numpy_helper.to_array(t).reshape(-1)[0])
                        for t in g.initializer if int(np.prod(t.dims, dtype=np.int64)) == 1}
        self.producer = {t: n for n in g.node for t in n.output}
        self.readers: dict[str, list] = {}
        for n in g.node:
            for t in n.input:
                self.readers.setdefault(t, []).append(n)

    def scalar(self, name: str, value: float) -> bool:
        v = self.scalars.get(name)
        return v is not None and abs(v - value) <= _TOL * max(1.0, abs(value))

    def only_reader(self, t: str, node) -> bool:
        return t not in self.outputs and [id(r) for r in self.readers.get(t, [])] == [id(node)]

    def made_by(self, t: str, op: str):
        n = self.producer.get(t)
        return n if n is not None and n.op_type == op and n.domain in ("", "ai.onnx") else None

    def relu6_of_x_plus_3(self, t: str, reader):
        """``relu6(x + 3)`` writing ``t`` (read only by ``reader``): (x, [its nodes])."""
        clip = self.made_by(t, "Clip")
        if clip is None or not self.only_reader(t, reader) or len(clip.input) != 3 \
                or not self.scalar(clip.input[1], 0.0) or not self.scalar(clip.input[2], 6.0):
            return None
        add = self.made_by(clip.input[0], "Add")
        if add is None or not self.only_reader(clip.input[0], clip) or len(add.input) != 2:
            return None
        for i in (0, 1):
            if self.scalar(add.input[1 - i], 3.0) and add.input[i] not in self.scalars:
                return add.input[i], [add, clip]
        return None

    def sixth(self, node) -> str | None:
        """The other operand of ``node`` when it is ``· * (1/6)`` or ``· / 6``."""
        if node.op_type == "Mul" and len(node.input) == 2:
            for i in (0, 1):
                if self.scalar(node.input[1 - i], 1 / 6):
                    return node.input[i]
        if node.op_type == "Div" and len(node.input) == 2 and self.scalar(node.input[1], 6.0):
            return node.input[0]
        return None


def fuse_hard_activations(model) -> int:
    """In place: ``relu6(x + 3) / 6`` -> HardSigmoid(x) and ``x * relu6(x + 3) / 6`` (in
    either grouping) -> HardSwish(x); an exporter's ``x * HardSigmoid(x)`` -> HardSwish(x).
    Returns the number of activations formed (a swish built on a sigmoid formed here first
    counts once)."""
    from onnx import helper
    formed, drop, replace = 0, set(), {}
    ours = set()                # outputs of the HardSigmoids formed here
    for _ in range(2):          # sigmoids first, then the swishes built on them
        g = _Graph(model)
        for n in list(model.graph.node):
            if id(n) in drop or n.domain not in ("", "ai.onnx") or n.op_type not in ("Mul", "Div"):
                continue
            inner = g.sixth(n)
            if inner is not None:
                hs = g.relu6_of_x_plus_3(inner, n)
                if hs is not None:                       # relu6(x + 3) / 6
                    x, chain = hs
                    replace[id(n)] = helper.make_node(
                        "HardSigmoid", [x], [n.output[0]], name=n.name, alpha=1 / 6, beta=0.5)
                    drop.update(id(c) for c in chain)
                    ours.add(n.output[0])
                    formed += 1
                    continue
                mul = g.made_by(inner, "Mul")             # (x * relu6(x + 3)) / 6
                if mul is not None and g.only_reader(inner, n) and len(mul.input) == 2:
                    for i in (0, 1):
                        hs = g.relu6_of_x_plus_3(mul.input[1 - i], mul)
                        if hs is not None and hs[0] == mul.input[i]:
                            replace[id(n)] = helper.make_node(
                                "HardSwish", [hs[0]], [n.output[0]], name=n.name)
                            drop.update([id(mul)] + [id(c) for c in hs[1]])
                            formed += 1
                            break
                    continue
            if n.op_type == "Mul" and len(n.input) == 2:  # x * HardSigmoid(x)
                for i in (0, 1):
                    h = g.made_by(n.input[1 - i], "HardSigmoid")
                    if h is not None and h.input[0] == n.input[i] \
                            and g.only_reader(n.input[1 - i], n) \
                            and abs(_attr(h, "alpha", 0.2) - 1 / 6) <= _TOL \
                            and abs(_attr(h, "beta", 0.5) - 0.5) <= _TOL:
                        replace[id(n)] = helper.make_node("HardSwish", [n.input[i]],
                                                          [n.output[0]], name=n.name)
                        drop.add(id(h))
                        formed += h.output[0] not in ours
                        break
        if replace or drop:
            nodes = [replace.get(id(n), n) for n in model.graph.node if id(n) not in drop]
            del model.graph.node[:]
            model.graph.node.extend(nodes)
            replace, drop = {}, set()
    return formed
