"""Knowledge-distillation loss for PyTorch (``dopt.distill``; settings and schedule in the
core, ``dopt.distill.DistillConfig``).

    kd = DistillationLoss(teacher, student, temperature=4.0,
                          features={"layer3": "layer3"}, feature_weight=1.0)
    opt = torch.optim.SGD(list(student.parameters()) + list(kd.parameters()), lr=...)
    for step, (x, y) in enumerate(loader):
        loss = kd(student(x), x, y, progress=step / steps)

The teacher is frozen (eval mode, no gradients) and runs inside the call on the same
inputs; student features are caught by forward hooks during the student's own forward, so
call the loss right after it. ``kd.parameters()`` are the 1x1 feature adapters (none when
widths agree): give them to the optimizer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dopt.distill import DistillConfig, make_config
from dopt.errors import DoptError


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _module(model: nn.Module, name: str, role: str, field: str) -> nn.Module:
    try:
        return _unwrap(model).get_submodule(name)
    except AttributeError:
        raise DoptError(f"the {role} has no layer '{name}'", field=field,
                        expected="a name from model.named_modules()") from None


def _width_direct(m: nn.Module) -> int | None:
    for attr in ("out_channels", "num_features", "out_features"):
        if isinstance(getattr(m, attr, None), int):
            return getattr(m, attr)
    return None


def _width(m: nn.Module) -> int | None:
    """Channels (or features) a layer outputs: its own, else its last sized sub-layer's."""
    w = _width_direct(m)
    if w is None:
        inner = [c for c in m.modules() if c is not m and _width_direct(c) is not None]
        w = _width_direct(inner[-1]) if inner else None
    return w


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over the batch."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=1)
    p = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(s, p, reduction="batchmean", log_target=True) * (t * t)


class DistillationLoss(nn.Module):
    """CE on labels + ``T**2``-scaled KL to the frozen teacher + optional feature MSE."""

    def __init__(self, teacher: nn.Module, student: nn.Module,
                 config: DistillConfig | None = None, **settings):
        super().__init__()
        if config is not None and settings:
            raise DoptError("pass either a DistillConfig or keyword settings, not both",
                            field="config")
        self.config = config.check() if config is not None else make_config(**settings)
        if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
            raise DoptError("distillation needs a torch.nn.Module teacher and student",
                            field="teacher", found=f"{type(teacher).__name__}, "
                                                   f"{type(student).__name__}")
        teacher = _unwrap(teacher)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self._teacher = [teacher]   # not a submodule: stays out of parameters() and train()
        self._feats: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        self._hooks = []
        self.adapters = nn.ModuleDict()
        self.pairs = list(self.config.features.items())
        for i, (s_name, t_name) in enumerate(self.pairs):
            sm = _module(student, s_name, "student", f"features[{s_name!r}]")
            tm = _module(teacher, t_name, "teacher", f"features[{s_name!r}]")
            self._hooks.append(sm.register_forward_hook(self._catch("student", s_name)))
            self._hooks.append(tm.register_forward_hook(self._catch("teacher", t_name)))
            sw, tw = _width(sm), _width(tm)
            if sw is None or tw is None:
                raise DoptError(f"cannot tell the output width of layer pair {s_name} -> "
                                f"{t_name}", field=f"features[{s_name!r}]",
                                hint="pair layers that end in a convolution, BatchNorm or "
                                     "Linear layer")
            if sw != tw:
                self.adapters[str(i)] = nn.Conv2d(sw, tw, 1, bias=False)
        self.last: dict[str, float] = {}

    def _catch(self, side: str, name: str):
        def hook(_m, _inp, out):
            self._feats[side][name] = out[0] if isinstance(out, (tuple, list)) else out
        return hook

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def remove(self) -> None:
        """Detach the feature hooks from both models."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _adapt(self, i: int, feat: torch.Tensor) -> torch.Tensor:
        key = str(i)
        if key not in self.adapters:
            return feat
        a = self.adapters[key]
        if feat.dim() == 2:   # (N, C): a 1x1 convolution over a 1x1 map
            return F.linear(feat, a.weight.flatten(1))
        return a(feat)

    def forward(self, student_logits: torch.Tensor, inputs=None, labels=None, *,
                teacher_logits: torch.Tensor | None = None,
                progress: float | None = None) -> torch.Tensor:
        """The total loss; ``self.last`` keeps its parts as floats for logging."""
        cfg = self.config
        w = cfg.weights(progress)
        if teacher_logits is None:
            if inputs is None:
                raise DoptError("the distillation loss needs the inputs (to run the teacher) "
                                "or teacher_logits", field="inputs")
            with torch.no_grad():
                teacher_logits = self.teacher(inputs)
        teacher_logits = teacher_logits.detach()
        total = student_logits.new_zeros((), dtype=torch.float32)
        parts = {}
        if labels is not None and w["ce"] > 0:
            parts["ce"] = F.cross_entropy(student_logits.float(), labels)
            total = total + w["ce"] * parts["ce"]
        if w["kd"] > 0:
            parts["kd"] = kd_kl(student_logits, teacher_logits, cfg.temperature)
            total = total + w["kd"] * parts["kd"]
        if self.pairs and w["feature"] > 0:
            terms = []
            for i, (s_name, t_name) in enumerate(self.pairs):
                s = self._feats["student"].get(s_name)
                t = self._feats["teacher"].get(t_name)
                if s is None or t is None:
                    raise DoptError(f"no feature was caught at {s_name if s is None else t_name}",
                                    field=f"features[{s_name!r}]",
                                    hint="call the loss right after the student's forward, "
                                         "on the layers that forward runs")
                s = self._adapt(i, s.float())
                t = t.detach().float()
                if s.dim() == 4 and s.shape[2:] != t.shape[2:]:
                    s = F.adaptive_avg_pool2d(s, t.shape[2:])
                terms.append(F.mse_loss(s, t))
            parts["feature"] = torch.stack(terms).mean()
            total = total + w["feature"] * parts["feature"]
        self._feats["student"].clear()
        self._feats["teacher"].clear()
        self.last = {k: float(v.detach()) for k, v in parts.items()}
        return total
