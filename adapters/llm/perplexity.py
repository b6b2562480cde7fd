"""Perplexity of a causal LM on a fixed token stream: the number LLM W4 quality is judged by.

Convention (the HuggingFace "perplexity of fixed-length models" sliding window): windows of
``context`` tokens start at 0, ``stride``, 2*``stride``, ...; each token is scored once,
in the first window that holds it with at least one token before it; a token's context is
everything before it inside its window. No BOS is prepended (SmolLM2 is trained without
one); the first token of the stream is never scored. With ``stride == context`` the windows
do not overlap and each window's first token goes unscored (scored = N - windows); with
``stride < context`` every token after the first is scored (scored = N - 1) and all but the
first window's tokens see at least ``context - stride`` tokens of context.
``ppl = exp(sum of token NLL / scored)``, per-token NLL in float32,
summed in float64.
"""
from __future__ import annotations

import math

from dopt.errors import DoptError


def perplexity(model, tokens, context: int = 512, stride: int = 512,
               max_tokens: int | None = None) -> dict:
    """``{"ppl", "nll", "tokens" (scored), "windows"}`` of ``model`` on ``tokens``
    (the first ``max_tokens`` of them when given). The model runs in eval mode under
    ``torch.inference_mode`` and is put back in its previous mode."""
    import torch
    import torch.nn.functional as F

    if context < 2:
        raise DoptError("the perplexity context must hold at least 2 tokens", field="context",
                        found=str(context))
    if not 0 < stride <= context:
        raise DoptError("the perplexity stride must be in 1..context", field="stride",
                        expected=f"1..{context}", found=str(stride))
    ids = torch.as_tensor(list(tokens)[:max_tokens] if max_tokens else list(tokens),
                          dtype=torch.long)
    n = ids.numel()
    if n < 2:
        raise DoptError("perplexity needs at least 2 tokens", field="tokens", found=str(n))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, scored, windows, prev_end = 0.0, 0, 0, 0
    try:
        with torch.inference_mode():
            for begin in range(0, n, stride):
                end = min(begin + context, n)
                first = max(prev_end, begin + 1)  # first target position of this window
                if first >= end:
                    break
                logits = model(ids[begin:end].unsqueeze(0).to(device), use_cache=False).logits
                pred = logits[0, first - begin - 1:end - begin - 1].float()
                tok_nll = F.cross_entropy(pred, ids[first:end].to(device), reduction="none")
                nll += tok_nll.double().sum().item()
                scored += end - first
                windows += 1
                prev_end = end
                if end == n:
                    break
    finally:
        model.train(was_training)
    return {"ppl": math.exp(nll / scored), "nll": nll / scored, "tokens": scored,
            "windows": windows}
