"""Fake-quant modules for ``Quant_INT16-4``: the torch form of ``dopt.quant.lowbit``.

A swapped-in module keeps the original ``weight``/``bias`` Parameters (so a tied
embedding / lm_head stays one tensor) and adds ``quant_alpha`` (learned clipping, decoder
Linear layers only) and ``input_amax`` (the calibrated INT16 input range). The state dict
therefore holds the HuggingFace keys plus ``*.quant_alpha`` and ``*.input_amax``, which is
what ``trained_quant_weight.pth`` / ``trained.pth`` store and ``load_state_dict(strict=True)``
expects after ``optimize_model``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dopt.quant.lowbit import MIN_ACT_AMAX, MIN_RANGE, act_qrange, group_bounds, qmax

# sigmoid(6) = 0.9975: clip factors start just inside the min/max range (the bound is open)
ALPHA_INIT_LOGIT = 6.0


def alpha_logit(alpha: torch.Tensor) -> torch.Tensor:
    """Inverse of the clip-factor sigmoid, capped at the initial value."""
    a = alpha.clamp(1e-4, 1.0)
    return torch.log(a / (1 - a).clamp_min(1e-12)).clamp(max=ALPHA_INIT_LOGIT)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.round(x)
    return (torch.round(x) - x).detach() + x


def _padded(w: torch.Tensor, group_size: int):
    """``[out, G, size]`` view of the groups. A short last group is padded by repeating its
    last column, which leaves its min/max (hence its scale and zero) unchanged."""
    cols = w.shape[1]
    size = cols if group_size is None or group_size <= 0 or group_size >= cols else group_size
    pad = (-cols) % size
    if pad:
        w = torch.cat([w, w[:, -1:].expand(-1, pad)], 1)
    return w.reshape(w.shape[0], -1, size)


def group_minmax(w: torch.Tensor, group_size: int):
    g = _padded(w, group_size)
    return g.amax(dim=2), g.amin(dim=2)


def group_qparams(w: torch.Tensor, bits: int, group_size: int, alpha=None, minmax=None):
    """``(scale, zero)`` ``[out, G]``; ``alpha [out, G, 2]`` = (hi, lo) clip factors."""
    hi, lo = minmax if minmax is not None else group_minmax(w, group_size)
    if alpha is not None:
        hi = hi * alpha[..., 0]
        lo = lo * alpha[..., 1]
    levels = float(qmax(bits))
    scale = torch.clamp(hi - lo, min=MIN_RANGE) / levels
    zero = torch.clamp(round_ste(-lo / scale), 0, levels)
    return scale, zero


def fake_quant_weight(w, bits: int, group_size: int, alpha=None, minmax=None):
    scale, zero = group_qparams(w, bits, group_size, alpha, minmax)
    g = _padded(w, group_size)
    q = torch.clamp(round_ste(g / scale[..., None]) + zero[..., None], 0, float(qmax(bits)))
    return ((q - zero[..., None]) * scale[..., None]).reshape(w.shape[0], -1)[:, :w.shape[1]]


def fake_quant_act(x, amax, bits: int = 16):
    lo, hi = act_qrange(bits)
    scale = torch.clamp(amax, min=MIN_ACT_AMAX) / hi
    return torch.clamp(round_ste(x / scale), lo, hi) * scale


class _QuantBase(nn.Module):
    """Shared switches; ``hardware`` caches the frozen grid weight for inference."""

    def _init_quant(self, w_bits: int, group_size: int, in_bits: int, strategy: str):
        self.w_bits, self.group_size, self.in_bits = int(w_bits), int(group_size), int(in_bits)
        self.strategy = strategy
        self.weight_quant, self.input_quant, self.calibrating, self.hardware = True, False, False, False
        self._cache = None

    def qweight(self) -> torch.Tensor:
        """The weight the forward uses (float, fake-quantized or frozen grid)."""
        if not self.weight_quant:
            return self.weight
        alpha = self.clip_factors()
        if self.hardware or not torch.is_grad_enabled():
            key = (self.weight._version, self.weight.data_ptr(),
                   None if alpha is None else self.quant_alpha._version)
            if self._cache is None or self._cache[0] != key:
                with torch.no_grad():
                    self._cache = (key, fake_quant_weight(self.weight, self.w_bits,
                                                          self.group_size, alpha))
            return self._cache[1]
        key = (self.weight._version, self.weight.data_ptr())
        if getattr(self, "_minmax", None) is None or self._minmax[0] != key:
            with torch.no_grad():  # the weight is frozen while clip factors train
                self._minmax = (key, group_minmax(self.weight, self.group_size))
        return fake_quant_weight(self.weight, self.w_bits, self.group_size, alpha,
                                 self._minmax[1] if not self.weight.requires_grad else None)

    def clip_factors(self):
        return None

    def extra_repr(self) -> str:
        return (f"{self.strategy}, w{self.w_bits} g{self.group_size}, in{self.in_bits}, "
                f"weight_quant={self.weight_quant}, input_quant={self.input_quant}")


class QuantLinear(_QuantBase):
    """``Quant_act_weight_eco`` (learned clipping) and ``Quant_lm_head`` (min/max)."""

    def __init__(self, linear: nn.Linear, w_bits: int, group_size: int, in_bits: int,
                 strategy: str, learn_clip: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._init_quant(w_bits, group_size, in_bits, strategy)
        if learn_clip:
            groups = len(group_bounds(self.in_features, group_size))
            self.quant_alpha = nn.Parameter(torch.full((self.out_features, groups, 2),
                                                       ALPHA_INIT_LOGIT,
                                                       dtype=torch.float32,
                                                       device=linear.weight.device))
        else:
            self.quant_alpha = None
        self.register_buffer("input_amax", torch.zeros((), dtype=torch.float32,
                                                       device=linear.weight.device))

    def clip_factors(self):
        return None if self.quant_alpha is None else torch.sigmoid(self.quant_alpha)

    def forward(self, x):
        if self.calibrating:
            with torch.no_grad():
                self.input_amax.copy_(torch.maximum(self.input_amax,
                                                    x.detach().abs().amax().float()))
        if self.input_quant:
            if float(self.input_amax) <= 0:
                raise RuntimeError("input quantization is on but the layer was never "
                                   "calibrated (run stage2 / set_calibrate_state first)")
            x = fake_quant_act(x, self.input_amax.to(x.dtype), self.in_bits)
        w = self.qweight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class QuantEmbedding(_QuantBase):
    """``Quant_Embed_MinMax``: the table quantized per row group with its min/max."""

    def __init__(self, emb: nn.Embedding, w_bits: int, group_size: int, in_bits: int,
                 strategy: str):
        super().__init__()
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.padding_idx = emb.padding_idx
        self.weight = emb.weight
        self._init_quant(w_bits, group_size, in_bits, strategy)

    def forward(self, ids):
        return F.embedding(ids, self.qweight(), self.padding_idx)


def quant_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantBase)]

