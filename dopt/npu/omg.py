"""``dopt omg``: the offline model compiler's command line, flags as the reference's OMG.

``--mode 0`` compiles an ONNX model (with ``--compress_conf`` for INT8 layers) into a
``.om``; ``--mode 1`` dumps a ``.om`` or a source model to JSON (and a dump back to
``.om``); ``--mode 3`` writes only the pre-check report. ``--strict`` (a dopt
addition) turns any CPU fallback into a failure, for CI gates.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..formats.strategy_config import parse_input_shape
from ..errors import DoptError
from ..formats.fileio import existing_file, write_json_atomic
from ..formats.qdq import load_model
from .gears import check_aipp as check_gears_aipp, log_lines, merge as merge_gears
from .gears import parse as parse_gears
from .rules import CPU

FRAMEWORKS = {0: "Caffe", 3: "TensorFlow", 5: "ONNX", 6: "MindSpore"}


def build_parser(prog="dopt omg") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Emulated NPU offline model compiler "
                                 "(reference OMG flags)")
    ap.add_argument("--mode", type=int, default=0, choices=(0, 1, 3),
                    help="0: generate the model, 1: model to JSON, 3: pre-check only")
    ap.add_argument("--model", help="source model file")
    ap.add_argument("--weight", help="weight file (Caffe only)")
    ap.add_argument("--framework", type=int, choices=sorted(FRAMEWORKS),
                    help="0 Caffe, 3 TensorFlow, 5 ONNX, 6 MindSpore")
    ap.add_argument("--output", help="output model path (.om is appended)")
    ap.add_argument("--om", help="offline model to dump with --mode 1")
    ap.add_argument("--json", help="JSON output path for --mode 1")
    ap.add_argument("--input_shape", help="'name:n,c,h,w;name2:...'")
    ap.add_argument("--input_format", choices=("NCHW", "NHWC"))
    ap.add_argument("--input_type", help="'name:FP16;name2:UINT8' (the reference's tables, "
                    "docs/omg.md)")
    ap.add_argument("--output_type", help="'name:FP16;name2:UINT8'")
    ap.add_argument("--input_fp16_nodes", help="'node1;node2' (no effect for ONNX)")
    ap.add_argument("--is_output_fp16", help="'false,true,...' (no effect for ONNX)")
    ap.add_argument("--out_nodes")
    ap.add_argument("--check_report", help="pre-check report path (JSON)")
    ap.add_argument("--insert_op_conf", help="AIPP config file (docs/omg.md)")
    ap.add_argument("--op_name_map")
    ap.add_argument("--compress_conf", help="quantization parameter file from dopt")
    ap.add_argument("--weight_data_type", choices=("FP16", "FP32"), default="FP16")
    ap.add_argument("--dynamic_dims", help="gears for the -1 dims of --input_shape: '1;2;4' "
                    "or 'h1,w1;h2,w2' (at most 16)")
    ap.add_argument("--target", choices=("om", "omc"), default="om")
    ap.add_argument("--platform")
    ap.add_argument("--profile", default="kirin9000", help="hardware profile (dopt addition)")
    ap.add_argument("--strict", action="store_true",
                    help="fail if any operator falls back to the CPU (dopt addition)")
    return ap


def _load_onnx(path: str):
    return load_model(path, field="--model", purpose="Compiling ONNX models")


def _load_source(a, shapes, params):
    """``(onnx model, params, shapes, out_nodes)`` for the compiler.

    ONNX is read as is. Another framework's file goes through the adapter that converts
    it (``dopt_convert_model``: TensorFlow via tf2onnx), which applies ``--input_shape`` and
    ``--out_nodes`` itself and re-keys the parameter file onto the converted graph.
    """
    if a.framework == 5:
        return _load_onnx(a.model), params, shapes, a.out_nodes
    from ..plugin_manager import get_plugin_manager
    converted = get_plugin_manager().hook.dopt_convert_model(
        framework=a.framework, model_path=a.model, input_shapes=shapes, out_nodes=a.out_nodes,
        params=params, params_file=a.compress_conf)
    if converted is None:
        raise DoptError(f"no installed dopt adapter converts {FRAMEWORKS[a.framework]} models",
                        field="--framework", hint="pip install 'dopt[tf]'")
    model, params = converted
    return model, params, None, None


def _check_framework(a) -> None:
    if a.framework is None:
        raise DoptError("--framework is required with --mode 0 or 3", field="--framework",
                        expected="5 (ONNX) or 3 (TensorFlow)")
    if a.framework in (0, 6):
        raise DoptError(f"{FRAMEWORKS[a.framework]} models are not supported by dopt",
                        field="--framework", hint=f"convert the {FRAMEWORKS[a.framework]} model "
                        "to ONNX and pass --framework 5")


def _warn_fp16(report: dict) -> None:
    """Say, at compile time, which layers FP16 cannot hold (the details are in the report)."""
    import sys
    rows = report["fp16_range"]
    shown = "; ".join(f"{r['node']} ({r['kind']}, output range [{r['range'][0]:.3g}, "
                      f"{r['range'][1]:.3g}])" for r in rows[:5])
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    print(f"WARNING: FP16 range: {len(rows)} NPU layer(s) leave what FP16 holds on the sample "
          f"inputs: {shown}{more}. Their outputs on the NPU will be inf/NaN (overflow) or lose "
          f"their signal (underflow). Fix: scale the layer, keep it on the CPU in FP32, or "
          f"quantize it.", file=sys.stderr)


def _warn_drift(report: dict) -> None:
    """Say, at compile time, that FP16 moves the network's outputs past the bound."""
    import sys
    d = report.get("fp16_drift") or {}
    if not d.get("exceeded"):
        return
    out, worst = max(d["outputs"].items(), key=lambda kv: kv[1])
    print(f"WARNING: FP16 drift: with every NPU kernel's output in FP16, output {out} moves by "
          f"{worst:.2g} of its range on the sample inputs (bound {d['tolerance']:g}); the drift "
          f"first passes the bound at {d['first']}. Fix: check the accuracy on real data before "
          f"deploying in FP16 (dopt deploy's accuracy gate), or keep the layers from "
          f"{d['first']} on on the CPU in FP32.", file=sys.stderr)


def run_precheck(a) -> int:
    from .compiler import analyze
    from .costmodel import estimate
    from .precheck import render_text
    from .profile import load_profile
    from ..formats import param_file as P

    _check_framework(a)
    if not a.model:
        raise DoptError("--model is required", field="--model")
    shapes = parse_input_shape(a.input_shape, source="--input_shape", allow_dynamic=True) \
        if a.input_shape else None
    dyn = parse_gears(a.dynamic_dims, shapes, input_format=a.input_format)
    specs = _aipp_specs(a)
    doc = P.read_params(a.compress_conf) if a.compress_conf else None
    model, doc, shapes, out_nodes = _load_source(a, shapes, doc)
    profile = load_profile(a.profile)
    if dyn or specs:   # the compile path: AIPP rows and one estimate per gear
        om, report = _compile(a, model, profile, doc, shapes, out_nodes, specs, dyn, None)
        est = om.meta["estimate"]
    else:
        _m, g, report = analyze(model, profile, params=doc, params_file=a.compress_conf,
                                input_shapes=shapes, out_nodes=out_nodes,
                                source=a.model)   # the graph --mode 0 compiles
        est = estimate(g, report, profile)
        om = None
    if report["fp16_range"]:
        _warn_fp16(report)
    _warn_drift(report)
    report["model"] = a.model
    report["estimate"] = {"label": est["label"], "summary": est["summary"]}
    dest = a.check_report or "check_report.json"
    write_json_atomic(dest, report)
    print(render_text(report))
    print(f"\nestimated NPU latency: {est['summary']['total_text']}; {est['label']}")
    if om is not None:
        for line in log_lines(om):
            print(line)
    print(f"\ncheck report: {dest}")
    if a.strict and report["summary"][CPU]:
        _refuse_fallback(report)
    return 0


def _aipp_specs(a):
    if not a.insert_op_conf:   # checked before the (slower) model load
        return None
    from .aipp_config import parse_file
    return parse_file(a.insert_op_conf)


def _onnx_shapes(shapes, model):
    """``--input_shape`` names onto the ONNX graph's inputs (a TensorFlow model converted by
    tf2onnx names its inputs ``name:0``)."""
    if not shapes:
        return shapes
    names = {i.name for i in model.graph.input}
    return {(n if n in names or f"{n}:0" not in names else f"{n}:0"): d
            for n, d in shapes.items()}


def _compile(a, model, profile, doc, shapes, out_nodes, specs, dyn, op_map):
    """``(om, report)``: one static build, or one build per ``--dynamic_dims`` gear merged
    into one ``.om`` (the report is gear 0's, with every gear's summary under ``gears``)."""
    from .compiler import Handover, compile_onnx
    if not isinstance(model, Handover):
        model = Handover(model)

    def build(input_shapes, last=True):
        # the model loaded from --model is needed by nothing after its last build: handed
        # over for good (no reference left here, so its memory goes with its weights)
        return compile_onnx(model if last else model.peek(), profile, params=doc,
                            params_file=a.compress_conf, input_shapes=input_shapes,
                            out_nodes=out_nodes, weight_data_type=a.weight_data_type,
                            op_name_map=op_map, source=a.model, aipp=specs,
                            aipp_file=a.insert_op_conf, consume=last)
    if not dyn:
        return build(shapes)
    check_gears_aipp(dyn, specs, [i.name for i in model.peek().graph.input])
    builds = []
    for gear in dyn["gears"]:
        print(f"compiling gear {len(builds) + 1}/{len(dyn['gears'])}: "
              + "; ".join(f"{n}:{','.join(map(str, d))}" for n, d in gear["shapes"].items()),
              flush=True)
        builds.append(build(_onnx_shapes({n: tuple(d) for n, d in gear["shapes"].items()},
                                         model.peek()),
                            last=len(builds) + 1 == len(dyn["gears"])))
    om = merge_gears(dyn, builds)
    report = builds[0][1]
    report["gears"] = [{"dims": x["dims"], "shapes": x["shapes"], "summary": x["summary"],
                        "estimate": x["estimate"], "outputs": x["outputs"]}
                       for x in om.graph["dynamic"]["gears"]]
    return om, report


def _io_types(a):
    """``--input_type`` / ``--output_type`` parsed (syntax only: names and tables are checked
    against the compiled graph)."""
    from .iotypes import parse_types
    return (parse_types(a.input_type, flag="--input_type") if a.input_type else None,
            parse_types(a.output_type, flag="--output_type") if a.output_type else None)


def _apply_io_types(a, om, types) -> None:
    """Declare the offline model's input/output data types (the reference's three tables);
    ``--input_fp16_nodes`` / ``--is_output_fp16`` take effect for TensorFlow only."""
    from .iotypes import apply, legacy_flags
    in_t, out_t, notes = legacy_flags(a.input_fp16_nodes, a.is_output_fp16,
                                      framework=a.framework, input_type=types[0],
                                      output_type=types[1],
                                      outputs=[o["name"] for o in om.graph["outputs"]])
    for line in notes + apply(om, in_t, out_t, file=a.model):
        print(line)


def _om_path(output: str) -> str:
    return output if output.endswith(".om") else output + ".om"


def run_compile(a) -> int:
    from . import omfile
    from .compiler import Handover, parse_op_name_map
    from .precheck import render_text
    from .profile import load_profile
    from ..formats import param_file as P

    _check_framework(a)
    for flag in ("model", "output"):
        if not getattr(a, flag):
            raise DoptError(f"--{flag} is required with --mode 0", field=f"--{flag}")
    if a.target != "om":
        raise DoptError("only --target om is produced by the emulated compiler",
                        field="--target", expected="om", found=a.target)
    dest = _om_path(a.output)
    profile = load_profile(a.profile)
    shapes = parse_input_shape(a.input_shape, source="--input_shape", allow_dynamic=True) \
        if a.input_shape else None
    dyn = parse_gears(a.dynamic_dims, shapes, input_format=a.input_format)
    specs = _aipp_specs(a)
    types = _io_types(a)   # checked before the (slower) model load
    doc = P.read_params(a.compress_conf) if a.compress_conf else None
    model, doc, shapes, out_nodes = _load_source(a, shapes, doc)
    model = Handover(model)   # the only reference: the compiler frees it with its weights
    op_map = parse_op_name_map(a.op_name_map, profile) if a.op_name_map else None
    om, report = _compile(a, model, profile, doc, shapes, out_nodes, specs, dyn, op_map)
    _apply_io_types(a, om, types)
    report["model"] = a.model
    if a.strict and report["summary"][CPU]:
        _refuse_fallback(report)
    print(render_text(report))
    if report["fp16_range"]:
        _warn_fp16(report)
    _warn_drift(report)
    for line in log_lines(om):
        print(line)
    omfile.write_om(dest, om)
    if a.check_report:
        write_json_atomic(a.check_report, report)
    size = Path(dest).stat().st_size
    est = om.meta.get("estimate") or {}
    total = (est.get("summary") or {}).get("total_ms")
    print(f"\nwrote {dest}: {size / 1e6:.3f} MB, {len(om.graph['kernels'])} kernels, "
          f"{len(om.quant['int8_layers'])} INT8 layers"
          + (f", estimated latency {(est.get('summary') or {}).get('total_text')}"
             if total is not None else ""))
    return 0


def _refuse_fallback(report) -> None:
    cpu = [x["node"] for x in report["nodes"] if x["outcome"] == CPU]
    raise DoptError(f"{len(cpu)} operator(s) would fall back to the CPU: {', '.join(cpu)}",
                    field="--strict", hint="see the check report for the reasons, or drop "
                    "--strict to compile with a CPU partition")


def run_dump(a) -> int:
    """``--mode 1``: .om -> JSON, source model -> JSON, or a JSON dump -> .om (``--output``)."""
    import json
    from . import omfile
    if (a.om or a.model) and not a.json:
        raise DoptError("--json is required with --mode 1", field="--json")
    if a.om:
        write_json_atomic(a.json, omfile.to_json(omfile.read_om(a.om)))
        print(f"wrote {a.json}")
        return 0
    if a.model:
        _check_framework(a)
        from google.protobuf import json_format
        model = _load_source(a, None, None)[0]
        write_json_atomic(a.json, json_format.MessageToDict(model))
        print(f"wrote {a.json}")
        return 0
    if a.json and a.output:
        p = existing_file(a.json, field="--json", max_bytes=omfile.MAX_FILE * 2,
                          what="JSON dump")
        try:
            doc = json.loads(p.read_text("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DoptError(f"the JSON dump is not valid JSON ({e})", file=a.json) from None
        dest = _om_path(a.output)
        omfile.write_om(dest, omfile.from_json(doc, file=a.json))
        print(f"wrote {dest}")
        return 0
    raise DoptError("--mode 1 needs --om (dump a .om), --model (dump a source model) or "
                    "--json with --output (rebuild a .om from its dump)", field="--mode")


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.mode == 3:
        return run_precheck(a)
    if a.mode == 1:
        return run_dump(a)
    return run_compile(a)
