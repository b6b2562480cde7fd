"""The PTQ algorithm, once for every framework: select, equalize, calibrate, correct, check.

Order matters and is the same everywhere: cross-layer equalization changes weights before
calibration sees the activations between the pair; calibration collects ranges and the
per-channel input means in one pass; bias correction then uses those means; the
parameters are computed from the final weights; the check compares the quantized model
as written with the user's float model on the first calibration samples.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ..quant import numerics as nm
from ..quant.bias_correction import weight_bias_shift
from ..calib.loop import Statistics, calibrate, resolve_algorithm
from ..quant.equalize import equalize_pair
from ..errors import DoptError
from .backend import PtqBackend, PtqLayer, QuantPlan
from .job import PtqOptions

CHECK_SAMPLES = 32  # calibration samples the quantized model is compared with float on


@dataclass
class PtqOutcome:
    plan: QuantPlan
    stats: Statistics
    written: dict
    seconds: float
    sqnr_db: float | None = None
    equalized_pairs: int = 0
    bias_corrected: int = 0
    notes: list[str] = field(default_factory=list)


def select_layers(layers: dict[str, PtqLayer], exclude, *, npu_placement: bool,
                  config_file=None) -> tuple[list[str], dict[str, str]]:
    """Split into INT8 and float layers; ``exclude`` names weights (reference) or layers."""
    from ..npu.profile import load_profile
    from ..npu.rules import int8_skip_reason, int8_skipped

    by_weight = {ly.weight_name: name for name, ly in layers.items()}
    floats: dict[str, str] = {}
    for item in exclude:
        name = by_weight.get(item, item if item in layers else None)
        if name is None:
            sample = ", ".join(list(layers)[:5])
            raise DoptError(f"exclude_op names '{item}', which is neither a quantizable layer "
                            f"nor its weight", file=config_file, field="exclude_op",
                            expected=f"names of Conv/Gemm/MatMul (ONNX) or Conv2d/Linear "
                                     f"(PyTorch) layers or their weights, e.g. {sample}",
                            hint="list them with 'dopt omg --mode 1 --framework 5 --model ...' "
                                 "(ONNX) or generate_config_file (PyTorch)")
        floats[name] = "exclude_op"
    if npu_placement:
        profile = load_profile()
        for name, ly in layers.items():
            if name not in floats and ly.kind == "conv" and \
                    int8_skipped(ly.cin, ly.groups, profile):
                floats[name] = int8_skip_reason(ly.cin, profile)
    return [n for n in layers if n not in floats], floats


def equalize(backend: PtqBackend, layers: dict[str, PtqLayer], log) -> int:
    """Cross-layer equalization over the backend's exact pairs; returns pairs equalized."""
    pairs = 0
    for first, second in backend.equalization_pairs():
        ly1, ly2 = layers.get(first), layers.get(second)
        if ly1 is None or ly2 is None or ly1.kind != "conv" or ly2.kind != "conv":
            continue
        w1, w2 = backend.weight(first), backend.weight(second)
        c = w1.shape[0]
        if ly2.groups not in (1, c) or (ly2.groups == 1 and w2.shape[1] != c):
            continue
        *_, s = equalize_pair(w1, None, w2, groups2=ly2.groups)
        backend.scale_channels(first, out_scale=1.0 / s)
        backend.scale_channels(second, in_scale=s)
        pairs += 1
    if pairs:
        log(f"cross-layer equalization: {pairs} convolution pair(s)")
    return pairs


def correct_biases(backend: PtqBackend, layers: dict[str, PtqLayer], quantized,
                   stats: Statistics, log) -> int:
    """Remove the expected output shift that weight rounding causes (empirical input means)."""
    done, kept = 0, []
    for name in quantized:
        ly = layers[name]
        mean = stats.channel_means.get(ly.input)
        if mean is None:
            continue
        w = backend.weight(name)
        w_fq = nm.fake_quant_weight(w, nm.weight_scales(w, 0), 0)
        if backend.add_to_bias(name, -weight_bias_shift(w, w_fq, mean, groups=ly.groups)):
            done += 1
        else:
            kept.append(name)
    if done:
        log(f"bias correction: {done} layer(s)")
    if kept:
        shown = ", ".join(kept[:4]) + (f" and {len(kept) - 4} more" if len(kept) > 4 else "")
        log(f"bias correction skipped for {len(kept)} layer(s) ({shown}): no bias to carry it")
    return done


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """``10 log10(sum ref^2 / sum (got - ref)^2)``; inf when equal."""
    noise = float(np.sum((ref.astype(np.float64) - got) ** 2))
    sig = float(np.sum(ref.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(max(sig, 1e-30) / noise)


def first_samples(feeds: Iterator[dict], n: int) -> dict:
    """Up to ``n`` samples from the start of the calibration set, as one feed."""
    parts: list[dict] = []
    got = 0
    for feed in feeds:
        parts.append(feed)
        got += len(next(iter(feed.values())))
        if got >= n:
            break
    return {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]} if parts else {}


def check_against_float(backend: PtqBackend, feed: dict, log) -> float:
    """SQNR (dB) of the quantized model's first output against the user's float model."""
    ref = backend.outputs(feed, quantized=False)[0]
    got = backend.outputs(feed, quantized=True)[0]
    if not np.all(np.isfinite(got)):
        raise DoptError("the quantized model produces non-finite outputs on the calibration "
                        "samples", hint="check the calibration data for NaN/inf, or exclude the "
                        "layer whose range is extreme (exclude_op)")
    db = sqnr_db(ref, got)
    log(f"check: quantized vs float output SQNR {db:.1f} dB on {len(ref)} calibration "
        f"sample(s)")
    return db


def run_ptq(backend: PtqBackend, feeds: Callable[[], Iterator[dict]], opts: PtqOptions, *,
            check: bool = True, file: str | None = None) -> PtqOutcome:
    """Quantize the backend's model on ``feeds()`` as ``opts`` says; the backend writes it."""
    t0 = time.perf_counter()
    log = opts.log
    algorithm = resolve_algorithm(opts.algorithm, file=opts.config_file)
    layers = backend.layers()
    if not layers:
        raise DoptError("the model has no quantizable layer", file=file,
                        expected="convolution or fully connected layers with constant weights")
    quantized, floats = select_layers(layers, opts.exclude, npu_placement=opts.npu_placement,
                                      config_file=opts.config_file)
    for name, why in floats.items():
        log(f"float: {name} ({why})")
    if not quantized:
        raise DoptError("no layer is left to quantize", file=opts.config_file,
                        field="exclude_op", hint="exclude fewer layers")
    notes = []
    pairs = equalize(backend, layers, log) if opts.equalization else 0
    if pairs:
        notes.append(f"cross-layer equalization ({pairs} pairs)")
    tensors = list(dict.fromkeys(layers[n].input for n in quantized))
    axes = ({layers[n].input: layers[n].in_axis for n in quantized}
            if opts.bias_correction else None)
    log(f"calibrating {len(quantized)} layer(s) with '{algorithm}'")
    stats = calibrate(backend.run_batch(tensors), feeds(), tensors=tensors, algorithm=algorithm,
                      channel_axes=axes, total=opts.num_samples, progress=opts.progress, log=log)
    if stats.interrupted:
        notes.append(f"interrupted after {stats.samples} samples")
    if stats.empty:
        raise DoptError(f"no finite value reached tensor(s) {', '.join(stats.empty[:5])}",
                        file=file, hint="check the calibration data (NaN/inf?)")
    corrected = correct_biases(backend, layers, quantized, stats, log) \
        if opts.bias_correction else 0
    if corrected:
        notes.append(f"bias correction ({corrected} layers)")
    plan = QuantPlan(quantized, floats, {n: stats.ranges[layers[n].input] for n in quantized},
                     algorithm, notes)
    written = backend.write(plan)
    out = PtqOutcome(plan, stats, written, 0.0, None, pairs, corrected, notes)
    if check:
        sample = first_samples(feeds(), CHECK_SAMPLES)
        if sample:
            out.sqnr_db = check_against_float(backend, sample, log)
    out.seconds = time.perf_counter() - t0
    log(f"{len(quantized)} layer(s) INT8, {len(floats)} float; {stats.samples} calibration "
        f"sample(s); " + (", ".join(notes) + "; " if notes else "") + f"{out.seconds:.1f} s")
    return out
