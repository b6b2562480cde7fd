"""The PyTorch backend of the core PTQ algorithm (``dopt.ptq``), for ``dopt_so`` on ``net.py``.

The user's float model is worked on as it is: BatchNorm stays a module, and the
algorithm's changes to deployed (BN-folded) weights land on the parameters that make
them - scaling a BN-followed channel scales gamma and beta, a bias correction there moves
beta. So the calibrated state dict keeps the user's keys and loads into
``optimize_model(Net(), config)`` like one from plugin-style calibration. The model is
written through the adapter's own ``optimize_model`` + ``generate_final_model``, so the
files match what plugin-style quantization writes.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dopt.formats.strategy_config import FLOAT, INT8
from dopt.ptq.backend import PtqLayer, QuantPlan

from . import layers as L
from .api import generate_config_file, optimize_model
from .export import generate_final_model
from .modules import fold_bn, quant_layers

# positively homogeneous activations, f(x / s) = f(x) / s for s > 0: CLE is exact through them
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity)
_HOMOGENEOUS_CALLS = (F.relu, torch.relu, F.leaky_relu)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


class TorchPtqBackend:
    """``dopt.ptq.PtqBackend`` over an ``nn.Module`` in eval mode."""

    def __init__(self, model: nn.Module, input_shapes: dict, work: Path, *,
                 device=None, log=print):
        self.model = model.eval()
        self.untouched = copy.deepcopy(model)
        self.device = device or torch.device("cpu")
        self.input_shapes, self.work, self.log = input_shapes, Path(work), log
        self.mods = dict(model.named_modules())
        self.names = L.quantizable_layers(model)
        self.gm = L.trace(model)     # one trace serves BN folding and CLE pairs
        self.bn = L.conv_bn_pairs(model, self.gm)
        self.qmodel = None
        self._handles: list = []   # calibration hooks, removed before writing

    # -- the model's layers ------------------------------------------------------------

    def layers(self) -> dict[str, PtqLayer]:
        out = {}
        for name in self.names:
            m = self.mods[name]
            if isinstance(m, nn.Conv2d):
                out[name] = PtqLayer(name, "conv", m.groups, m.in_channels, name, 1,
                                     f"{name}.weight")
            else:
                out[name] = PtqLayer(name, "linear", 1, m.in_features, name, -1,
                                     f"{name}.weight")
        return out

    def _bn(self, name: str):
        b = self.bn.get(name)
        return self.mods[b] if b else None

    def weight(self, name: str) -> np.ndarray:
        m, bn = self.mods[name], self._bn(name)
        with torch.no_grad():
            w = fold_bn(m.weight, m.bias, bn)[0] if bn is not None else m.weight
        return _np(w)

    def equalization_pairs(self) -> list[tuple[str, str]]:
        gm = self.gm
        if gm is None:   # an untraceable forward only loses CLE
            self.log(f"cross-layer equalization skipped: {type(self.model).__name__} does not "
                     f"trace with torch.fx")
            return []
        calls: dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1

        def module(n):
            return self.mods.get(n.target) if n.op == "call_module" else None

        def only_user(n):
            users = list(n.users)
            return users[0] if len(users) == 1 else None

        def homogeneous(n):
            return (isinstance(module(n), _HOMOGENEOUS_MODULES)
                    or n.op == "call_function" and n.target in _HOMOGENEOUS_CALLS
                    or n.op == "call_method" and n.target in ("relu", "relu_"))

        pairs = []
        for n in gm.graph.nodes:
            first = n.target if isinstance(module(n), nn.Conv2d) else None
            if first not in self.names or calls[first] != 1:
                continue
            bn = self._bn(first)
            if bn is not None and not bn.affine:
                continue
            nxt = only_user(n)
            if nxt is not None and bn is not None:
                nxt = only_user(nxt)
            if nxt is not None and homogeneous(nxt):
                nxt = only_user(nxt)
            if nxt is None or not isinstance(module(nxt), nn.Conv2d) or \
                    nxt.target not in self.names or calls[nxt.target] != 1:
                continue
            pairs.append((first, nxt.target))
        return pairs

    def scale_channels(self, name, *, out_scale=None, in_scale=None) -> None:
        m, bn = self.mods[name], self._bn(name)
        with torch.no_grad():
            if out_scale is not None:
                s = torch.as_tensor(out_scale, dtype=torch.float64)
                if bn is not None:   # folded w = w * gamma / sigma: scale gamma and beta
                    bn.weight.copy_((bn.weight.double() * s).to(bn.weight.dtype))
                    bn.bias.copy_((bn.bias.double() * s).to(bn.bias.dtype))
                else:
                    shape = (-1,) + (1,) * (m.weight.dim() - 1)
                    m.weight.copy_((m.weight.double() * s.reshape(shape)).to(m.weight.dtype))
                    if m.bias is not None:
                        m.bias.copy_((m.bias.double() * s).to(m.bias.dtype))
            if in_scale is not None:
                w = m.weight.double()
                g = m.groups if isinstance(m, nn.Conv2d) else 1
                c, cpg = w.shape[0], w.shape[1]
                s = torch.as_tensor(in_scale, dtype=torch.float64)
                w = w.reshape(g, c // g, cpg, -1) * s.reshape(g, 1, cpg, 1)
                m.weight.copy_(w.reshape(m.weight.shape).to(m.weight.dtype))

    def add_to_bias(self, name, delta) -> bool:
        m, bn = self.mods[name], self._bn(name)
        target = bn.bias if bn is not None and bn.affine else \
            (m.bias if bn is None else None)
        if target is None:
            return False
        with torch.no_grad():
            d = torch.as_tensor(delta, dtype=torch.float64)
            target.copy_((target.double() + d).to(target.dtype))
        return True

    # -- running it ----------------------------------------------------------------------

    def _feed(self, feed: dict) -> dict:
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device)
                for k, v in feed.items()}

    def run_batch(self, inputs):
        seen: dict[str, list] = {}

        def hook(name):
            def pre(_mod, args):
                seen.setdefault(name, []).append(_np(args[0]))
            return pre

        self._handles = [self.mods[n].register_forward_pre_hook(hook(n)) for n in inputs]

        def run(feed: dict) -> dict:
            seen.clear()
            with torch.no_grad():
                self.model(**self._feed(feed))
            out = {}
            for n in inputs:
                parts = seen.get(n, [])
                same = parts and all(p.shape[1:] == parts[0].shape[1:] for p in parts)
                out[n] = np.concatenate(parts) if same else (parts[0] if parts else
                                                             np.zeros((0,), np.float32))
            return out

        return run

    def write(self, plan: QuantPlan) -> dict:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.model.cpu()
        shape = ";".join(f"{k}:{','.join(map(str, v))}" for k, v in self.input_shapes.items())
        gen = self.work / "config_gen.json"
        generate_config_file(self.model, shape, str(gen))
        doc = json.loads(gen.read_text())
        for n, entry in doc["layer_strategy"].items():
            entry["quant_strategy"] = INT8 if n in plan.quantized else FLOAT
        doc["dopt_options"] = {"activation_range": plan.algorithm}
        cfg = self.work / "config.json"
        cfg.write_text(json.dumps(doc, indent=2))
        qmodel = optimize_model(copy.deepcopy(self.model), str(cfg))
        for name, q in quant_layers(qmodel):
            lo, hi = plan.ranges[name]
            with torch.no_grad():
                q.act.lo.fill_(lo)
                q.act.hi.fill_(hi)
                q.act.initialized.fill_(1)
        qmodel.eval()
        ckpt = self.work / "quant.pth"
        torch.save(qmodel.state_dict(), ckpt)
        files = generate_final_model(copy.deepcopy(self.model), str(cfg), str(ckpt),
                                     str(self.work / "final"))
        self.qmodel = qmodel
        return dict(files, config=str(cfg), checkpoint=str(ckpt))

    def outputs(self, feed: dict, *, quantized: bool) -> list[np.ndarray]:
        model = self.qmodel if quantized else self.untouched.cpu()
        with torch.no_grad():
            out = model(**{k: torch.from_numpy(np.ascontiguousarray(v))
                           for k, v in feed.items()})
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [_np(o) for o in outs]
