"""``dopt prune`` for PyTorch: the user's model, weights and ``user_module.py`` data, the
pruning backend, and fine-tuning with distillation from the unpruned model that shows
progress and resumes after an interruption (a checkpoint every ``CKPT_EVERY`` steps and at
every epoch's end)."""
from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import torch
from torch import nn

from dopt.errors import DoptError

from .distill import DistillationLoss
from .prune_backend import TorchPruneBackend, first_tensor

CKPT_EVERY = 200
CALIB_BATCHES = 20


def _user_call(what: str, fn, *args):
    try:
        return fn(*args)
    except DoptError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code: name the method
        raise DoptError(f"{what} failed: {e.__class__.__name__}: {e}", file="user_module.py",
                        field=what, hint="run that method alone to see the error in your "
                                         "code") from None


class TorchPruneJob:
    """Everything ``dopt prune`` needs from PyTorch, built from the command's files."""

    def __init__(self, *, model_spec: str, weights: str | None, user_module, dataset_dir: str,
                 input_shape, batch_size: int, epochs: int, importance: str, ignored,
                 eval_batches: int | None, seed: int = 0, depth: bool = False, log=None):
        from dopt.userpy import build
        self.log = log or (lambda _m: None)
        self.seed = seed
        model = build(model_spec)
        if not isinstance(model, nn.Module):
            raise DoptError("the model definition did not build a torch.nn.Module",
                            file=model_spec.rsplit(":", 1)[0], field="--model",
                            found=type(model).__name__)
        if weights:
            self._load_weights(model, weights)
        model.eval()
        self.teacher = copy.deepcopy(model).eval()
        self.um = _user_call("UserModule.__init__", user_module.UserModule, max(epochs, 1),
                             batch_size)
        self.batch_size = batch_size
        self.train_ds = _user_call("UserModule.dataset_define", self.um.dataset_define,
                                   dataset_dir, True)
        self.eval_ds = _user_call("UserModule.dataset_define", self.um.dataset_define,
                                  dataset_dir, False)
        self.eval_batches = eval_batches
        calib = []
        for i, batch in enumerate(self._loader(self.train_ds, shuffle=True, epoch=-1)):
            if i >= CALIB_BATCHES:
                break
            calib.append(batch)
        if not calib:
            raise DoptError("the training dataset is empty", file="user_module.py",
                            field="UserModule.dataset_define")
        self.backend = TorchPruneBackend(
            model, input_shape=input_shape, importance=importance, calib_data=calib,
            eval_fn=self._metric_of, ignored_layers=ignored, depth=depth,
            loss_fn=lambda logits, y: self.um.loss_func(y, logits), log=self.log)

    @staticmethod
    def _load_weights(model: nn.Module, path: str) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise DoptError("the weights file does not exist", file=path,
                            field="--weights") from None
        except Exception as e:  # noqa: BLE001 - untrusted file: never unpickled
            raise DoptError(f"the weights file is not a state dict torch can load safely "
                            f"({e.__class__.__name__})", file=path, field="--weights",
                            hint="save it with torch.save(model.state_dict(), path)") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except Exception as e:  # noqa: BLE001
            first = str(e).strip().splitlines()
            raise DoptError(f"the weights do not fit the model: {' '.join(first[:3])[:400]}",
                            file=path, field="--weights",
                            hint="pass the state dict saved from this model definition") \
                from None

    def _loader(self, ds, *, shuffle: bool, epoch: int):
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch + 1)
        return torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle,
                                           generator=g if shuffle else None)

    def _metric_of(self, model: nn.Module) -> float:
        model.eval()
        limit = self.eval_batches
        loader = self._loader(self.eval_ds, shuffle=False, epoch=0)
        if limit:
            loader = [b for i, b in zip(range(limit), loader)]
        dev = next(model.parameters()).device
        with torch.no_grad():
            return float(_user_call("UserModule.metrics_func", self.um.metrics_func, loader,
                                    lambda x: model(x.to(dev))))

    def metric(self, model=None) -> float:
        return self._metric_of(model if model is not None else self.backend.model)

    def restore(self, py_path: Path) -> None:
        """Continue from the pruned model saved by an earlier run of the command."""
        spec = importlib.util.spec_from_file_location("_dopt_pruned_resume", py_path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        self.backend.model = mod.load()

    def save(self, out_dir: Path, name: str, builder: str) -> dict:
        return self.backend.save(out_dir, name, builder=builder)

    def finetune(self, *, epochs: int, lr: float, distill: dict | None, state: Path,
                 progress: bool = True) -> dict:
        """Train the pruned model ``epochs`` passes over the training set with the user's
        loss (+ distillation from the unpruned model), resuming from ``state``."""
        from tqdm import tqdm
        model = self.backend.model
        kd = DistillationLoss(self.teacher, model, ce_weight=0.0, **distill) if distill \
            else None
        params = list(model.parameters()) + (list(kd.parameters()) if kd else [])
        opt = torch.optim.Adam(params, lr=lr)
        steps_per_epoch = max(1, math.ceil(len(self.train_ds) / self.batch_size))
        total = epochs * steps_per_epoch
        if hasattr(self.um, "scheduler_define"):
            sched = _user_call("UserModule.scheduler_define", self.um.scheduler_define, opt,
                               steps_per_epoch)
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(total, 1))
        done = 0
        if state.is_file():
            ck = torch.load(state, map_location="cpu", weights_only=True)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            if sched is not None and ck.get("scheduler"):
                sched.load_state_dict(ck["scheduler"])
            if kd is not None and ck.get("adapters"):
                kd.load_state_dict(ck["adapters"])
            done = int(ck["step"])
            self.log(f"resuming fine-tuning at step {done}/{total}")

        def save():
            tmp = state.with_name(state.name + ".tmp")
            torch.save({"step": done, "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict() if sched is not None else None,
                        "adapters": kd.state_dict() if kd is not None else None}, tmp)
            tmp.replace(state)

        dev = next(model.parameters()).device
        bar = tqdm(total=total, initial=done, desc="fine-tune", disable=not progress or None,
                   leave=False)
        last = {}
        try:
            while done < total:
                epoch, skip = divmod(done, steps_per_epoch)
                model.train()
                for i, batch in enumerate(self._loader(self.train_ds, shuffle=True, epoch=epoch)):
                    if i < skip:
                        continue
                    x = first_tensor(batch).to(dev)
                    y = batch[1].to(dev) if isinstance(batch, (tuple, list)) else None
                    logits = model(x)
                    loss = _user_call("UserModule.loss_func", self.um.loss_func, y, logits)
                    if kd is not None:
                        loss = loss + kd(logits, x, progress=done / max(total, 1))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if sched is not None:
                        sched.step()
                    done += 1
                    last = {"loss": float(loss.detach()), **(kd.last if kd else {})}
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.3f}")
                    if done % CKPT_EVERY == 0:
                        save()
                    if done >= total or done % steps_per_epoch == 0:
                        break
                save()
        except KeyboardInterrupt:
            save()
            raise
        finally:
            bar.close()
            if kd is not None:
                kd.remove()
        model.eval()
        return {"steps": total, "last": last}
