"""Transposes that only undo each other leave the graph (an exporter's layout artefacts).

TensorFlow/Keras exporters (tf2onnx) wrap stretches of a graph that TensorFlow ran in NHWC
in Transpose pairs: ``Conv -> Transpose(0,2,3,1) -> hard-swish -> Transpose(0,3,1,2) ->
Conv``. The NPU works in one layout, and the reference's converters compile such a network
from its TensorFlow source without any of these Permute kernels; a network exported from
PyTorch has none either. Left in, they are data moves the NPU never makes (a Keras
MobileNetV3 gains 128 of them), so the emulated run and the latency estimate would depend
on the exporter instead of on the network.

Each Transpose is pushed down through the layout-agnostic node that reads it (element-wise
ops, keep-dims reductions, Pad), which then works on the untransposed tensor with its
constants, axes and pads permuted to match, until it meets its inverse and both leave.
Exact (a transpose only moves values), bounded by the graph's size, and kept only when the
graph ends with fewer transposes than it started with; node names are kept.
"""
from __future__ import annotations

import numpy as np

from .lower import _attr

# element-wise ops whose first input is the only map (Clip's min/max are scalars)
UNARY = frozenset({
    "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Elu",
    "Selu", "Softplus", "Softsign", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal",
    "Identity", "Floor", "Ceil", "Round", "Sign", "Erf", "Gelu", "Mish", "Cast"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu"})
REDUCE = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd"})
MAX_BROADCAST_CONST = 1 << 20     # elements of a constant operand worth permuting


def _set_ints(node, name, values) -> None:
    from onnx import helper
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, [int(v) for v in values]))


class _Sinker:
    """One pass over copies of the graph's nodes; new constants are kept aside until the
    result is accepted."""

    def __init__(self, model):
        from onnx import NodeProto
        self.nodes = []
        for n in model.graph.node:
            c = NodeProto()
            c.CopyFrom(n)
            self.nodes.append(c)
        self.inits = {t.name: t for t in model.graph.initializer}
        self.new_inits: dict[str, object] = {}
        self.outputs = {o.name for o in model.graph.output}
        self.taken = {t for n in self.nodes for t in list(n.input) + list(n.output)} \
            | set(self.inits) | {i.name for i in model.graph.input}

    # -- helpers ------------------------------------------------------------------------------

    def _fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

    def _const(self, name: str):
        from onnx import numpy_helper
        t = self.new_inits.get(name)
        if t is None:
            t = self.inits.get(name)
        if t is None or np.prod(t.dims, dtype=np.int64) > MAX_BROADCAST_CONST:
            return None
        return numpy_helper.to_array(t)

    def _add_const(self, base: str, value) -> str:
        from onnx import numpy_helper
        name = self._fresh(base)
        self.new_inits[name] = numpy_helper.from_array(np.ascontiguousarray(value), name)
        return name

    def _index(self):
        self.producer = {t: n for n in self.nodes for t in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for t in n.input:
                self.consumers.setdefault(t, []).append(n)

    @staticmethod
    def _perm(t) -> list[int] | None:
        p = _attr(t, "perm")
        return [int(v) for v in p] if p is not None else None

    def _transposed_by(self, tensor: str, perm: list[int]) -> str | None:
        """The untransposed source of ``tensor`` when a Transpose by ``perm`` makes it."""
        p = self.producer.get(tensor)
        if p is not None and p.op_type == "Transpose" and p.domain in ("", "ai.onnx") \
                and self._perm(p) == perm:
            return p.input[0]
        return None

    # -- one rewrite: Transpose ``t`` moves below its consumer ``c`` ----------------------------

    def sink(self, t, c):
        """Move ``t`` below ``c``: None when ``c`` does not allow it, else True (``c`` was a
        Transpose and now composes both) or the new Transpose written after ``c``."""
        x, y, perm = t.input[0], t.output[0], self._perm(t)
        rank = len(perm)
        inv = list(np.argsort(perm))
        op = c.op_type
        if c.domain not in ("", "ai.onnx"):
            return None
        if op == "Transpose":
            q = self._perm(c)
            if q is None or len(q) != rank:
                return None
            composed = [perm[i] for i in q]
            c.input[0] = x
            if composed == list(range(rank)):
                c.op_type = "Identity"
                del c.attribute[:]
            else:
                _set_ints(c, "perm", composed)
            return True
        if op in UNARY:
            if c.input[0] != y or any(v == y for v in list(c.input)[1:]):
                return None
            c.input[0] = x
        elif op in BINARY:
            if len(c.input) != 2:
                return None
            new = []
            for v in c.input:
                if v == y:
                    new.append(x)
                    continue
                src = self._transposed_by(v, perm)
                if src is not None:
                    new.append(src)
                    continue
                val = self._const(v)
                if val is None or val.ndim > rank:
                    return None
                if val.size == 1:
                    new.append(v)
                    continue
                full = val.reshape((1,) * (rank - val.ndim) + val.shape)
                new.append(self._add_const(f"{v}/untransposed", full.transpose(inv)))
            c.input[:] = new
        elif op in REDUCE:
            if _attr(c, "keepdims", 1) != 1 or c.input[0] != y:
                return None
            axes = _attr(c, "axes")
            from_input = axes is None and len(c.input) > 1 and c.input[1]
            if from_input:
                val = self._const(c.input[1])
                if val is None:
                    return None
                axes = val.reshape(-1).tolist()
            if axes is not None:
                mapped = sorted(perm[int(a) % rank] for a in axes)
                if from_input:
                    c.input[1] = self._add_const(f"{c.input[1]}/untransposed",
                                                 np.array(mapped, np.int64))
                else:
                    _set_ints(c, "axes", mapped)
            c.input[0] = x
        elif op == "Pad":
            if c.input[0] != y or len(c.input) < 2 or (len(c.input) > 3 and c.input[3]):
                return None
            pads = self._const(c.input[1])
            if pads is None or pads.size != 2 * rank:
                return None
            pads = pads.reshape(-1)
            moved = np.zeros_like(pads)
            for i in range(rank):
                moved[perm[i]], moved[rank + perm[i]] = pads[i], pads[rank + i]
            c.input[1] = self._add_const(f"{c.input[1]}/untransposed", moved)
            c.input[0] = x
        else:
            return None
        # ``c`` now computes in the untransposed layout; a Transpose after it restores the
        # tensor its readers expect (it sinks further, or cancels, on a later step)
        from onnx import helper
        base = c.output[0].split("/untransposed")[0]
        inner = self._fresh(f"{base}/untransposed")
        after = helper.make_node("Transpose", [inner], [c.output[0]],
                                 name=self._fresh(f"{c.name or op}/transpose"), perm=perm)
        c.output[0] = inner
        self.seq += 1
        self.key[id(after)] = self.key[id(c)] + (-self.seq,)   # right after c, newest first
        self.nodes.append(after)
        self.producer[inner], self.producer[after.output[0]] = c, after
        self.consumers[inner] = [after]
        return after

    def _is_t(self, n) -> bool:
        return n.op_type == "Transpose" and n.domain in ("", "ai.onnx") \
            and self._perm(n) is not None

    def _reindex(self, c, old) -> None:
        """``c`` read ``old`` and now reads ``c.input``: move it between reader lists."""
        for v in old:
            readers = self.consumers.get(v, [])
            for i, r in enumerate(readers):
                if r is c:
                    del readers[i]
                    break
        for v in c.input:
            self.consumers.setdefault(v, []).append(c)

    def _kill_if_dead(self, n) -> None:
        """Drop Transposes nobody reads any more, up a chain of them (bounded by the graph)."""
        for _ in range(len(self.nodes) + 1):
            if n is None or id(n) in self.dead or not self._is_t(n) \
                    or self.consumers.get(n.output[0]) or n.output[0] in self.outputs:
                return
            self.dead.add(id(n))
            self._reindex(n, list(n.input))
            readers = self.consumers.get(n.input[0], [])
            self.consumers[n.input[0]] = [r for r in readers if r is not n]
            n = self.producer.get(n.input[0])

    def run(self) -> int:
        """Sink every Transpose as far as it goes; returns the number of rewrites. A worklist
        over incrementally kept indexes: each rewrite costs the size of the nodes it touches,
        and the rewrites are bounded by the graph's size."""
        import heapq
        self._index()
        self.key = {id(n): (i,) for i, n in enumerate(self.nodes)}
        self.dead: set[int] = set()
        self.seq = 0
        # the earliest Transpose first: it chases the ones below it until it meets its inverse
        work = [(self.key[id(n)], i, n) for i, n in enumerate(self.nodes) if self._is_t(n)]
        heapq.heapify(work)
        pushed = len(self.nodes)
        done, limit = 0, 8 * len(self.nodes) + 16   # a rewrite moves a Transpose one node down
        while work and done < limit:
            t = heapq.heappop(work)[2]
            if id(t) in self.dead or not self._is_t(t):
                continue
            for c in list(self.consumers.get(t.output[0], [])):
                if id(c) in self.dead or id(t) in self.dead or not self._is_t(t):
                    continue
                old = list(c.input)
                moved = self.sink(t, c)
                if moved is None:
                    continue
                self._reindex(c, old)
                done += 1
                nxt = moved if moved is not True else c if self._is_t(c) else None
                if nxt is not None:
                    pushed += 1
                    heapq.heappush(work, (self.key[id(nxt)], pushed, nxt))
                for v in old:       # operands whose Transpose was taken along
                    self._kill_if_dead(self.producer.get(v))
            self._kill_if_dead(t)
        self.nodes = sorted((n for n in self.nodes if id(n) not in self.dead),
                            key=lambda n: self.key[id(n)])
        if done:
            self._drop_dead()
        return done

    def _drop_dead(self) -> None:
        """Transposes / Identities nobody reads (their readers moved to the source)."""
        used = {v for n in self.nodes for v in n.input} | self.outputs
        self.nodes = [n for n in self.nodes
                      if not (n.op_type in ("Transpose", "Identity")
                              and n.domain in ("", "ai.onnx") and n.output[0] not in used)]
        # an Identity that a cancelled pair left: its readers take its input instead
        rename = {n.output[0]: n.input[0] for n in self.nodes
                  if n.op_type == "Identity" and n.domain in ("", "ai.onnx")
                  and n.output[0] not in self.outputs}
        if rename:
            for n in self.nodes:
                for i, v in enumerate(n.input):
                    for _ in range(len(rename) + 1):        # chains, bounded
                        if v not in rename:
                            break
                        v = rename[v]
                    n.input[i] = v
            self.nodes = [n for n in self.nodes if not (
                n.op_type == "Identity" and n.output[0] in rename)]
        # an Identity left writing a graph output: its producer writes the output instead
        producer = {t: n for n in self.nodes for t in n.output}
        reads: dict[str, int] = {}
        for n in self.nodes:
            for v in n.input:
                reads[v] = reads.get(v, 0) + 1
        drop = set()
        for n in self.nodes:
            if n.op_type == "Identity" and n.domain in ("", "ai.onnx") \
                    and n.output[0] in self.outputs and n.input[0] in producer \
                    and reads.get(n.input[0]) == 1 and n.input[0] not in self.outputs:
                p = producer[n.input[0]]
                p.output[list(p.output).index(n.input[0])] = n.output[0]
                drop.add(id(n))
        if drop:
            self.nodes = [n for n in self.nodes if id(n) not in drop]


def _count(nodes) -> int:
    return sum(n.op_type == "Transpose" and n.domain in ("", "ai.onnx") for n in nodes)


def cancel_transposes(model) -> int:
    """Push Transposes down through layout-agnostic nodes and cancel inverse pairs, in
    place. Returns how many Transposes left the graph (0: the graph is unchanged, which is
    also what happens when sinking would not leave fewer of them)."""
    before = _count(model.graph.node)
    if not before:
        return 0
    s = _Sinker(model)
    if not s.run():
        return 0
    after = _count(s.nodes)
    if after >= before:
        return 0
    used_before = {v for n in model.graph.node for v in n.input}
    used = {v for n in s.nodes for v in n.input} | s.outputs
    del model.graph.node[:]
    model.graph.node.extend(s.nodes)
    for i in reversed(range(len(model.graph.initializer))):   # constants the pass replaced
        name = model.graph.initializer[i].name
        if name in used_before and name not in used:
            del model.graph.initializer[i]
    model.graph.initializer.extend(t for k, t in s.new_inits.items() if k in used)
    return before - after
