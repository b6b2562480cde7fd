"""The three stages behind ``llm_quant_pipline``: weight quantization, activation
calibration, parameter extraction. Each writes its file whole or not at all."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from dopt.dopt_llm.dataset import read_texts
from dopt.dopt_llm.opt_main import PARAMS_FILE, STAGE_OUTPUTS, LlmJob
from dopt.errors import DoptError
from dopt.formats.fileio import atomic_path, staged_outputs
from dopt.log import Logger

from . import blockwise
from .hf_model import load_causal_lm
from .model_opt import optimize_model, set_calibrate_state, set_quant_state, set_run_mode

MAX_STATE_BYTES = 64 << 30
ONNX_RTOL = 1e-2


def pick_device(fp16: bool):
    """``(device, dtype note)``; ``DEVICE`` (run.sh) wins, else CUDA when present."""
    want = os.environ.get("DEVICE", "").strip().lower()
    if want in ("npu",):
        Logger.warning("DEVICE=npu: the Ascend backend is not part of dopt; using the CPU")
        want = "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        Logger.warning(f"DEVICE={want} but torch sees no CUDA device; using the CPU")
        want = "cpu"
    device = torch.device(want or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_fp16 = bool(fp16) and device.type == "cuda"
    if fp16 and not use_fp16:
        Logger.info("extra_training_config.fp16 is True but there is no GPU: running in "
                    "float32 on the CPU")
    return device, use_fp16


def token_samples(tokenizer, texts, cutoff_len: int, n: int | None, *, seed: int = 0,
                  what: str = "samples"):
    """``[n, cutoff_len]`` token ids: the texts (shuffled with ``seed``) joined by EOS and cut
    into full-length rows, so no padding and no attention mask are needed."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(texts), generator=g).tolist()
    eos = tokenizer.eos_token_id
    rows, buf = [], []
    for i in order:
        buf.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
        if eos is not None:
            buf.append(eos)
        while len(buf) >= cutoff_len:
            rows.append(buf[:cutoff_len])
            buf = buf[cutoff_len:]
        if n is not None and len(rows) >= n:
            break
    if not rows:
        raise DoptError(f"the dataset is too short for one {cutoff_len}-token sample",
                        field="cutoff_len", hint="add text or lower cutoff_len")
    if n is not None and len(rows) < n:
        Logger.warning(f"the dataset gives {len(rows)} {what} of {cutoff_len} tokens, fewer "
                       f"than the {n} asked for; using {len(rows)}")
    return torch.tensor(rows[:n] if n else rows, dtype=torch.long)


def _load(job: LlmJob, device):
    model, tokenizer = load_causal_lm(job.model_path)
    cli = {"w_bits": job.w_bits, "group_size": job.group_size, "act_bits": job.act_bits}
    optimize_model(model, job.dopt_config, cli_defaults=cli, data=job.dopt_config_data)
    return model.to(device), tokenizer


def _load_state(model, path: Path, stage: str):
    if path.stat().st_size > MAX_STATE_BYTES:
        raise DoptError("the checkpoint is too large", file=str(path),
                        expected=f"at most {MAX_STATE_BYTES} bytes")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DoptError("the checkpoint cannot be read", file=str(path),
                        found=f"{type(e).__name__}: {str(e)[:200]}",
                        hint=f"rerun {stage} to rewrite it") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DoptError("the checkpoint does not fit this model and dopt_config.json",
                        file=str(path), found=str(e).splitlines()[0][:300],
                        hint=f"rerun {stage} with the same --model-path and dopt_config.json")\
            from None


def _save_state(model, path: Path):
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    Logger.info(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def _autocast(device, fp16):
    if not fp16:
        return None
    return lambda: torch.autocast(device_type=device.type, dtype=torch.float16)


def stage1(job: LlmJob) -> dict:
    cfg = job.config
    kd = cfg.kd
    device, fp16 = pick_device(cfg.extra_training_config["fp16"])
    texts = read_texts(cfg.train_files)
    model, tok = _load(job, device)
    n = cfg.dataset["train_samples"] if kd["enable"] else cfg.dataset["ptq_samples"]
    ids = token_samples(tok, texts, cfg.cutoff_len, n,
                        what="training samples" if kd["enable"] else "PTQ samples").to(device)
    out = job.out(STAGE_OUTPUTS["stage1"])
    progress = job.out(".stage1_progress.pth")
    sig = blockwise.signature(job.model_path, job.dopt_config_data, kd, cfg.cutoff_len,
                              tuple(ids.shape), int(ids.sum()))
    Logger.info(f"stage1: {ids.shape[0]} samples x {ids.shape[1]} tokens on {device}; "
                + ("learned clipping with block-output distillation" if kd["enable"]
                   else "clip search without training (kd.enable False)"))
    t0 = time.perf_counter()
    blockwise.quantize_blocks(model, ids, kd, kd_enabled=kd["enable"],
                              keys=kd["trainable_keys"], progress_path=progress, sig=sig,
                              autocast=_autocast(device, fp16),
                              class_names=tuple(kd["no_split_module_classes"]))
    model.to("cpu")
    _save_state(model, out)
    progress.unlink(missing_ok=True)
    Logger.info(f"stage1 done in {time.perf_counter() - t0:.0f} s")
    return {"trained_quant_weight": str(out)}


def stage2(job: LlmJob) -> dict:
    cfg = job.config
    device, _ = pick_device(cfg.extra_training_config["fp16"])
    texts = read_texts(cfg.train_files)
    model, tok = _load(job, "cpu")
    _load_state(model, job.out(STAGE_OUTPUTS["stage1"]), "stage1")
    model.to(device)
    ids = token_samples(tok, texts, cfg.cutoff_len, cfg.num_samples, seed=1,
                        what="calibration samples").to(device)
    set_quant_state(model, weight_state=True, input_state=False)
    set_calibrate_state(model, True)
    micro = cfg.kd["micro_batch_size"]
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, ids.shape[0], micro):
            model(input_ids=ids[i:i + micro], use_cache=False)
    set_calibrate_state(model, False)
    Logger.info(f"stage2: calibrated INT16 input ranges on {ids.shape[0]} samples x "
                f"{ids.shape[1]} tokens in {time.perf_counter() - t0:.0f} s")
    model.to("cpu")
    out = job.out(STAGE_OUTPUTS["stage2"])
    _save_state(model, out)
    return {"trained": str(out)}


def stage3(job: LlmJob) -> dict:
    from .stage3_files import fake_quant_state, write_quant_params
    model, tok = _load(job, "cpu")
    _load_state(model, job.out(STAGE_OUTPUTS["stage2"]), "stage2")
    set_quant_state(model, weight_state=True, input_state=True)
    set_run_mode(model, "hardware")
    written = {}
    out_dir = Path(job.output_dir)
    with staged_outputs(out_dir) as stage:
        fq = fake_quant_state(model)
        torch.save(fq, stage / STAGE_OUTPUTS["stage3"])
        written.update(write_quant_params(model, stage / PARAMS_FILE,
                                          lut_mode=job.config.lut_mode,
                                          embedding_in_omc=job.config.embedding_in_omc))
        if job.hf_type_save:
            base, _ = load_causal_lm(job.model_path)
            base.load_state_dict(fq, strict=True)
            base.save_pretrained(stage / "hf_model")
            tok.save_pretrained(stage / "hf_model")
            written["hf_model"] = "hf_model"
        if job.export_onnx:
            from .export_onnx import export_causal_lm
            # INT16 rounding points: a float32 difference of one ulp before a rounding point
            # moves a code by one step, so a quantized model is checked at 1 % of max |logit|
            report = export_causal_lm(model, stage / "model.onnx", rtol=ONNX_RTOL)
            Logger.info(f"ONNX: {report}")
    written = {k: str(out_dir / Path(v).name) for k, v in written.items()}
    written["fake_quant_weight"] = str(out_dir / STAGE_OUTPUTS["stage3"])
    if job.export_onnx:
        dest = Path(job.export_onnx)
        os.replace(out_dir / "model.onnx", dest)
        written["onnx"] = str(dest)
    Logger.info("stage3 wrote " + ", ".join(written.values()))
    return written


STAGES = {"stage1": stage1, "stage2": stage2, "stage3": stage3}


def run_stage(job: LlmJob) -> dict:
    return STAGES[job.quant_stage](job)
