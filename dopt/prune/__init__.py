"""NPU-aware structured pruning (``docs/pruning.md``).

The widths are chosen against the emulated NPU's latency estimate for the precision the
model will run at, on the profile's channel alignment (``dopt.prune.search``); the
framework's dependency-graph library carries them out (``PruneBackend``, reached through
the adapter's ``dopt_prune_backend`` hook). ``dopt prune`` is the no-code path.

    import dopt.prune
    result = dopt.prune.prune(model, (1, 3, 224, 224), "speedup=1.3", precision="int8",
                              calib_data=loader)      # model is pruned in place
    result.save("pruned/")                            # pruned.py + pruned.pth + pruned.onnx
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import DoptError
from .backend import Group, PruneBackend, backend_class
from .search import DEFAULT_MAX_RATIO, PrunePlan, aligned_widths, choose_widths, group_widths
from .sensitivity import render_text, sensitivity_table, write_sensitivity
from .target import PruneTarget, check_precision

__all__ = ["prune", "PruneResult", "PruneTarget", "PrunePlan", "PruneBackend", "Group",
           "aligned_widths", "group_widths", "choose_widths", "sensitivity_table", "write_sensitivity",
           "render_text", "backend_class"]


@dataclass
class PruneResult:
    """What ``prune`` did: the plan (widths, estimates before/after), the sensitivity table
    if one was measured, and the backend holding the pruned model."""

    plan: PrunePlan
    sensitivity: dict | None
    backend: Any

    @property
    def model(self):
        return self.backend.model

    def save(self, out_dir, name: str = "pruned", builder: str | None = None) -> dict:
        """``<name>.py`` (rebuild), ``<name>.pth`` (state dict), ``<name>.onnx`` and
        ``prune_plan.json`` in ``out_dir``; returns their paths."""
        from ..formats.fileio import write_json_atomic
        files = self.backend.save(Path(out_dir), name, builder=builder)
        write_json_atomic(Path(out_dir) / "prune_plan.json", self.plan.as_dict())
        files["plan"] = str(Path(out_dir) / "prune_plan.json")
        if self.sensitivity is not None:
            for p in write_sensitivity(self.sensitivity, Path(out_dir)):
                files[p.stem + p.suffix.replace(".", "_")] = str(p)
        return files


def _target(target) -> PruneTarget:
    if isinstance(target, PruneTarget):
        return target.check()
    if isinstance(target, str):
        return PruneTarget.parse(target, field="target")
    raise DoptError("the pruning target must be a string such as 'speedup=1.3' or a "
                    "PruneTarget", field="target", found=type(target).__name__)


def prune(model, input_shape, target, *, precision: str = "int8",
          importance: str = "magnitude", calib_data=None,
          eval_fn: Callable[[Any], float] | None = None, sensitivity: bool = False,
          ignored_layers=(), max_ratio: float = DEFAULT_MAX_RATIO, profile="kirin9000",
          depth: bool = False, log: Callable[[str], None] | None = None,
          **backend_options) -> PruneResult:
    """Prune ``model`` in place to meet ``target`` on the emulated NPU.

    ``input_shape``: the deployed input with the batch first, e.g. ``(1, 3, 224, 224)``.
    ``target``: ``target_ms=``, ``speedup=``, ``size=`` or ``macs=`` (``PruneTarget``).
    ``precision``: ``int8`` (channels on 32-blocks, INT8 estimate) or ``fp16`` (16-blocks).
    ``importance``: the library's channel criterion (``magnitude``, ``taylor``,
    ``bn_scale``). ``calib_data``: batches for BatchNorm recalibration (and Taylor's
    gradients). ``sensitivity=True`` measures the per-group table with ``eval_fn(model)``
    and lets it weigh the groups. ``depth=True`` also lets whole residual blocks
    (``y = x + f(x)``, same shape in and out) go, which removes their kernels: on small,
    launch-bound networks that is what lowers the estimate, not channels.
    """
    from .. import plugin_manager
    from ..npu.profile import HardwareProfile, load_profile
    goal = _target(target)
    check_precision(precision, field="precision")
    prof = profile if isinstance(profile, HardwareProfile) else load_profile(profile)
    adapter = plugin_manager.adapter_for(model)
    cls = backend_class(adapter)
    backend = cls(model, input_shape=input_shape, importance=importance,
                  calib_data=calib_data, eval_fn=eval_fn, ignored_layers=ignored_layers,
                  log=log, **({"depth": True} if depth else {}), **backend_options)
    table = None
    if sensitivity:
        table = sensitivity_table(backend, prof.channel_block(precision == "int8"),
                                  max_ratio=max_ratio, log=log)
    plan = choose_widths(backend, goal, prof, precision=precision, sensitivity=table,
                         max_ratio=max_ratio, log=log)
    backend.apply(plan.widths)
    return PruneResult(plan=plan, sensitivity=table, backend=backend)
