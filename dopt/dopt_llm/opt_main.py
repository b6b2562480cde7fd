"""The reference's LLM entry points (``demo.py`` / ``run.sh``), same names and flags.

``parse_args`` reads the run.sh flags, ``generate_quant_config`` writes the per-layer
``dopt_config.json`` the user then edits, ``llm_quant_pipline`` (the reference's spelling;
``llm_quant_pipeline`` is the same function) runs one stage. Everything a user gives is
checked here, before the model is loaded; the work itself is the ``llm`` adapter's, reached
through the hook dispatch so this module imports no framework.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import DoptError
from ..log import Logger
from ..quant.lowbit import ACT_BITS, WEIGHT_BITS
from .config import (OptimizeConfig, check_bits, check_group_size, load_optimize_config,
                     read_json)

__all__ = ["parse_args", "generate_quant_config", "llm_quant_pipline", "llm_quant_pipeline",
           "LlmJob", "STAGE_OUTPUTS"]

STAGES = ("stage1", "stage2", "stage3")
# what each stage writes into --output-dir, and what the next stage needs
STAGE_OUTPUTS = {"stage1": "trained_quant_weight.pth", "stage2": "trained.pth",
                 "stage3": "fake_quant_weight.pth"}
PARAMS_FILE = "quant_params.json"


def _str2bool(v) -> bool:
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("1", "true", "yes", "y"):
        return True
    if str(v).lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="dopt LLM low-bit quantization (Quant_INT16-4): stage1 weight quantization, "
                    "stage2 activation calibration, stage3 parameter extraction")
    p.add_argument("--model-path", required=True,
                   help="HuggingFace model directory (AutoModelForCausalLM), or a .gguf file")
    p.add_argument("--dopt-config", required=True,
                   help="per-layer dopt_config.json (written by the first stage1 run)")
    p.add_argument("--optimize-config", default="config.yaml", help="config.yaml")
    p.add_argument("--quant-stage", choices=STAGES, default="stage1")
    p.add_argument("--group-size", type=int, default=128,
                   help="weight group size for entries of dopt_config.json that give none")
    p.add_argument("--act-bits", type=int, default=16, help="activation bits (16)")
    p.add_argument("--w-bits", type=int, default=4, help="weight bits: 2, 3, 4 or 8")
    p.add_argument("--output-dir", default="./train_output")
    p.add_argument("--hf-type-save", nargs="?", const=True, default=False, type=_str2bool,
                   help="stage3 also saves a HuggingFace model folder with the fake-quant "
                        "weights (output-dir/hf_model)")
    p.add_argument("--export-onnx", default=None, metavar="PATH",
                   help="dopt addition: stage3 also exports the simulated model to ONNX")
    return p


_last_args: dict = {}


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    # demo.py calls generate_quant_config(model_path, dopt_config) without the bit widths:
    # the run.sh values parsed here are what the generated file gets
    _last_args.update(w_bits=args.w_bits, group_size=args.group_size, act_bits=args.act_bits)
    return args


def _adapter_hook(op: str):
    from ..plugin_manager import adapters, get_plugin_manager
    if "llm" not in adapters():
        raise DoptError("LLM quantization needs the dopt 'llm' adapter, which is not installed",
                        hint="pip install 'dopt[llm]'")
    return getattr(get_plugin_manager().hook, op)


def generate_quant_config(model_path, dopt_config, *, w_bits: int | None = None,
                          group_size: int | None = None, act_bits: int | None = None):
    """Write ``dopt_config.json``: every quantizable layer of the model with its strategy.

    Bit widths and group size not given come from the last ``parse_args`` (run.sh's
    ``--w-bits/--group-size/--act-bits``), else 4 / 128 / 16.
    """
    w_bits = _last_args.get("w_bits", 4) if w_bits is None else w_bits
    group_size = _last_args.get("group_size", 128) if group_size is None else group_size
    act_bits = _last_args.get("act_bits", 16) if act_bits is None else act_bits
    check_bits(w_bits, field="--w-bits")
    check_group_size(group_size, field="--group-size")
    check_bits(act_bits, field="--act-bits", allowed=ACT_BITS)
    from ..formats.fileio import check_output_path
    check_output_path(dopt_config, field="--dopt-config")
    hook = _adapter_hook("dopt_llm_generate_config")
    return hook(adapter="llm", model_path=str(model_path), dst_path=str(dopt_config),
                defaults={"w_bits": w_bits, "group_size": group_size, "act_bits": act_bits})


@dataclass
class LlmJob:
    """One validated stage run, handed to the adapter."""
    model_path: str
    config: OptimizeConfig
    dopt_config: str
    dopt_config_data: dict
    output_dir: str
    hf_type_save: bool
    quant_stage: str
    group_size: int
    act_bits: int
    w_bits: int
    export_onnx: str | None = None

    def out(self, name: str) -> Path:
        return Path(self.output_dir) / name


def _check_stage_input(job: LlmJob) -> None:
    need = {"stage2": ("stage1", STAGE_OUTPUTS["stage1"]),
            "stage3": ("stage2", STAGE_OUTPUTS["stage2"])}.get(job.quant_stage)
    if need and not job.out(need[1]).is_file():
        raise DoptError(f"{job.quant_stage} needs the output of {need[0]}, which is missing",
                        file=str(job.out(need[1])),
                        hint=f"run {need[0]} first with the same --output-dir "
                             f"(bash run.sh {need[0]})")


def _check_model_path(model_path) -> None:
    p = Path(model_path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return
    if not p.is_dir():
        raise DoptError("the model path is neither a HuggingFace model folder nor a .gguf file",
                        file=str(model_path), field="--model-path",
                        hint="pass the folder that holds config.json (as given to "
                             "AutoModelForCausalLM.from_pretrained)")
    if not (p / "config.json").is_file():
        raise DoptError("the model folder has no config.json", file=str(model_path),
                        field="--model-path",
                        hint="pass the folder written by save_pretrained")


def llm_quant_pipline(model_path, config_yaml, dopt_config, output_dir, hf_type_save=False,
                      quant_stage="stage1", group_size=128, act_bits=16, w_bits=4,
                      export_onnx=None):
    """Run one stage; returns ``{kind: path}`` of what it wrote."""
    if quant_stage not in STAGES:
        raise DoptError("unknown quant stage", field="--quant-stage",
                        expected="stage1, stage2 or stage3", found=repr(quant_stage))
    check_bits(w_bits, field="--w-bits", allowed=WEIGHT_BITS)
    check_bits(act_bits, field="--act-bits", allowed=ACT_BITS)
    check_group_size(group_size, field="--group-size")
    _check_model_path(model_path)
    config = load_optimize_config(config_yaml)
    if not Path(dopt_config).is_file():
        raise DoptError("dopt_config.json does not exist", file=str(dopt_config),
                        field="--dopt-config",
                        hint="run stage1 once through demo.py (it writes the file), set the "
                             "strategies, then run stage1 again")
    data = read_json(dopt_config, field="--dopt-config", what="dopt_config.json")
    out = Path(output_dir)
    if not out.is_dir():
        if not out.parent.is_dir():
            raise DoptError("the output directory's parent does not exist", file=str(out),
                            field="--output-dir", hint="create it first (run.sh: mkdir -p)")
        out.mkdir()
    if not os.access(out, os.W_OK):
        raise DoptError("the output directory is not writable", file=str(out),
                        field="--output-dir")
    job = LlmJob(str(model_path), config, str(dopt_config), data, str(out), bool(hf_type_save),
                 quant_stage, group_size, act_bits, w_bits, export_onnx)
    _check_stage_input(job)
    Logger.info(f"{quant_stage}: model {model_path}, dopt_config {dopt_config}, "
                f"output {out}")
    return _adapter_hook("dopt_llm_run_stage")(adapter="llm", job=job)


llm_quant_pipeline = llm_quant_pipline


def _excepthook(kind, value, tb, _previous=sys.excepthook):
    """Scripts written like the reference demo.py call these functions bare: a DoptError
    there is the one-paragraph message and exit status 2, not a traceback."""
    if isinstance(value, DoptError):
        sys.stdout.flush()
        print(f"dopt: error: {value}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(2)
    if isinstance(value, KeyboardInterrupt):
        print("dopt: interrupted (finished stages and blocks are kept)", file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)
    _previous(kind, value, tb)


if sys.excepthook is sys.__excepthook__:
    sys.excepthook = _excepthook


def main(argv=None) -> int:
    """``python -m dopt.dopt_llm`` : demo.py's flow as one command."""
    from ..errors import run_cli
    args = parse_args(argv)

    def body():
        if not os.path.exists(args.dopt_config):
            generate_quant_config(args.model_path, args.dopt_config, w_bits=args.w_bits,
                                  group_size=args.group_size, act_bits=args.act_bits)
            Logger.info("generate plugin quant config please set quant strategy firstly")
            return 0
        llm_quant_pipline(args.model_path, args.optimize_config, args.dopt_config,
                          args.output_dir, args.hf_type_save, args.quant_stage,
                          args.group_size, args.act_bits, args.w_bits, args.export_onnx)
        return 0
    return run_cli("dopt llm", body)
