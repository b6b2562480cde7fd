"""One PTQ run, many precisions: QDQ models with any set of layers kept float.

The PTQ path (``dopt_so``'s: the adapter's ``dopt_quantize_file``) writes a QDQ model
and a parameter file with every selected layer INT8. A variant keeps the layers ``S``
float: their records move to ``float_layers`` (how the compiler keeps a layer float, see
docs/param_file.md), and their weights and biases are the user's float ones again (bias
correction and INT8 rounding apply only to quantized layers). Everything here is ONNX.
"""
from __future__ import annotations

import copy

import numpy as np

from ..errors import DoptError


class Variants:
    """``(qdq model, params)`` for any set of float layers, from one quantized model."""

    def __init__(self, qdq_model, params: dict, float_model, *, equalized: bool = False):
        import onnx
        from onnx import numpy_helper
        from ..npu.prepare import strip_qdq
        base = onnx.ModelProto()
        base.CopyFrom(qdq_model)
        strip_qdq(base)       # the float graph the parameter file is keyed against
        # the PTQ writer drops output shapes when it frees the batch; the checker wants
        # one: take the float model's (same graph outputs), else an unknown-rank one
        f_outs = {o.name: o for o in float_model.graph.output}
        for o in base.graph.output:
            if not o.type.tensor_type.HasField("shape"):
                if o.name in f_outs:
                    o.CopyFrom(f_outs[o.name])
        used = {x for n in base.graph.node for x in n.input} | \
            {o.name for o in base.graph.output}
        keep = [i for i in base.graph.initializer if i.name in used]
        del base.graph.initializer[:]
        base.graph.initializer.extend(keep)     # the old QDQ scales and zero points
        self.base, self.params = base, params
        self.layers = list(params["layers"])          # INT8 layers, graph order of the file
        self.notes: list[str] = []
        f_inits = _float_constants(float_model)
        f_nodes = {n.name: n for n in float_model.graph.node}
        b_inits = {i.name: i for i in base.graph.initializer}
        nodes = {n.name: n for n in base.graph.node}
        self._restore: dict[str, list] = {}
        for name in self.layers:
            n = nodes.get(name)
            if n is None:
                raise DoptError(f"the parameter file names layer '{name}', which the quantized "
                                f"model does not have")
            todo = []
            for pos, t in enumerate(n.input[1:3], 1):
                if not t or t not in b_inits:
                    continue
                have = numpy_helper.to_array(b_inits[t])
                orig = f_inits.get(t)
                if equalized:
                    continue        # CLE scaled producer and consumer together: keep both
                fn = f_nodes.get(name)
                if orig is not None and orig.shape == have.shape:
                    todo.append((t, orig))
                elif (pos == 2 and orig is None and fn is not None and fn.op_type == n.op_type
                      and (len(fn.input) < 3 or not fn.input[2])):
                    todo.append((t, np.zeros_like(have)))   # a bias that correction added
            self._restore[name] = todo
        if equalized:
            self.notes.append("cross-layer equalization is on: layers kept float keep the "
                              "equalized weights (INT8-rounded)")

    def params_for(self, float_set) -> dict:
        doc = copy.deepcopy(self.params)
        fl = set(float_set)
        doc["layers"] = {k: v for k, v in doc["layers"].items() if k not in fl}
        doc["float_layers"] = sorted(set(doc.get("float_layers") or []) | fl)
        doc.setdefault("producer", {})["mixed_precision"] = sorted(fl)
        return doc

    def float_graph(self, float_set):
        """The float graph with the user's weights on the layers of ``float_set``."""
        import onnx
        from onnx import numpy_helper
        m = onnx.ModelProto()
        m.CopyFrom(self.base)
        inits = {i.name: i for i in m.graph.initializer}
        for name in float_set:
            for t, arr in self._restore.get(name, []):
                inits[t].CopyFrom(numpy_helper.from_array(arr.astype(
                    numpy_helper.to_array(inits[t]).dtype), t))
        return m

    def build(self, float_set=()) -> tuple[object, dict]:
        """``(QDQ ModelProto, parameter document)`` with ``float_set`` float."""
        from ..formats.qdq import build_qdq
        doc = self.params_for(float_set)
        return build_qdq(self.float_graph(float_set), doc), doc


def _float_constants(model) -> dict[str, np.ndarray]:
    """The float model's weights by tensor name: initializers, and the outputs of
    ``Constant`` nodes (exporters such as paddle2onnx store every weight that way)."""
    from onnx import numpy_helper
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value" and a.HasField("t"):
                    out.setdefault(n.output[0], numpy_helper.to_array(a.t))
    return out
