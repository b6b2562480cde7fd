"""Structured channel pruning for PyTorch on Torch-Pruning's dependency graph
(``dopt.prune.backend.PruneBackend``).

Torch-Pruning (MIT) traces the model once and groups every parameter dimension that must
shrink together (a residual add ties the convolutions that feed it, a depthwise convolution
ties its input to its output); its importance criteria rank the channels inside a group.
dopt's core decides the widths (``dopt.prune.search``); this file only carries them out.
"""
from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from dopt.errors import DoptError, MissingExtraError
from dopt.prune.backend import Group

from .export import OPSET

ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
IMPORTANCE = ("magnitude", "taylor", "bn_scale")
#: batches of calibration data that re-estimate BatchNorm statistics after pruning
BN_BATCHES = 20


def torch_pruning():
    try:
        import torch_pruning as tp
    except ImportError:
        raise MissingExtraError("torch-pruning", "torch", "structured pruning") from None
    return tp


def first_tensor(batch):
    """The input of a calibration batch: the batch itself or the first item of a tuple."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not torch.is_tensor(batch):
        batch = torch.as_tensor(np.asarray(batch))
    return batch


def recalibrate_bn(model: nn.Module, data: Iterable | None, batches: int = BN_BATCHES) -> bool:
    """Re-estimate every BatchNorm's running statistics on ``batches`` batches of ``data``
    (a cumulative average, not the training momentum). False when there is nothing to do."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats]
    if not bns or data is None:
        return False
    device = _device(model)
    was = model.training
    moms = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    with torch.no_grad():
        for i, batch in enumerate(data):
            if i >= batches:
                break
            model(first_tensor(batch).to(device))
            seen += 1
    for m, mom in zip(bns, moms):
        m.momentum = mom
    model.train(was)
    if not seen:
        raise DoptError("the calibration data gave no batch for the BatchNorm recalibration",
                        field="calib_data", hint="pass a non-empty iterable of input batches")
    return True


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class TorchPruneBackend:
    """``model`` is pruned in place by ``apply``; candidates are pruned copies.

    ``calib_data``: batches (tensors or ``(inputs, labels)``) for BatchNorm recalibration
    and, with ``importance="taylor"``, for the gradients (``loss_fn(logits, labels)``,
    cross-entropy by default). ``eval_fn(model) -> float``: the metric, higher is better
    (needed only for the sensitivity table).
    """

    framework = "PyTorch"

    def __init__(self, model: nn.Module, *, input_shape, importance: str = "magnitude",
                 calib_data: Iterable | None = None,
                 eval_fn: Callable[[nn.Module], float] | None = None,
                 ignored_layers: Iterable[str] = (), loss_fn=None, bn_batches: int = BN_BATCHES,
                 depth: bool = False, log: Callable[[str], None] | None = None):
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        if not isinstance(model, nn.Module):
            raise DoptError("structured pruning needs a torch.nn.Module", field="model",
                            found=type(model).__name__)
        if importance not in IMPORTANCE:
            raise DoptError("unknown importance criterion", field="importance",
                            expected=" / ".join(IMPORTANCE), found=repr(importance))
        self.tp = torch_pruning()
        self.model = model
        self.cls_name = type(model).__name__
        self.input_shape = tuple(int(d) for d in input_shape)
        if len(self.input_shape) < 2 or any(d <= 0 for d in self.input_shape):
            raise DoptError("the input shape must be positive integers with the batch first",
                            field="input_shape", found=repr(input_shape),
                            expected="e.g. (1, 3, 224, 224)")
        self.importance_name = importance
        self.calib_data, self.eval_fn, self.loss_fn = calib_data, eval_fn, loss_fn
        self.bn_batches = bn_batches
        self.log = log or (lambda _m: None)
        names = dict(model.named_modules())
        unknown = [n for n in ignored_layers if n not in names]
        if unknown:
            raise DoptError(f"ignored layer(s) {', '.join(unknown)} are not modules of "
                            f"{self.cls_name}", field="ignored_layers",
                            expected="names from model.named_modules()")
        self.ignored = list(ignored_layers)
        self.depth = bool(depth)
        self.original = {n: module_signature(m) for n, m in model.named_modules()}
        self.original_types = {n: type(m) for n, m in model.named_modules()}
        self._imp: dict[str, np.ndarray] = {}
        self._groups: list[Group] | None = None
        self._last: tuple | None = None

    @classmethod
    def for_command(cls, **options):
        """The ``dopt prune`` job (``prune_finetune.TorchPruneJob``) built from its files."""
        from .prune_finetune import TorchPruneJob
        return TorchPruneJob(**options)

    # --- the dependency graph --------------------------------------------------------------

    def example(self, model=None) -> torch.Tensor:
        return torch.zeros(self.input_shape, device=_device(model or self.model))

    def _graph(self, model: nn.Module):
        was = model.training
        model.eval()
        try:
            dg = self.tp.DependencyGraph().build_dependency(model, example_inputs=self.example(model),
                                                            verbose=False)
        except Exception as e:  # noqa: BLE001 - tracing runs the user's forward
            raise DoptError(f"the channel dependency graph of {self.cls_name} could not be "
                            f"built ({e.__class__.__name__}: {e})", field="model",
                            hint="the model must run a forward pass on a zero tensor of the "
                                 "given input shape; data-dependent control flow cannot be "
                                 "traced") from None
        finally:
            model.train(was)
        return dg

    def _root_groups(self, model: nn.Module, dg):
        """``[(name, root module, handler, group)]`` of the prunable groups of ``model``."""
        names = {m: n for n, m in model.named_modules()}
        ignored = [model.get_submodule(n) for n in self.ignored]
        # layers that produce a network output keep their width (classes, boxes, ...)
        ignored += [m for m, node in dg.module2node.items()
                    if isinstance(m, ROOT_TYPES) and not node.outputs]
        out = []
        for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=ROOT_TYPES):
            dep = group[0].dep
            root = dep.target.module
            if root not in names or not isinstance(root, ROOT_TYPES):
                continue
            out.append((names[root], root, dep.handler, group))
        return out, names

    def groups(self) -> list[Group]:
        if self._groups is None:
            dg = self._graph(self.model)
            found, names = self._root_groups(self.model, dg)
            self._groups = []
            for name, root, _h, group in found:
                members = sorted({names[d.target.module] for d, _i in group
                                  if d.target.module in names and
                                  isinstance(d.target.module, ROOT_TYPES)})
                self._groups.append(Group(name=name, channels=_width(root),
                                          members=tuple(members)))
            if self._groups:
                self._importance(found)
            if self.depth:
                self._groups += self._block_groups()
        return list(self._groups)

    def _samples(self, n: int = 4) -> list[torch.Tensor]:
        """A few input batches: the calibration data's, else seeded normal noise."""
        dev = _device(self.model)
        out = []
        for i, batch in enumerate(self.calib_data or ()):
            if i >= n:
                break
            out.append(first_tensor(batch).to(dev))
        if not out:
            g = torch.Generator().manual_seed(0)
            out = [torch.randn(self.input_shape, generator=g).to(dev)]
        return out

    def _block_groups(self) -> list[Group]:
        from .prune_depth import BLOCK, block_influence, find_blocks
        samples = self._samples()
        blocks = find_blocks(self.model, samples[0], excluded=self.ignored)
        infl = block_influence(self.model, list(blocks), samples)
        out = []
        for name in blocks:
            self._imp[BLOCK + name] = np.array([infl[name]], np.float64)
            out.append(Group(name=BLOCK + name, channels=1, members=(name,), kind="block"))
        self.log(f"depth pruning: {len(out)} removable residual block(s)"
                 + (f" ({', '.join(blocks)})" if blocks else ""))
        return out

    def _importance(self, found) -> None:
        tp = self.tp
        if self.importance_name == "magnitude":
            crit = tp.importance.GroupMagnitudeImportance(p=2)
        elif self.importance_name == "bn_scale":
            crit = tp.importance.BNScaleImportance()
        else:
            crit = tp.importance.GroupTaylorImportance()
            self._taylor_gradients()
        fallback = tp.importance.GroupMagnitudeImportance(p=2)
        for name, _root, _h, group in found:
            with torch.no_grad():
                imp = crit(group)
            if imp is None:   # BN scale: a group without BatchNorm
                self.log(f"channel group {name} has no BatchNorm: ranked by weight magnitude")
                with torch.no_grad():
                    imp = fallback(group)
            self._imp[name] = imp.detach().float().cpu().numpy()
        if self.importance_name == "taylor":
            self.model.zero_grad(set_to_none=True)

    def _taylor_gradients(self) -> None:
        if self.calib_data is None:
            raise DoptError("Taylor importance needs calibration data with labels",
                            field="calib_data", hint="pass batches of (inputs, labels), or "
                                                     "use importance='magnitude'")
        loss_fn = self.loss_fn or nn.functional.cross_entropy
        self.model.zero_grad(set_to_none=True)
        was = self.model.training
        self.model.eval()
        dev = _device(self.model)
        for i, batch in enumerate(self.calib_data):
            if i >= self.bn_batches:
                break
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise DoptError("Taylor importance needs (inputs, labels) batches",
                                field="calib_data", found=type(batch).__name__)
            x, y = first_tensor(batch).to(dev), torch.as_tensor(batch[1]).to(dev)
            loss_fn(self.model(x), y).backward()
        self.model.train(was)

    def importance(self, name: str):
        self.groups()
        return self._imp[name]

    # --- candidates ------------------------------------------------------------------------

    def _prune(self, model: nn.Module, widths) -> None:
        if not widths:
            return
        from .prune_depth import BLOCK, remove_blocks
        self.groups()
        blocks = {g.name for g in self._groups if g.kind == "block"}
        unknown = sorted(k for k in widths if k.startswith(BLOCK) and k not in blocks)
        if unknown:
            raise DoptError(f"no removable residual block named {', '.join(unknown)} in "
                            f"{self.cls_name}", field="widths",
                            expected=", ".join(sorted(blocks)) or "none (depth=True finds them)")
        gone = [k[len(BLOCK):] for k in sorted(blocks) if widths.get(k, 1) == 0]
        widths = {k: v for k, v in widths.items() if not k.startswith(BLOCK)}
        if widths:
            self._prune_channels(model, widths)
        remove_blocks(model, gone)     # after the channels: the graph above saw them whole

    def _prune_channels(self, model: nn.Module, widths) -> None:
        dg = self._graph(model)
        found, _names = self._root_groups(model, dg)
        todo = []
        for name, root, handler, _group in found:
            w = widths.get(name)
            have = _width(root)
            if w is None or w >= have:
                continue
            order = np.argsort(self._imp[name], kind="stable")
            todo.append((root, handler, sorted(int(i) for i in order[:have - w])))
        known = {n for n, *_ in found}
        missing = sorted(set(widths) - known)
        if missing:
            raise DoptError(f"no prunable channel group named {', '.join(missing)} in "
                            f"{self.cls_name}", field="widths",
                            expected=", ".join(sorted(known)))
        for root, handler, idxs in todo:   # groups are disjoint: indices stay valid
            dg.get_pruning_group(root, handler, idxs).prune()

    def pruned_copy(self, widths) -> nn.Module:
        """A pruned copy of the model; the last one is kept, since the search measures and
        exports each candidate (a fresh copy for ``evaluate``, which changes BatchNorm)."""
        key = tuple(sorted(widths.items()))
        if self._last is None or self._last[0] != key:
            model = copy.deepcopy(self.model)
            self._prune(model, widths)
            self._last = (key, model)
        return self._last[1]

    def measure(self, widths) -> dict:
        model = self.pruned_copy(widths)
        macs, params = self.tp.utils.count_ops_and_params(model, self.example(model))
        return {"macs": int(macs), "params": int(params)}

    def export_onnx(self, widths, path: Path) -> None:
        model = self.pruned_copy(widths).eval()
        write_onnx(model, self.example(model), Path(path))

    def evaluate(self, widths) -> float:
        if self.eval_fn is None:
            raise DoptError("the pruning sensitivity table needs an evaluation function",
                            field="eval_fn", hint="pass eval_fn=lambda model: accuracy(model)")
        model = copy.deepcopy(self.pruned_copy(widths))
        recalibrate_bn(model, self.calib_data, self.bn_batches)
        model.eval()
        with torch.no_grad():
            return float(self.eval_fn(model))

    def apply(self, widths) -> None:
        self._prune(self.model, widths)
        if recalibrate_bn(self.model, self.calib_data, self.bn_batches):
            self.log(f"BatchNorm statistics recalibrated on {self.bn_batches} batches")
        self.model.eval()
        self._groups, self._imp, self._last = None, {}, None

    def save(self, out_dir: Path, name: str = "pruned", builder: str | None = None) -> dict:
        from .prune_save import save_pruned
        removed = [n for n, m in self.model.named_modules()   # blocks depth pruning took
                   if type(m) is nn.Identity and self.original_types.get(n, nn.Identity)
                   is not nn.Identity]
        return save_pruned(self.model, Path(out_dir), name, input_shape=self.input_shape,
                           original=self.original, builder=builder, removed=removed)


def _width(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def module_signature(m: nn.Module) -> dict | None:
    """Constructor arguments of the layer types pruning resizes (``None`` for others)."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return {"in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": tuple(m.kernel_size), "stride": tuple(m.stride),
                "padding": m.padding if isinstance(m.padding, str) else tuple(m.padding),
                "dilation": tuple(m.dilation), "groups": m.groups, "bias": m.bias is not None,
                "padding_mode": m.padding_mode}
    if isinstance(m, nn.Linear):
        return {"in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None}
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
                "affine": m.affine, "track_running_stats": m.track_running_stats}
    if isinstance(m, nn.GroupNorm):
        return {"num_groups": m.num_groups, "num_channels": m.num_channels, "eps": m.eps,
                "affine": m.affine}
    if isinstance(m, nn.LayerNorm):
        return {"normalized_shape": tuple(m.normalized_shape), "eps": m.eps,
                "elementwise_affine": m.elementwise_affine}
    if isinstance(m, nn.PReLU):
        return {"num_parameters": m.num_parameters}
    return None


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Float ONNX of ``model`` (batch 1, input ``input``, output ``output``), written whole."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["output"],
                          do_constant_folding=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
