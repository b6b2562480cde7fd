"""``dopt`` command line: scriptable, CI-friendly wrappers around the Python API.

Every user error prints one paragraph on stderr and exits 2; nothing is half-written.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from ..errors import DoptError, run_cli


def _adapters(a):
    from .. import plugin_manager as pm
    for name, info in sorted(pm.adapters().items()):
        print(f"{name}: {info.get('framework')} (extra dopt[{info.get('extra')}]) - "
              f"{', '.join(info.get('operations', []))}")
    print("activation range algorithms: " + ", ".join(sorted(pm.range_algorithms())))
    for name, why in pm.get_plugin_manager().broken.items():
        print(f"broken plugin {name}: {why}")
    return 0


def _torch_config(a):
    from .. import userpy
    from ..dopt_torch.opt_main import generate_config_file
    model = userpy.build(a.model)
    generate_config_file(model, a.input_shape, dst_path=a.output)
    print(f"wrote {a.output}")
    return 0


def _torch_final(a):
    from .. import userpy
    from ..dopt_torch.opt_main import generate_final_model
    model = userpy.build(a.model)
    files = generate_final_model(model, a.config, pth_file=a.weight, output_dir=a.output_dir)
    for k, v in files.items():
        print(f"{k}: {v}")
    return 0


def _check_params(a):
    from ..formats import param_file as P
    doc = P.read_params(a.param_file)
    graph = None
    if a.model:
        from ..formats import qdq as onnx_qdq
        import onnx
        try:
            m = onnx.load(a.model, load_external_data=False)
        except Exception as e:
            raise DoptError(f"cannot read the ONNX model ({e.__class__.__name__})",
                            file=a.model) from None
        graph = onnx_qdq.graph_layers(m)
    P.validate_params(doc, file=a.param_file, graph=graph)
    print(json.dumps({"file": a.param_file, "layers": len(doc["layers"]), "valid": True}))
    return 0


MAX_INPUT_BYTES = 2 << 30


def _load_array(spec: str, default_name: str | None) -> tuple[str, object]:
    import numpy as np
    from ..formats.fileio import existing_file
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = default_name, spec
    p = existing_file(path, field="--input", max_bytes=MAX_INPUT_BYTES, what="input file")
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise DoptError(f"cannot read the input as a NumPy .npy file ({e.__class__.__name__})",
                        file=path, field="--input", hint="save it with numpy.save") from None
    if name is None:
        raise DoptError("the model has several inputs: name each one", field="--input",
                        expected="--input name=file.npy")
    return name, arr


def _aipp_params(path: str) -> dict:
    """``dopt run --aipp params.json``: a dynamic AIPP's run-time parameters, the config's
    field names (``{"crop_size_w": 100, ...}``, or ``{kernel: {...}}`` for several)."""
    from ..formats.fileio import existing_file
    p = existing_file(path, field="--aipp", max_bytes=1 << 20, what="AIPP parameter file")
    try:
        doc = json.loads(p.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DoptError(f"the AIPP parameter file is not valid JSON ({e})", file=path,
                        field="--aipp", expected='an object such as {"crop_size_w": 100}') \
            from None
    if not isinstance(doc, dict):
        raise DoptError("the AIPP parameter file must hold one JSON object", file=path,
                        field="--aipp", expected='{"crop_size_w": 100, ...}',
                        found=type(doc).__name__)
    return doc


def _run(a):
    import numpy as np
    from .. import runtime
    from ..formats.fileio import atomic_path
    sess = runtime.load(a.om, device=a.device, engine=a.engine, threads=a.threads,
                        verify_with=a.verify_signature)
    if a.verify_signature:
        print(f"signature: verified ({a.om}'s folder, key {a.verify_signature})")
    default = sess.inputs[0]["name"] if len(sess.inputs) == 1 else None
    feeds = dict(_load_array(s, default) for s in a.input or [])
    if a.report:
        from ..npu.costmodel import render_text
        if sess.estimate:
            print(render_text(sess.estimate))
        print("placement: " + ", ".join(f"{k} {v}" for k, v in sess.om.meta["summary"].items()))
        for g in sess.gears:
            print(f"gear {g['index']} dims {g['dims']}: inputs {g['shapes']}, estimated "
                  f"{g['estimate'].get('total_text', '-')}")
    if a.verify:
        from ..runtime.verify import kernel_agreement
        small = {k: v[:8] for k, v in sess.prepare_feeds(feeds).items()}
        rows = kernel_agreement(sess.om, small, npu=a.device == "npu")
        bad = [r for r in rows if not r["within_bound"]]
        int8 = [r for r in rows if r["precision"] == "int8"]
        print(f"verify: {len(rows)} kernel outputs, {sum(r['exact'] for r in int8)}/{len(int8)} "
              f"INT8 bit-exact, {len(bad)} outside the bound")
        if bad:
            raise DoptError("the fast engine disagrees with the reference interpreter on "
                            + ", ".join(r["kernel"] for r in bad[:10]), field="--verify")
    if not feeds:
        return 0
    outs = sess.run(feeds, aipp=_aipp_params(a.aipp) if a.aipp else None)
    for k, v in outs.items():
        print(f"{k}: shape {list(v.shape)} dtype {v.dtype}")
    bad = [k for k, v in outs.items() if np.issubdtype(v.dtype, np.floating)
           and not np.all(np.isfinite(v))]
    if bad and a.report:
        from ..runtime.reference import first_nonfinite
        first = {k: v[:1] for k, v in sess.prepare_feeds(feeds).items()}
        hit = first_nonfinite(sess.om, first, npu=a.device == "npu")
        where = (f"kernel '{hit['kernel']}' ({hit['op']}) first produced inf/NaN "
                 f"({hit['nonfinite']} value(s) in {hit['tensor']}; largest finite input "
                 f"magnitude {hit['max_abs_input']:.3g})" if hit else
                 "the first sample is finite; another sample produced it")
        print(f"FP16 range: output(s) {', '.join(bad)} hold inf/NaN: {where}. Fix: scale that "
              f"layer, keep it on the CPU in FP32, or quantize it (see the pre-check's "
              f"fp16_range findings)")
    if a.output:
        with atomic_path(a.output) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **outs)
        print(f"wrote {a.output}")
    return 0


# Sub-commands that parse their own flags: name -> (module, function taking argv, help).
DELEGATED: dict[str, tuple[str, str, str]] = {
    "omg": ("..npu.omg", "main", "emulated offline model compiler (reference OMG flags)"),
    "deploy": ("..deploy.cli", "deploy_main",
               "convert, quantize, compile, evaluate, gate and sign in one run (deploy.yaml)"),
    "sensitivity": ("..deploy.cli", "sensitivity_main",
                    "per-layer quantization sensitivity table, JSON and chart"),
    "sign": ("..deploy.cli", "sign_main", "sign a deployment folder"),
    "verify": ("..deploy.cli", "verify_main", "verify a signed deployment folder"),
    "nas": ("..nas.cli", "main", "hardware-aware architecture search (scen.yaml)"),
    "prune": ("..prune.cli", "main",
              "NPU-aware structured pruning + distillation fine-tuning (net.py + .pth)"),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dopt", description="dopt: models to a mobile NPU")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("adapters", help="list installed adapters and plugins")
    s.set_defaults(fn=_adapters)
    s = sub.add_parser("torch-config", help="write the per-layer strategy JSON for a torch model")
    s.add_argument("--model", required=True, help="net.py:Name (class or builder function)")
    s.add_argument("--input_shape", required=True, help="'x:1,3,224,224'")
    s.add_argument("--output", default="./config_gen.json")
    s.set_defaults(fn=_torch_config)
    s = sub.add_parser("torch-final", help="generate_final_model from the command line")
    s.add_argument("--model", required=True, help="net.py:Name building the float model")
    s.add_argument("--config", required=True)
    s.add_argument("--weight", required=True, help="quant checkpoint (.pth state dict)")
    s.add_argument("--output_dir", default="./")
    s.set_defaults(fn=_torch_final)
    # listed for --help; each parses its own flags (`dopt <command> -h`)
    for name, (_mod, _fn, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    s = sub.add_parser("run", help="run a compiled .om on the emulated NPU (or the CPU)")
    s.add_argument("--om", required=True, help="compiled model")
    s.add_argument("--input", action="append", help="file.npy, or name=file.npy per input")
    s.add_argument("--output", help="write the outputs to this .npz")
    s.add_argument("--device", choices=("npu", "cpu"), default="npu")
    s.add_argument("--engine", choices=("fast", "reference"), default="fast")
    s.add_argument("--threads", type=int, default=0,
                   help="CPU threads of the emulation (0: as many as the machine offers)")
    s.add_argument("--aipp", metavar="PARAMS_JSON",
                   help="run-time parameters of a dynamic AIPP (JSON object, config field names)")
    s.add_argument("--report", action="store_true",
                   help="print the placement and the per-layer performance estimate")
    s.add_argument("--verify", action="store_true",
                   help="check the fast engine against the reference interpreter, per kernel")
    s.add_argument("--verify-signature", metavar="PUBLIC_KEY",
                   help="refuse the .om unless its folder is a signed build (dopt sign) that "
                        "verifies with this public key")
    s.set_defaults(fn=_run)
    s = sub.add_parser("check-params", help="validate a quantization parameter file")
    s.add_argument("param_file")
    s.add_argument("--model", help="the ONNX model the records must match")
    s.set_defaults(fn=_check_params)
    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in DELEGATED:
        mod, attr, _ = DELEGATED[argv[0]]

        def fn():
            return getattr(importlib.import_module(mod, __package__), attr)(argv[1:])
    else:
        a = build_parser().parse_args(argv)

        def fn():
            return a.fn(a)
    return run_cli("dopt", fn)


if __name__ == "__main__":
    sys.exit(main())
