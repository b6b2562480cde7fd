"""Stage 1: block-by-block weight quantization with learned clipping.

Decoder blocks are processed in order. Two activation caches travel down the network:
the float teacher's block inputs and the quantized student's. For each block:

1. the teacher's output ``Y`` is computed from the teacher's input with float weights;
2. clip search (no training): for every quantized Linear, the clip factor of each
   (row, group) is chosen from a grid to minimise ``(W - Q(W)) C (W - Q(W))^T`` with
   ``C = X^T X`` the Gram matrix of the layer's student inputs;
3. with ``kd.enable``: ``quant_alpha`` (and ``norm`` weights, per ``trainable_keys``) are
   trained to minimise ``MSE(block_q(X_student), Y)`` (micro-batches, gradient accumulation,
   warmup + cosine/linear/constant schedule, AdamW); the best evaluated state is kept,
   non-finite losses skip the step, and a block that ends worse than its clip-search start
   falls back to it;
4. both caches advance: the student through the quantized block, the teacher to ``Y``.

Peak memory is one block's training state plus the three caches (N x L x hidden each).
After each block the trained parameters of the finished blocks are saved to a progress
file, so an interrupted run resumes at the next block.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from dopt.errors import DoptError
from dopt.formats.fileio import atomic_path
from dopt.log import Logger

from .quant_modules import QuantLinear, alpha_logit, fake_quant_weight, group_minmax
from dopt.quant.lowbit import group_bounds

CLIP_GRID = tuple(round(1.0 - 0.05 * k, 2) for k in range(11))  # 1.0 .. 0.5
GRAM_TOKENS = 16384


def decoder_layers(model, class_names=()) -> nn.ModuleList:
    """The ModuleList of decoder blocks (``no_split_module_classes`` names them)."""
    candidates = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and all(
                type(b).__name__ in class_names or type(b).__name__.endswith("DecoderLayer")
                for b in m):
            candidates.append(m)
    if not candidates:
        raise DoptError("found no decoder blocks in the model",
                        expected="a ModuleList of blocks whose class is listed in "
                                 "kd.no_split_module_classes or ends in 'DecoderLayer'",
                        hint="add the model's decoder layer class to no_split_module_classes")
    return candidates[0]


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for block 0 to record what the model feeds it."""

    def __init__(self, block):
        super().__init__()
        self.block, self.inputs, self.kwargs = block, [], None

    def __getattr__(self, name):  # the model may read block attributes (attention_type, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("block"), name)

    def forward(self, hidden_states, *args, **kwargs):
        self.inputs.append(hidden_states.detach())
        if self.kwargs is None:
            self.kwargs = kwargs
        raise _Stop


def capture_inputs(model, layers, ids, micro: int):
    """``(hidden [N, L, H], kwargs)`` fed to block 0; kwargs reused for every batch."""
    catcher = _Catcher(layers[0])
    layers[0] = catcher
    try:
        with torch.no_grad():
            for i in range(0, ids.shape[0], micro):
                try:
                    model(input_ids=ids[i:i + micro], use_cache=False)
                except _Stop:
                    pass
    finally:
        layers[0] = catcher.block
    kwargs = {k: v for k, v in (catcher.kwargs or {}).items()
              if k not in ("past_key_values", "past_key_value", "use_cache", "cache_position")}
    kwargs["use_cache"] = False
    mask = kwargs.get("attention_mask")
    if torch.is_tensor(mask) and mask.shape[0] != 1:
        kwargs["attention_mask"] = mask[:1]
    return torch.cat(catcher.inputs), kwargs


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


def run_block(block, x, kwargs, micro: int):
    outs = []
    with torch.no_grad():
        for i in range(0, x.shape[0], micro):
            outs.append(_out(block(x[i:i + micro], **kwargs)))
    return torch.cat(outs)


def _qlinears(block):
    return [(n, m) for n, m in block.named_modules() if isinstance(m, QuantLinear)
            and m.quant_alpha is not None]


def gram_matrices(block, x, kwargs, micro: int, max_tokens: int = GRAM_TOKENS):
    """``{name: X^T X}`` of each learned-clip Linear's inputs (float weights in the block)."""
    mods = _qlinears(block)
    grams = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64,
                            device=m.weight.device) for n, m in mods}
    hooks = []
    for n, m in mods:
        def hook(mod, args, name=n):
            a = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[name] += a.T @ a
        hooks.append(m.register_forward_pre_hook(hook))
    states = [(m, m.weight_quant) for _, m in mods]
    for m, _ in states:
        m.weight_quant = False
    n = max(1, min(x.shape[0], max_tokens // max(1, x.shape[1])))
    try:
        run_block(block, x[:n], kwargs, micro)
    finally:
        for h in hooks:
            h.remove()
        for m, s in states:
            m.weight_quant = s
    return grams


def _group_error(d: torch.Tensor, c: torch.Tensor, bounds) -> torch.Tensor:
    """``[out, G]``: ``d_g C_gg d_g^T`` per row and group (full groups batched)."""
    size = bounds[0][1] - bounds[0][0]
    full = sum(1 for a, b in bounds if b - a == size)
    n = full * size
    dg = d[:, :n].reshape(d.shape[0], full, size)
    cg = torch.stack([c[a:b, a:b] for a, b in bounds[:full]])
    err = torch.einsum("ogi,gij,ogj->og", dg, cg, dg)
    if full < len(bounds):
        a = n
        tail = ((d[:, a:] @ c[a:, a:]) * d[:, a:]).sum(1, keepdim=True)
        err = torch.cat([err, tail], 1)
    return err


# (scale producer, consumers): the producer's output channels feed the consumers' inputs, so
# dividing the producer by s and multiplying the consumers' columns by s leaves the float
# block unchanged (norm weights; up_proj rows feed down_proj through an elementwise product)
SCALE_PAIRS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
               ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
               ("mlp.up_proj", ("mlp.down_proj",)))
SCALE_GRID = tuple(k / 10 for k in range(11))  # exponent on the input RMS; 0 = no scaling


def _scaled_error(w, s, bits, group, c, bounds):
    """Output error of quantizing ``w * s`` and undoing the scale: ``d C d^T`` summed."""
    d = fake_quant_weight(w * s, bits, group) / s - w
    return float(_group_error(d, c, bounds).sum())


def scale_search(block, grams, *, grid=SCALE_GRID) -> dict:
    """Activation-aware input scaling before clip search: per producer/consumer pair, pick the
    exponent ``a`` of ``s = rms(x)^a`` that minimises the consumers' quantization error, fold
    ``1/s`` into the producer and ``s`` into the consumers' columns, and rescale their Gram
    matrices. Returns ``{producer: exponent}``; exponent 0 (no change) is on the grid."""
    mods = dict(block.named_modules())
    chosen = {}
    for prod_name, cons_names in SCALE_PAIRS:
        prod = mods.get(prod_name)
        cons = [(n, mods.get(n)) for n in cons_names]
        if prod is None or any(m is None or n not in grams for n, m in cons):
            continue
        c = grams[cons[0][0]].float()
        rms = c.diagonal().clamp_min(1e-12).sqrt()  # up to a constant the normalisation removes
        with torch.no_grad():
            ws = [m.weight.detach().float() for _, m in cons]
            bounds = [group_bounds(m.in_features, m.group_size) for _, m in cons]
            best = (None, 0.0)
            for a in grid:
                s = rms.pow(a)
                s = s / (s.max() * s.min()).sqrt()
                err = sum(_scaled_error(w, s, m.w_bits, m.group_size, c, b)
                          for w, (_, m), b in zip(ws, cons, bounds))
                if best[0] is None or err < best[0]:
                    best = (err, a, s)
            a = best[1]
            chosen[prod_name] = a
            if a == 0.0:
                continue
            s = best[2].to(prod.weight.dtype)
            if isinstance(prod, nn.Linear) or hasattr(prod, "in_features"):
                prod.weight.div_(s[:, None])
                if getattr(prod, "bias", None) is not None:
                    prod.bias.div_(s)
            else:
                prod.weight.div_(s)
            for n, m in cons:
                m.weight.mul_(s[None, :])
                grams[n] = grams[n] / s.double()[:, None] / s.double()[None, :]
                m._cache = None
            if hasattr(prod, "_cache"):
                prod._cache = None
    return chosen


def clip_search(m: QuantLinear, gram: torch.Tensor, grid=CLIP_GRID) -> float:
    """Set ``m.quant_alpha`` to the per-(row, group) best clip factor; return the error ratio
    (best / no clipping) over the layer."""
    w = m.weight.detach().float()
    c = gram.float()
    bounds = group_bounds(m.in_features, m.group_size)
    minmax = group_minmax(w, m.group_size)
    best_err = best_logit = first = None
    with torch.no_grad():
        for alpha in grid:
            logit = float(alpha_logit(torch.tensor(alpha)))
            a = torch.sigmoid(torch.tensor(logit)).expand(m.out_features, len(bounds), 2)
            err = _group_error(w - fake_quant_weight(w, m.w_bits, m.group_size, a, minmax),
                               c, bounds)
            if best_err is None:
                first, best_err = err, err
                best_logit = torch.full_like(err, logit)
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_logit = torch.where(better, torch.full_like(err, logit), best_logit)
        m.quant_alpha.copy_(best_logit[..., None].expand(-1, -1, 2))
        m._cache = None
    return float(best_err.sum() / first.sum().clamp_min(1e-30))


def _lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * t)) if kind == "cosine" else max(0.0, 1 - t)


def _trainable(block, keys):
    return [(n, p) for n, p in block.named_parameters() if any(k in n for k in keys)]


def block_loss(block, x, y, kwargs, micro: int) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, x.shape[0], micro):
            o = _out(block(x[i:i + micro], **kwargs))
            total += F.mse_loss(o.float(), y[i:i + micro].float(), reduction="sum").item()
            count += o.numel()
    return total / max(1, count)


def _dist():
    d = torch.distributed
    if d.is_available() and d.is_initialized() and d.get_world_size() > 1:
        return d
    return None


def train_block(block, x, y, kwargs, kd: dict, keys, log_prefix: str, autocast=None):
    """Distil one block; returns ``(start loss, kept loss, skipped steps)``."""
    params = _trainable(block, keys)
    for p in block.parameters():
        p.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
    micro, accum = kd["micro_batch_size"], kd["gradient_accumulation_steps"]
    n = x.shape[0]
    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    steps_per_epoch = max(1, math.ceil(n / (micro * accum * world)))
    total = steps_per_epoch * kd["num_epochs"]
    opt = torch.optim.AdamW([p for _, p in params], lr=kd["learning_rate"],
                            weight_decay=kd["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, total, kd["warmup_steps"], kd["lr_scheduler_type"]))
    start = block_loss(block, x, y, kwargs, micro)
    best, best_state = start, {k: p.detach().clone() for k, p in params}
    skipped, step = 0, 0
    gen = torch.Generator().manual_seed(0)
    block.train()
    for epoch in range(kd["num_epochs"]):
        order = torch.randperm(n, generator=gen)[rank::world]
        chunks = [order[i:i + micro] for i in range(0, len(order), micro)]
        for j in range(0, len(chunks), accum):
            group = chunks[j:j + accum]
            ok = True
            for idx in group:
                with autocast() if autocast else contextlib.nullcontext():
                    o = _out(block(x[idx], **kwargs))
                    loss = F.mse_loss(o.float(), y[idx].float()) / len(group)
                if not torch.isfinite(loss):
                    ok = False
                    break
                loss.backward()
            grads = [p.grad for _, p in params if p.grad is not None]
            if dist:
                for g in grads:
                    dist.all_reduce(g)
                    g /= world
            if ok and all(torch.isfinite(g).all() for g in grads):
                opt.step()
            else:
                skipped += 1
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            if step % kd["logging_step"] == 0:
                Logger.info(f"{log_prefix} epoch {epoch + 1} step {step}/{total} "
                            f"loss {loss.item() * len(group):.4e} lr {sched.get_last_lr()[0]:.2e}")
        if (epoch + 1) % kd["eval_step"] == 0 or epoch + 1 == kd["num_epochs"]:
            block.eval()
            cur = block_loss(block, x, y, kwargs, micro)
            block.train()
            if math.isfinite(cur) and cur < best:
                best, best_state = cur, {k: p.detach().clone() for k, p in params}
    block.eval()
    with torch.no_grad():
        for k, p in params:
            p.copy_(best_state[k])
            p.requires_grad_(False)
    for m in block.modules():
        if isinstance(m, QuantLinear):
            m._cache = None
    return start, best, skipped


def signature(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _block_state(block):
    """Everything stage 1 may change in a block: weights (input scaling), norms, clip factors."""
    return {n: t.detach().cpu().clone() for n, t in block.state_dict().items()}


def quantize_blocks(model, ids, kd: dict, *, kd_enabled: bool, keys, progress_path=None,
                    sig: str = "", autocast=None, class_names=()):
    """Run stage 1 over every decoder block of an ``optimize_model``-ed model."""
    layers = decoder_layers(model, class_names)
    micro = kd["micro_batch_size"]
    resume = _load_progress(progress_path, sig)
    from .model_opt import set_quant_state
    set_quant_state(model, weight_state=False, input_state=False)
    x_fp, kwargs = capture_inputs(model, layers, ids, micro)
    set_quant_state(model, weight_state=True, input_state=False)
    x_q, _ = capture_inputs(model, layers, ids, micro)  # the embedding may be quantized
    done_states = dict(resume.get("state", {})) if resume else {}
    n_done = resume["done"] if resume else 0
    if n_done:
        Logger.info(f"stage1: resuming after block {n_done} of {len(layers)} "
                    f"({progress_path})")
    summary = []
    for i, block in enumerate(layers):
        t0 = time.perf_counter()
        qmods = [m for m in block.modules() if isinstance(m, QuantLinear)]
        for m in qmods:
            m.weight_quant = False
        y = run_block(block, x_fp, kwargs, micro)
        for m in qmods:
            m.weight_quant = True
        if i < n_done:
            block.load_state_dict({n: done_states[f"{i}.{n}"] for n in block.state_dict()})
            for m in qmods:
                m._cache = None
        else:
            grams = gram_matrices(block, x_q, kwargs, micro)
            scales = _scale_if_equivalent(block, grams, x_q[:2], kwargs)
            ratios = [clip_search(m, grams[n]) for n, m in _qlinears(block)]
            msg = (f"block {i + 1}/{len(layers)}: input scaling exponents "
                   f"{'/'.join(f'{a:.2f}' for a in scales.values()) or '-'}, clip search "
                   f"error x{sum(ratios) / max(1, len(ratios)):.3f}")
            if kd_enabled and kd["num_epochs"] > 0:
                start, kept, skipped = train_block(block, x_q, y, kwargs, kd, list(keys),
                                                   f"block {i + 1}/{len(layers)}", autocast)
                msg += f", distillation MSE {start:.4e} -> {kept:.4e}"
                if skipped:
                    msg += f" ({skipped} non-finite steps skipped)"
                summary.append((start, kept))
            Logger.info(msg + f" ({time.perf_counter() - t0:.1f} s)")
            for n, t in _block_state(block).items():
                done_states[f"{i}.{n}"] = t
            if progress_path:
                _save_progress(progress_path, sig, i + 1, done_states)
        x_q = run_block(block, x_q, kwargs, micro)
        x_fp = y
    return summary


def _scale_if_equivalent(block, grams, probe, kwargs):
    """Scale search, kept only if the float block still computes the same function (a norm
    that is not ``weight * x``, e.g. ``(1 + weight) * x``, would break the folding)."""
    qmods = [m for m in block.modules() if isinstance(m, QuantLinear)]
    saved = {k: v.clone() for k, v in block.state_dict().items()}
    saved_grams = dict(grams)
    for m in qmods:
        m.weight_quant = False
    try:
        before = run_block(block, probe, kwargs, 2)
        chosen = scale_search(block, grams)
        after = run_block(block, probe, kwargs, 2)
    finally:
        for m in qmods:
            m.weight_quant = True
    err = float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))
    if not err < 1e-3:
        block.load_state_dict(saved)
        grams.clear()
        grams.update(saved_grams)
        Logger.warning(f"input scaling changed the float block (relative {err:.1e}); undone")
        chosen = {}
    for m in qmods:
        m._cache = None
    return chosen


def _load_progress(path, sig):
    if not path:
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as e:  # an unreadable progress file only costs the restart
        Logger.warning(f"ignoring unreadable stage1 progress file {path}: {e}")
        return None
    if not isinstance(data, dict) or data.get("signature") != sig:
        Logger.info(f"stage1: progress file {path} is from other settings; starting over")
        return None
    return data


def _save_progress(path, sig, done, states):
    with atomic_path(path) as tmp:
        torch.save({"signature": sig, "done": done, "state": states}, tmp)
