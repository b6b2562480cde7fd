"""``generate_final_model``: float ONNX with BN fused, parameter file, QDQ ONNX - checked.

Everything is staged in a temporary folder and moved into ``output_dir`` only
after both checks pass: (1) the fused float ONNX reproduces the unfused float
network, (2) ONNX Runtime running the QDQ model reproduces the fake-quant model.
"""
from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import torch
from torch import nn

import dopt
from dopt.formats import qdq as onnx_qdq
from dopt.formats import param_file as P
from dopt.formats.strategy_config import load_config
from dopt.errors import DoptError
from dopt.formats.export_checks import check_float, check_quantized
from dopt.formats.fileio import staged_outputs

from . import api, layers as L
from .checkpoint import load_into, load_state_dict
from .modules import npu_fp16_layers, quant_layers
from .npu_edges import npu_numerics

FUSED_NAME = "model_fused.onnx"
QDQ_NAME = "model_qdq.onnx"
PARAM_NAME = "quant_param.json"
OPSET = 17
CHECK_SAMPLES = 16


def _wrapped(model: nn.Module) -> list:
    """Every dopt wrapper: quantized layers and the FP16 stand-ins of narrow convolutions."""
    return list(quant_layers(model)) + list(npu_fp16_layers(model))


def _deploy_model(qmodel: nn.Module) -> nn.Module:
    """Plain float model: quant wrappers replaced by layers holding the folded weights."""
    dep = copy.deepcopy(qmodel)
    for name, q in _wrapped(dep):
        w, b = q.folded()
        layer = q.layer
        with torch.no_grad():
            if getattr(q, "bn", None) is not None and layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(layer.out_channels))
            layer.weight.copy_(w.detach())
            if b is not None:
                layer.bias.copy_(b.detach())
        L.set_module(dep, name, layer)
    if hasattr(dep, api.INFO_ATTR):
        delattr(dep, api.INFO_ATTR)
    return dep.eval()


def _unfused_float(qmodel: nn.Module) -> nn.Module:
    """The trained network in float, BN separate: the reference for the fusion check."""
    ref = copy.deepcopy(qmodel)
    for name, q in _wrapped(ref):
        if getattr(q, "bn", None) is not None:
            L.set_module(ref, name, nn.Sequential(q.layer, q.bn))
        else:
            L.set_module(ref, name, q.layer)
    return ref.eval()


def _export_onnx(model, sample: dict):
    names = list(sample)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buf = io.BytesIO()
        torch.onnx.export(model, tuple(sample.values()), buf, dynamo=False, opset_version=OPSET,
                          input_names=names, output_names=None, do_constant_folding=True,
                          dynamic_axes={n: {0: "batch"} for n in names})
    import onnx
    m = onnx.load_from_string(buf.getvalue())
    for o in m.graph.output:
        if o.type.tensor_type.shape.dim:
            o.type.tensor_type.shape.dim[0].dim_param = "batch"
    _materialize_identities(m)
    return m


def _materialize_identities(m) -> None:
    """The exporter shares identical constants through ``Identity`` nodes; give each its own
    initializer so every layer's weight and bias is an initializer of its own name."""
    inits = {i.name: i for i in m.graph.initializer}
    keep = []
    for n in m.graph.node:
        if n.op_type == "Identity" and n.input[0] in inits:
            t = type(inits[n.input[0]])()
            t.CopyFrom(inits[n.input[0]])
            t.name = n.output[0]
            m.graph.initializer.append(t)
            inits[t.name] = t
        else:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)


def _scope_to_module(node_name: str) -> str | None:
    """'/layer2/down/down.0/Conv' -> 'layer2.down.0' (the legacy exporter's scope names)."""
    segs = [s for s in node_name.split("/")[:-1] if s]
    path: list[str] = []
    for seg in segs:
        if path and seg.startswith(path[-1] + "."):
            path[-1] = seg
        else:
            path.append(seg)
    return ".".join(path) or None


def _name_layers(m, quantizable: list[str]) -> dict[str, str]:
    """Rename each quantizable layer's node to the layer's qualified name.

    Matched by the weight initializer's name (through Identity nodes the exporter
    adds when it merges equal constants), else by the exporter's scope name.
    """
    alias = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Identity"}

    def source(t):
        seen = 0
        while t in alias and seen < 64:
            t, seen = alias[t], seen + 1
        return t
    cands = [n for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
             and len(n.input) > 1]
    by_weight = {source(n.input[1]): n for n in cands}
    by_scope = {_scope_to_module(n.name): n for n in cands}
    placed = {}
    for name in quantizable:
        node = by_weight.get(f"{name}.weight") or by_scope.get(name)
        if node is not None and node.name not in placed.values():
            placed[name] = node.name
            node.name = name
    return placed


def _each_layer(qmodel, sample, fn) -> None:
    """Run the fake-quant model on ``sample`` calling ``fn(name, input, output)`` at the
    first call of each quantized layer (nothing is kept: memory stays one layer's maps)."""
    done, hooks = set(), []
    for name, layer in quant_layers(qmodel):
        def hook(m, args, out, name=name):
            if name not in done:
                done.add(name)
                fn(name, args[0].detach(), out.detach())
        hooks.append(layer.register_forward_hook(hook))
    try:
        _run_torch(qmodel, sample)
    finally:
        for h in hooks:
            h.remove()


def _run_torch(model, sample):
    with torch.no_grad():
        out = model(*sample.values())
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [o.detach().numpy() for o in outs]


def generate_final_model(model, config_file, pth_file, output_dir):
    # The exported ONNX files and their checks are float32 between quantization points;
    # the FP16 edges of the NPU are added by the compiler, not baked into the files.
    with npu_numerics(False):
        return _generate_final_model(model, config_file, pth_file, output_dir)


def _generate_final_model(model, config_file, pth_file, output_dir):
    api._reject_wrapped(model, "generate_final_model")
    if getattr(model, api.INFO_ATTR, None) is not None:
        raise DoptError("generate_final_model expects a freshly built float model",
                        found="a model already processed by optimize_model",
                        hint="build the float model again (model = build_model()) and pass it")
    cfg = load_config(config_file)
    if not cfg.input_shape:
        raise DoptError("the configuration has no input_shape, which export needs",
                        file=cfg.path, field="input_shape",
                        hint="add \"input_shape\": \"x:1,3,224,224\" (the deployed input shape)")
    shapes = cfg.input_shapes
    state = load_state_dict(pth_file, what="quantized checkpoint")
    qmodel = api.optimize_model(copy.deepcopy(model).cpu(), config_file)
    load_into(qmodel, state, file=str(pth_file))
    qmodel.eval()
    quantized = [n for n, _ in quant_layers(qmodel)]
    missing = [n for n, q in quant_layers(qmodel) if not int(q.act.initialized)]
    if missing:
        raise DoptError(f"layer(s) {', '.join(missing)} have no activation range in the checkpoint",
                        file=str(pth_file), hint="calibrate (set_calibrate_state(model, True), "
                        "forward some data, set_calibrate_state(model, False)) or train before "
                        "saving the checkpoint")
    gen = torch.Generator().manual_seed(0)
    sample = {k: torch.randn((CHECK_SAMPLES,) + tuple(v[1:]), generator=gen)
              for k, v in shapes.items()}
    deploy = _deploy_model(qmodel)
    fused = _export_onnx(deploy, sample)
    all_layers = list(L.quantizable_layers(deploy))
    placed = _name_layers(fused, all_layers)
    lost = [n for n in quantized if n not in placed]
    if lost:
        raise DoptError(f"quantized layer(s) {', '.join(lost)} could not be located in the "
                        f"exported ONNX graph", hint="their weights must be used directly by the "
                        "convolution / linear call (no weight re-parametrization in forward)")
    graph = onnx_qdq.graph_layers(fused)
    doc = P.new_params({"name": "dopt", "version": dopt.__version__, "framework": "torch",
                        "torch": torch.__version__, "config": Path(cfg.path).name}, FUSED_NAME)
    by_name = {n.name: n for n in fused.graph.node}
    for name, q in quant_layers(qmodel):
        node = by_name[name]
        scale, offset = q.act.qparams()
        _wq, _bq, s_w = q.quantized_params()
        doc["layers"][name] = {
            "op_type": node.op_type, "strategy": "Quant_INT8-8", "source_layer": name,
            "input": {"tensor": node.input[0], "bits": 8, "scale": scale,
                      "offset": int(offset),
                      "range": [float(q.act.lo.item()), float(q.act.hi.item())],
                      "algorithm": q.act.algorithm},
            "weight": {"tensor": node.input[1], "bits": 8, "per_channel": True,
                       "symmetric": True, "scales": [float(s) for s in s_w.tolist()]},
            "bias": ({"tensor": node.input[2], "bits": 32}
                     if len(node.input) > 2 and node.input[2] else None),
            "folded_bn": getattr(q, "bn_name", None),
        }
    doc["float_layers"] = sorted(set(graph) - set(doc["layers"]))
    P.validate_params(doc, file=PARAM_NAME, graph=graph, expected_layers=quantized)
    qdq = onnx_qdq.build_qdq(fused, doc)

    feeds = {k: v.numpy() for k, v in sample.items()}
    ref_float = _run_torch(_unfused_float(qmodel), sample)
    got_float = onnx_qdq.ort_session(fused.SerializeToString()).run(None, feeds)
    check_float(ref_float, got_float)
    # the quantized layers one by one, each fed the fake-quant model's own input for it
    model_for = onnx_qdq.layer_models(qdq, quantized, feeds)

    def compare(name, x, y):
        sub, inp = model_for(name, x.shape)
        got = onnx_qdq.ort_session(sub.SerializeToString()).run(None, {inp: x.numpy()})
        check_quantized([y.numpy()], got, f"layer '{name}' of the QDQ ONNX model on ONNX "
                        "Runtime")
    _each_layer(qmodel, sample, compare)

    import onnx
    with staged_outputs(output_dir) as stage:
        onnx.save(fused, stage / FUSED_NAME)
        onnx.save(qdq, stage / QDQ_NAME)
        P.write_params(stage / PARAM_NAME, doc)
    out = Path(output_dir)
    return {"float_onnx": str(out / FUSED_NAME), "qdq_onnx": str(out / QDQ_NAME),
            "param_file": str(out / PARAM_NAME)}
