"""Knowledge distillation for fine-tuning a pruned or quantized model (``docs/pruning.md``).

The settings and their schedule live here, framework-free; the loss itself is the
adapter's (``dopt_distill_loss``: a ``torch.nn.Module`` for PyTorch, a Keras model wrapper
for ``model.fit``):

    kd = dopt.distill.loss(teacher, student, temperature=4.0, features={"layer3": "layer3"})
    ...
    logits = student(x)
    loss = kd(logits, x, labels, progress=step / steps)   # CE + T^2 KL + feature MSE

``loss = ce_weight * CE(labels) + kd_weight * T**2 * KL(teacher_T || student_T)
+ feature_weight * mean over pairs of MSE(adapter(student feature), teacher feature)``,
where ``kd_weight`` and ``feature_weight`` follow ``schedule`` from their value at the start
to ``final`` times it at the end (Hinton et al. 2015 for the ``T**2`` scaling; FitNets for
the 1x1 feature adapters).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from ..errors import DoptError

SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class DistillConfig:
    """Validated distillation settings (``check`` raises a ``DoptError`` naming the field).

    ``features``: ``{student layer name: teacher layer name}`` whose outputs are matched;
    empty for logits only."""

    temperature: float = 4.0
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    feature_weight: float = 0.0
    features: dict = field(default_factory=dict)
    schedule: str = "constant"
    final: float = 1.0

    def check(self) -> "DistillConfig":
        def bad(name, expected):
            return DoptError("a distillation setting is out of range", field=name,
                             expected=expected, found=repr(getattr(self, name)))
        for name in ("temperature", "kd_weight", "ce_weight", "feature_weight", "final"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, "a finite number")
        if not self.temperature > 0:
            raise bad("temperature", "a temperature > 0 (typically 2-8)")
        for name in ("kd_weight", "ce_weight", "feature_weight", "final"):
            if getattr(self, name) < 0:
                raise bad(name, "a weight >= 0")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", " / ".join(SCHEDULES))
        if not isinstance(self.features, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.features.items()):
            raise bad("features", "{student layer name: teacher layer name}")
        if self.features and self.feature_weight == 0:
            raise DoptError("feature pairs are given but feature_weight is 0",
                            field="feature_weight", hint="set feature_weight > 0 (e.g. 1.0) "
                                                         "or drop features")
        if self.kd_weight == 0 and self.feature_weight == 0:
            raise DoptError("both kd_weight and feature_weight are 0: nothing is distilled",
                            field="kd_weight", hint="set kd_weight > 0")
        return self

    def factor(self, progress: float | None) -> float:
        """The schedule's multiplier of the distillation weights at ``progress`` (0..1 of
        training; ``None`` = the start)."""
        p = min(max(float(progress or 0.0), 0.0), 1.0)
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "linear":
            return 1.0 + (self.final - 1.0) * p
        return self.final + (1.0 - self.final) * 0.5 * (1 + math.cos(math.pi * p))

    def weights(self, progress: float | None = None) -> dict[str, float]:
        """``{"ce", "kd", "feature"}`` weights at ``progress``."""
        f = self.factor(progress)
        return {"ce": self.ce_weight, "kd": self.kd_weight * f,
                "feature": self.feature_weight * f}


def make_config(**settings) -> DistillConfig:
    """A checked ``DistillConfig``; an unknown setting is an error naming it."""
    known = {f.name for f in fields(DistillConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise DoptError(f"unknown distillation setting(s) {', '.join(unknown)}",
                        field=unknown[0], expected=", ".join(sorted(known)))
    return DistillConfig(**settings).check()


def loss(teacher, student, config: DistillConfig | None = None, **settings):
    """The adapter's distillation loss for ``student`` (see the module docstring)."""
    from .. import plugin_manager
    if config is not None and settings:
        raise DoptError("pass either a DistillConfig or keyword settings, not both",
                        field="config")
    cfg = config.check() if config is not None else make_config(**settings)
    adapter = plugin_manager.adapter_for(student)
    return plugin_manager.call_adapter(adapter, "distill_loss", teacher=teacher,
                                       student=student, config=cfg)


__all__ = ["DistillConfig", "SCHEDULES", "make_config", "loss"]
