"""``dopt_so``: the reference tool's no-training quantization command line, verbatim.

    dopt_so --framework 5 --mode 0 --model ./m.onnx --cal_conf ./config.prototxt \\
            --output ./m_quant.onnx --input_shape input:1,3,128,128 --compress_conf ./m_param

``--framework 5`` takes an ``.onnx`` model or a PyTorch model-definition ``.py`` with
``--weight net.pth``; ``--framework 3`` a TensorFlow model (TensorFlow adapter). The
adapter that claims the file (``dopt_claim_file``) does the work; this module parses the
flags, enforces the reference's path rules, reads ``config.prototxt`` and opens the
calibration set. Outputs appear whole or not at all; errors are one paragraph, exit 2.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import PurePath

from .. import plugin_manager
from ..calib import sets as calibset
from ..calib.loop import resolve_algorithm
from ..formats.strategy_config import parse_input_shape
from ..errors import DoptError, run_cli
from ..formats.fileio import check_output_path
from ..ptq import DEFAULT_BIAS_CORRECTION, DEFAULT_EQUALIZATION, PtqJob
from ..calib.prototxt import load_so_config

FRAMEWORKS = {3: "TensorFlow", 5: "PyTorch or ONNX"}
_DIR_RE = re.compile(r"^[A-Za-z0-9_]+$")
_FILE_RE = re.compile(r"^[A-Za-z0-9_.]+$")
PATH_FLAGS = ("model", "weight", "cal_conf", "output", "compress_conf")
# what --output must look like for each input kind ("same format as the input")
OUTPUT_SUFFIXES = {"onnx": (".onnx",), "torch": (".pt", ".pth"), "tensorflow": (".pb",)}


def check_path_rules(flag: str, value: str) -> None:
    """The reference's rules: directories [A-Za-z0-9_], file names [A-Za-z0-9_.]."""
    parts = PurePath(value).parts
    if not parts:
        raise DoptError("the path is empty", field=f"--{flag}")
    *dirs, name = parts
    if flag == "model" and name.count(":") == 1 and name.split(":")[1].isidentifier():
        name = name.split(":")[0]  # net.py:ClassName (dopt's addition)
    for d in dirs:
        if d in ("/", ".", "..") or _DIR_RE.match(d):
            continue
        bad = sorted({c for c in d if not (c.isascii() and (c.isalnum() or c == "_"))})
        raise DoptError(f"directory '{d}' in the path contains {''.join(bad)!r}", file=value,
                        field=f"--{flag}",
                        expected="directory names of letters, digits and '_' (the reference "
                                 "tool's rule)",
                        hint="move or link the file under such a path, or pass "
                             "--relax_path_rules")
    if not _FILE_RE.match(name) or name in (".", ".."):
        bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "_."))})
        raise DoptError(f"file name '{name}' contains {''.join(bad)!r}", file=value,
                        field=f"--{flag}",
                        expected="file names of letters, digits, '_' and '.' (the reference "
                                 "tool's rule)",
                        hint="rename the file, or pass --relax_path_rules")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dopt_so", description="No-training INT8 quantization with a calibration set "
        "(the reference tool's dopt_so flags).")
    ap.add_argument("-m", "--mode", type=int, required=True, choices=[0],
                    help="0: no-training mode (the only mode)")
    ap.add_argument("--framework", type=int, required=True, choices=sorted(FRAMEWORKS),
                    help="3: TensorFlow; 5: PyTorch or ONNX")
    ap.add_argument("--model", required=True,
                    help="model file: .onnx, PyTorch model-definition .py, or TensorFlow .pb")
    ap.add_argument("--weight", help="PyTorch weights (.pth state dict)")
    ap.add_argument("--cal_conf", required=True, help="config.prototxt")
    ap.add_argument("--output", required=True, help="quantized model file")
    ap.add_argument("--input_format", choices=("NCHW", "NHWC"), default=None,
                    help="layout of the model input (default NCHW; ignored for PyTorch)")
    ap.add_argument("--input_shape", required=True,
                    help='"name:n,c,h,w;name2:..." (PyTorch: forward() argument names)')
    ap.add_argument("--out_nodes", help='"node1;node2" (ignored for PyTorch)')
    ap.add_argument("--compress_conf", required=True,
                    help="quantization parameter file to write (for dopt omg --compress_conf)")
    ap.add_argument("--device_idx", type=int, default=0, help="GPU index (default 0)")
    ap.add_argument("--relax_path_rules", action="store_true",
                    help="(dopt) accept any path, not only the reference's characters")
    return ap


def _claim(framework: int, model: str) -> str:
    claims = [c for c in plugin_manager.get_plugin_manager().hook.dopt_claim_file(
        framework=framework, model_path=model) if c]
    if claims:
        return claims[0]
    low = model.lower()
    if framework == 3:
        raise DoptError("no installed dopt adapter quantizes TensorFlow models", file=model,
                        field="--framework", hint="pip install 'dopt[tf]'")
    if low.endswith(".py"):
        raise DoptError("no installed dopt adapter quantizes PyTorch models", file=model,
                        field="--model", hint="pip install 'dopt[torch]'")
    if low.endswith(".onnx"):
        raise DoptError("no installed dopt adapter quantizes ONNX models", file=model,
                        field="--model", hint="pip install 'dopt[onnx]'")
    raise DoptError("--framework 5 takes an .onnx model or a PyTorch model-definition .py",
                    file=model, field="--model",
                    expected="a file name ending in .onnx or .py",
                    hint="for TensorFlow models use --framework 3")


def _log(msg: str) -> None:
    print(f"dopt_so: {msg}", file=sys.stderr, flush=True)


def make_job(a, log=_log) -> tuple[str, PtqJob, list]:
    if not a.relax_path_rules:
        for flag in PATH_FLAGS:
            v = getattr(a, flag)
            if v is not None:
                check_path_rules(flag, v)
    adapter = _claim(a.framework, a.model)
    suffixes = OUTPUT_SUFFIXES.get(adapter)
    if suffixes and not a.output.lower().endswith(suffixes):
        raise DoptError("--output must name a file of the input's format", file=a.output,
                        field="--output", expected=" or ".join(suffixes))
    if adapter == "torch":
        if not a.weight:
            raise DoptError("a PyTorch model needs its weights", field="--weight",
                            expected="--weight net.pth (a state dict)")
        for flag in ("out_nodes", "input_format"):
            if getattr(a, flag):
                log(f"--{flag} is not used for PyTorch models (as in the reference tool)")
    elif a.weight:
        log("--weight is only used for PyTorch models; ignored")
    check_output_path(a.output, field="--output")
    check_output_path(a.compress_conf, field="--compress_conf")
    cfg = load_so_config(a.cal_conf)
    text = a.input_shape.replace("，", ",").replace("；", ";")
    shapes = parse_input_shape(text, source="--input_shape")
    input_format = "NCHW" if adapter == "torch" else (a.input_format or "NCHW")
    readers = calibset.open_all(cfg, shapes, input_format)
    names = list(shapes)
    batch = cfg.batch_size or max(1, next(iter(shapes.values()))[0])
    available = min(r.num_samples for r in readers)
    limit = min(available, cfg.calibration_samples) if cfg.calibration_samples else available
    log(f"calibration set: {limit} sample(s) of {available} "
        + ", ".join(f"{n} <- {r.kind} {r.source}" for n, r in zip(names, readers)))

    def feeds():
        return calibset.iter_feeds(readers, names, batch, limit)

    job = PtqJob(framework=a.framework, model=a.model, weight=a.weight, output=a.output,
                 compress_conf=a.compress_conf, input_shapes=shapes, feeds=feeds,
                 num_samples=limit,
                 algorithm=resolve_algorithm(cfg.calibration_algorithm, file=cfg.path),
                 input_format=input_format, out_nodes=a.out_nodes, exclude=list(cfg.exclude_op),
                 equalization=(DEFAULT_EQUALIZATION if cfg.equalization is None
                               else cfg.equalization),
                 bias_correction=(DEFAULT_BIAS_CORRECTION if cfg.bias_correction is None
                                  else cfg.bias_correction),
                 use_gpu=cfg.device == "USE_GPU", device_idx=a.device_idx,
                 config_file=cfg.path, progress=sys.stderr.isatty(), log=log)
    return adapter, job, readers


def run(argv=None, log=_log) -> dict:
    a = build_parser().parse_args(argv)
    adapter, job, readers = make_job(a, log)
    try:
        written = plugin_manager.get_plugin_manager().hook.dopt_quantize_file(
            adapter=adapter, job=job)
    finally:
        for r in readers:
            r.close()
    if written is None:
        raise DoptError(f"the '{adapter}' adapter does not implement no-training quantization")
    return written


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-c"], ["--config"]) or any(a.startswith("--config=") for a in argv[:1]):
        # the reference's training entry: `python3 dopt_so.py -c scen.yaml` (NASEA)
        from ..nas.cli import main as nas_main
        return nas_main(argv)

    def body():
        for kind, path in run(argv).items():
            print(f"{kind}: {path}")
        return 0
    return run_cli("dopt_so", body, interrupted="interrupted; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
