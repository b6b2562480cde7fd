"""Weight-only low-bit baselines for a HuggingFace Llama-style causal LM: RTN and GPTQ.

They are what the LLM perplexity benchmark compares dopt against, so both produce exactly
dopt's weight format (``dopt.quant.lowbit``): asymmetric unsigned codes, groups of consecutive
input columns of each output row (the last group shorter when ``group_size`` does not divide
``in_features``), min/max range without clipping. Only the ``torch.nn.Linear`` modules of
the decoder blocks (``model.model.layers``) are quantized; embedding, final norm and
``lm_head`` stay float. Weights are replaced in place by their dequantized grid values.

``gptq_quantize_`` is a *reference implementation* of GPTQ (Frantar et al. 2022, "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained Transformers",
arXiv:2210.17323, Algorithm 1: column-by-column quantization with error feedback through
the upper Cholesky factor of the inverse Hessian, and lazy batch updates), written for
clarity and exactness against the dopt grid rather than speed.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

from dopt.quant.lowbit import MIN_RANGE, fake_quant_weight, group_bounds, qmax


def _decoder_linears(model, skip=()):
    """``[(layer index, qualified name, Linear)]`` of the decoder blocks, minus ``skip``."""
    out = []
    for i, layer in enumerate(model.model.layers):
        for name, mod in layer.named_modules():
            full = f"model.layers.{i}.{name}"
            if isinstance(mod, torch.nn.Linear) and not any(s in full for s in skip):
                out.append((i, full, mod))
    return out


@torch.no_grad()
def rtn_quantize_(model, bits: int = 4, group_size: int = 128, skip=("lm_head",)) -> dict:
    """Round-to-nearest with ``dopt.quant.lowbit.fake_quant_weight`` (the specification itself, so
    the baseline cannot drift from the format), in place. Returns counts."""
    linears = _decoder_linears(model, skip)
    n_weights = 0
    for _, _, mod in linears:
        w = mod.weight.detach().float().cpu().numpy()
        wq = fake_quant_weight(w, bits, group_size)
        mod.weight.copy_(torch.from_numpy(wq).to(mod.weight.dtype))
        n_weights += w.size
    return {"method": "rtn", "bits": bits, "group_size": group_size,
            "linears": len(linears), "weights": n_weights}


# --- GPTQ on one weight matrix -------------------------------------------------------------

def _group_qparams(w: torch.Tensor, bits: int):
    """``(scale, zero)`` per row of ``w`` [out, g] with the ``dopt.quant.lowbit`` formulas in
    float32 (torch's ``round`` is half-to-even like ``np.rint``)."""
    levels = float(qmax(bits))
    scale = (w.amax(dim=1) - w.amin(dim=1)).clamp_min(MIN_RANGE) / levels
    zero = torch.round(-w.amin(dim=1) / scale).clamp(0, levels)
    return scale, zero


def _fake_quant_column(w: torch.Tensor, scale, zero, bits: int) -> torch.Tensor:
    q = (torch.round(w / scale) + zero).clamp(0, qmax(bits))
    return (q - zero) * scale


def _aligned_blocks(bounds, block_size: int):
    """Blocks of whole groups (a group wider than ``block_size`` is split in chunks), so every
    group starts inside a block that also holds the rest of it: its quantization parameters
    are then taken from fully error-updated weights. Lazy batching only reorders the
    updates, so block boundaries change speed and floating-point rounding, not the method."""
    pieces = [(s, min(s + block_size, b)) for a, b in bounds for s in range(a, b, block_size)]
    blocks = [list(pieces[0])]
    for a, b in pieces[1:]:
        if b - blocks[-1][0] <= block_size:
            blocks[-1][1] = b
        else:
            blocks.append([a, b])
    return [tuple(b) for b in blocks]


def _inverse_hessian_factor(H: torch.Tensor, damp: float, perm):
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` in float64 (the paper's
    numerically stable form of the OBS updates); dead inputs get ``H_ii = 1``."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    if perm is not None:
        H = H[perm][:, perm]
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    return torch.linalg.cholesky(Hinv, upper=True), dead


@torch.no_grad()
def gptq_quantize_weight(W: torch.Tensor, H: torch.Tensor, bits: int = 4,
                         group_size: int = 128, damp: float = 0.01, block_size: int = 128,
                         act_order: bool = False) -> torch.Tensor:
    """GPTQ of one weight ``W`` [out, in] for the input Hessian ``H`` [in, in] (``2/n X Xᵀ``).
    Returns the dequantized float32 grid weights.

    Group parameters come from the current (error-updated) weights of a group when the column
    loop reaches its first column. With ``act_order`` the columns are visited by decreasing
    ``diag(H)``, which scatters the consecutive-column groups of the format over the loop;
    their parameters are then fixed up front from the original weights ("static groups"),
    the usual way to combine activation order with a fixed group layout.
    """
    W = W.detach().float().clone()
    n_in = W.shape[1]
    bounds = group_bounds(n_in, group_size)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    U, dead = _inverse_hessian_factor(H.double(), damp, perm)
    U = U.float()
    W[:, dead] = 0
    static = None
    if act_order:
        group_params = [_group_qparams(W[:, a:b], bits) for a, b in bounds]
        static = [group_params[g] for g, (a, b) in enumerate(bounds) for _ in range(a, b)]
        static = [static[int(c)] for c in perm]  # parameters of each column in loop order
        W = W[:, perm]
        blocks = [(s, min(s + block_size, n_in)) for s in range(0, n_in, block_size)]
    else:
        blocks = _aligned_blocks(bounds, block_size)
    starts = {a: b for a, b in bounds}
    Q = torch.empty_like(W)
    params = None
    for i1, i2 in blocks:
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                params = static[col]
            elif col in starts:  # a group reaching past i2 starts the block (i == 0)
                end = starts[col]
                cur = W1[:, i:end - i1] if end <= i2 else W[:, col:end]
                params = _group_qparams(cur, bits)
            q = _fake_quant_column(W1[:, i], *params, bits)
            err = (W1[:, i] - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Q[:, col], Err1[:, i] = q, err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q


def relative_output_error(W, Q, H) -> float:
    """``||(W - Q) X||² / ||W X||²`` on the calibration inputs, from ``H ∝ X Xᵀ``."""
    W, D = W.double(), (W.double() - Q.double())
    return float(torch.einsum("oi,ij,oj->", D, H, D) / torch.einsum("oi,ij,oj->", W, H, W))


# --- the sequential, layer-by-layer driver -------------------------------------------------

class _Stop(Exception):
    pass


def _capture_layer0_inputs(model, calib_ids, batch_size):
    """Per micro-batch ``(hidden states, args, kwargs)`` that the model hands to layer 0,
    caught by the pipeline's own catcher (``dopt_adapters.llm.blockwise.capture_inputs``)."""
    from dopt_adapters.llm.blockwise import capture_inputs
    device = next(model.parameters()).device
    hidden, kwargs = capture_inputs(model, model.model.layers, calib_ids.to(device), batch_size)
    return [(hidden[s:s + batch_size], (), kwargs) for s in range(0, hidden.shape[0], batch_size)]


def _run_layer(layer, calls):
    outs = []
    for hidden, args, kwargs in calls:
        out = layer(hidden, *args, **kwargs)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


def _sequential_groups(layer, calls):
    """Linears of ``layer`` grouped by shared input tensor, in execution order: for a Llama
    block ``[q, k, v], [o], [gate, up], [down]``. Found by one probe forward, so nothing
    depends on module names."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, inp, name=name: seen.append((name, m, inp[0])))
             for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        _run_layer(layer, calls[:1])
    finally:
        for h in hooks:
            h.remove()
    groups = []
    for name, mod, x in seen:
        if groups and groups[-1][0] is x:
            groups[-1][1].append((name, mod))
        else:
            groups.append((x, [(name, mod)]))
    return [g for _, g in groups]


def _group_hessian(layer, first_linear, calls):
    """``2/n Σ x xᵀ`` (float64) of the shared input of a group, over all tokens of all
    micro-batches. The layer forward stops right at that input (nothing after it is needed)."""
    acc = {"H": None, "n": 0}

    def hook(_mod, inp):
        x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
        xtx = (x.T @ x).double()  # float32 product per micro-batch, float64 running sum
        acc["H"] = xtx if acc["H"] is None else acc["H"] + xtx
        acc["n"] += x.shape[0]
        raise _Stop

    handle = first_linear.register_forward_pre_hook(hook)
    try:
        for call in calls:
            try:
                _run_layer(layer, [call])
            except _Stop:
                pass
    finally:
        handle.remove()
    return acc["H"] * (2.0 / acc["n"])


@torch.no_grad()
def gptq_quantize_(model, calib_ids, bits: int = 4, group_size: int = 128, damp: float = 0.01,
                   block_size: int = 128, act_order: bool = False, progress: bool = True,
                   batch_size: int = 8) -> dict:
    """GPTQ of every decoder Linear of ``model``, in place, calibrated on ``calib_ids``
    (LongTensor [N, L], packed tokens without padding), run in micro-batches of
    ``batch_size`` sequences.

    Sequential as in the paper: decoder layers one after the other, each calibrated on the
    outputs of the already quantized layers before it; inside a layer "true sequential"
    groups (``q/k/v``, then ``o``, then ``gate/up``, then ``down``), each group's Hessian
    taken with the earlier groups of the layer already quantized, like the original code.
    Linears of a group share one input, hence one Hessian. Returns per-layer seconds and the
    mean relative output error of the layer's Linears on their calibration inputs; with
    ``progress`` one line per layer goes to stderr.
    """
    was_training = model.training
    model.eval()
    try:
        calls = _capture_layer0_inputs(model, calib_ids, batch_size)
        per_layer = []
        for idx, layer in enumerate(model.model.layers):
            t0 = time.perf_counter()
            errors = []
            for group in _sequential_groups(layer, calls):
                H = _group_hessian(layer, group[0][1], calls)
                for _, mod in group:
                    Q = gptq_quantize_weight(mod.weight, H, bits, group_size, damp, block_size,
                                             act_order)
                    errors.append(relative_output_error(mod.weight, Q, H))
                    mod.weight.copy_(Q.to(mod.weight.dtype))
            outs = _run_layer(layer, calls)
            calls = [(o, args, kwargs) for o, (_, args, kwargs) in zip(outs, calls)]
            per_layer.append({"layer": idx, "seconds": time.perf_counter() - t0,
                              "rel_err": float(np.mean(errors)), "linears": len(errors)})
            if progress:
                print(f"gptq layer {idx}: {per_layer[-1]['seconds']:.1f} s, mean relative "
                      f"output error {per_layer[-1]['rel_err']:.3e}", file=sys.stderr,
                      flush=True)
    finally:
        model.train(was_training)
    return {"method": "gptq", "bits": bits, "group_size": group_size, "damp": damp,
            "act_order": act_order, "samples": int(calib_ids.shape[0]),
            "seq_len": int(calib_ids.shape[1]),
            "linears": sum(p["linears"] for p in per_layer), "layers": per_layer}
