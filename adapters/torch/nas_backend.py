"""PyTorch side of NASEA (``dopt.nas.backend.NasBackend``): supernet training, sub-net
extraction with BatchNorm recalibration, the user's metric, size/MACs, ONNX export and the
``model_arch_result_N.py`` files.

Supernet training is one-shot with strict fairness: every step splits its batch over a
group of paths in which every block choice of every layer appears once (the first path at
the widest widths, the second at the narrowest), accumulates their gradients and takes
one optimizer step (``nas_supernet.Supernet.fair_paths``). Under ``torchrun`` every
process samples the same paths and the gradients are averaged over processes (gloo on
CPUs, NCCL on GPUs).
"""
from __future__ import annotations

import copy
import datetime
import inspect
import io
import math
import os
import random
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from dopt.errors import DoptError
from dopt.nas.report import layers_literal, result_file

from . import nas_blocks
from .nas_supernet import Supernet, build_static, extract

OPSET = 13
BN_CALIB_BATCHES = 10
CHECKPOINT_EVERY_S = 600


def _user_error(cls_meth: str, e: Exception, what: str) -> DoptError:
    return DoptError(f"{cls_meth} failed while {what}: {e.__class__.__name__}: {e}",
                     file="user_module.py", field=cls_meth,
                     hint="run your user_module.py on its own to debug it")


def _is_dataset(ds) -> bool:
    return hasattr(ds, "__getitem__") and hasattr(ds, "__len__")


class TorchNasBackend:
    """One per process; holds the user's module, the data and the supernet."""

    framework = "pytorch"
    checkpoint_name = "supernet.pt"

    def __init__(self, cfg, user_module, *, log=print):
        self.cfg, self.um_mod, self.log = cfg, user_module, log
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.device, self.device_note = self._pick_device()
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(
                "nccl" if self.device.type == "cuda" else "gloo",
                timeout=datetime.timedelta(hours=48))
        try:
            self.um = user_module.UserModule(cfg.epochs, cfg.batch_size)
        except Exception as e:
            raise _user_error("UserModule.__init__", e, "building the user module") from None
        self.pre = self._build_user("PreNet")
        self.post = self._build_user("PostNet")
        self.supernet: Supernet | None = None
        self._train_ds = self._val_ds = None

    # --- setup ----------------------------------------------------------------------------
    def _pick_device(self):
        ids = self.cfg.gpu_ids
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            gpu = ids[local % len(ids)] if ids else 0
            if gpu >= torch.cuda.device_count():
                raise DoptError(f"gpu_id {gpu} does not exist on this machine", file=self.cfg.path,
                                field="scenario.resource.gpu_id",
                                expected=f"ids below {torch.cuda.device_count()}")
            return torch.device(f"cuda:{gpu}"), f"running on GPU {gpu}"
        return torch.device("cpu"), (f"no GPU on this machine: running on the CPU "
                                     f"(gpu_id {','.join(map(str, ids))} ignored)")

    def _build_user(self, name):
        try:
            m = getattr(self.um_mod, name)()
        except Exception as e:
            raise _user_error(f"{name}.__init__", e, "building it") from None
        if not isinstance(m, nn.Module):
            raise DoptError(f"{name} is not a torch.nn.Module", file="user_module.py", field=name,
                            found=type(m).__name__, hint=f"derive {name} from torch.nn.Module")
        return m

    def in_channels(self) -> int:
        x = torch.zeros((1,) + tuple(self.cfg.input_chw))
        try:
            with torch.no_grad():
                y = self.pre.eval()(x)
        except Exception as e:
            raise _user_error("PreNet.forward", e, f"running on an input of shape "
                              f"{tuple(x.shape)} (input_shape of scen.yaml)") from None
        if not isinstance(y, torch.Tensor) or y.dim() != 4:
            raise DoptError("PreNet.forward must return a 4-D tensor (N, C, H, W)",
                            file="user_module.py", field="PreNet.forward",
                            found=repr(getattr(y, "shape", type(y).__name__)))
        return int(y.shape[1])

    def bind_space(self, space) -> None:
        """Build the supernet and check that PostNet takes the backbone's output."""
        self.space = space
        torch.manual_seed(self.cfg.seed)
        self.supernet = Supernet(space, self.pre, self.post, self.cfg.feature_choose)
        arch = space.uniform("conv3x3", narrow=False)
        x = torch.zeros((2,) + tuple(self.cfg.input_chw))
        try:
            with torch.no_grad():
                self.supernet.eval()(x, arch)
        except Exception as e:
            shape = "a list of tensors" if self.cfg.feature_choose else \
                f"a tensor of {space.filters[-1]} channels"
            raise _user_error("PostNet.forward", e, f"taking the backbone's output ({shape})") \
                from None
        self.supernet.to(self.device)

    def check_data(self) -> None:
        self._datasets()

    def _datasets(self):
        if self._train_ds is None:
            for flag, d in ((True, self.cfg.train_dir), (False, self.cfg.val_dir)):
                try:
                    ds = self.um.dataset_define(d, flag)
                except Exception as e:
                    raise _user_error("UserModule.dataset_define", e,
                                      f"reading {d!r} (is_training={flag})") from None
                if not _is_dataset(ds) or len(ds) == 0:
                    raise DoptError("UserModule.dataset_define must return a non-empty "
                                    "torch.utils.data.Dataset", file="user_module.py",
                                    field="UserModule.dataset_define",
                                    found=f"{type(ds).__name__} for is_training={flag}")
                if flag:
                    self._train_ds = ds
                else:
                    self._val_ds = ds
        return self._train_ds, self._val_ds

    def _loader(self, ds, *, shuffle, seed=0, sampler=None, drop_last=False):
        g = torch.Generator()
        g.manual_seed(seed)
        return torch.utils.data.DataLoader(ds, batch_size=self.cfg.batch_size,
                                           shuffle=shuffle and sampler is None, sampler=sampler,
                                           generator=g, drop_last=drop_last, num_workers=0)

    @staticmethod
    def _split(batch):
        if isinstance(batch, (list, tuple)) and len(batch) >= 2:
            return batch[0], batch[1]
        raise DoptError("a dataset item must be (inputs, labels)", file="user_module.py",
                        field="UserModule.dataset_define",
                        found=type(batch).__name__)

    # --- supernet training ----------------------------------------------------------------
    def _optimizer(self, params):
        o = self.cfg.optimizer
        lr = o["learning_rate"] * self.world  # as the reference: scaled with the processes
        if o["type"] == "Adam":
            return torch.optim.Adam(params, lr=lr, betas=tuple(o["betas"]))
        return torch.optim.SGD(params, lr=lr)

    def train_supernet(self, ckpt: Path, *, scalar=None, progress=True) -> None:
        """Train ``epochs`` epochs, resuming from ``ckpt``; rank 0 writes the checkpoint."""
        from tqdm import tqdm
        train_ds, _ = self._datasets()
        net = self.supernet
        opt = self._optimizer(net.parameters())
        sampler = None
        if self.world > 1:
            sampler = torch.utils.data.distributed.DistributedSampler(
                train_ds, num_replicas=self.world, rank=self.rank, shuffle=True,
                seed=self.cfg.seed, drop_last=True)
        steps = max(1, len(train_ds) // (self.cfg.batch_size * self.world))
        try:
            sched = self.um.scheduler_define(opt, steps)
        except Exception as e:
            raise _user_error("UserModule.scheduler_define", e, "building the scheduler") \
                from None
        start_epoch, start_step = 0, 0
        if not ckpt.is_file() and self.cfg.pre_train_dir:
            self._warm_start(Path(self.cfg.pre_train_dir))
        if ckpt.is_file():
            state = self._load_ckpt(ckpt)
            self._load_model(ckpt, state)
            opt.load_state_dict(state["optimizer"])
            if sched is not None and state.get("scheduler") is not None:
                sched.load_state_dict(state["scheduler"])
            start_epoch, start_step = int(state["epoch"]), int(state["step"])
            if start_epoch >= self.cfg.epochs:
                return
            self.log(f"resuming supernet training at epoch {start_epoch + 1}, step {start_step}")
        last_save, loss = time.monotonic(), float("nan")
        gstep = start_epoch * steps + start_step
        for epoch in range(start_epoch, self.cfg.epochs):
            rng = random.Random(self.cfg.seed * 100003 + epoch)
            if sampler is not None:
                sampler.set_epoch(epoch)
            loader = self._loader(train_ds, shuffle=True, seed=self.cfg.seed + epoch,
                                  sampler=sampler, drop_last=True)
            net.train()
            bar = tqdm(total=steps, initial=start_step if epoch == start_epoch else 0,
                       desc=f"supernet epoch {epoch + 1}/{self.cfg.epochs}",
                       disable=not progress or self.rank != 0, leave=False, dynamic_ncols=True)
            step = 0
            try:
                for batch in loader:
                    if step >= steps:
                        break
                    paths = net.fair_paths(rng)
                    if epoch == start_epoch and step < start_step:
                        step += 1  # already trained before the interruption
                        continue
                    loss = self._train_step(net, opt, batch, paths)
                    if sched is not None:
                        sched.step()
                    step += 1
                    gstep += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}")
                    if scalar is not None and self.rank == 0 and (gstep % 10 == 0 or step == steps):
                        scalar("loss", loss, gstep)
                        scalar("lr", opt.param_groups[0]["lr"], gstep)
                    if time.monotonic() - last_save > CHECKPOINT_EVERY_S:
                        self._save_ckpt(ckpt, net, opt, sched, epoch, step)
                        last_save = time.monotonic()
            except KeyboardInterrupt:
                self._save_ckpt(ckpt, net, opt, sched, epoch, step)
                raise
            finally:
                bar.close()
            self._save_ckpt(ckpt, net, opt, sched, epoch + 1, 0)
            if self.rank == 0:
                self.log(f"supernet epoch {epoch + 1}/{self.cfg.epochs}: last loss {loss:.4f}")
        self.barrier()

    def _warm_start(self, folder: Path) -> None:
        """``pre_train_dir`` holding a supernet checkpoint (``supernet.pt``, or an earlier
        search's output folder): every shared-layer tensor of the same name and shape
        starts from it. Any other folder is pre-training data the user's code reads."""
        for cand in (folder / "supernet.pt", folder / "nas_state" / "supernet.pt"):
            if cand.is_file():
                src = self._load_ckpt(cand).get("model", {})
                own = self.supernet.state_dict()
                same = {k: v for k, v in src.items() if k.startswith("layers.") and k in own
                        and own[k].shape == v.shape}
                self.supernet.load_state_dict(same, strict=False)
                if self.rank == 0:
                    self.log(f"warm start: {len(same)} supernet tensors from {cand}")
                return

    def _train_step(self, net, opt, batch, paths) -> float:
        """One optimizer step over ``paths``: the batch is split between them (the same
        compute as one path on the whole batch) and their gradients accumulated, so every
        block of every layer moves every step."""
        x, y = self._split(batch)
        x, y = x.to(self.device), y.to(self.device)
        n = len(x)
        parts = min(len(paths), n)
        bounds = [n * j // parts for j in range(parts + 1)]
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for j in range(parts):
            lo, hi = bounds[j], bounds[j + 1]
            logits = net(x[lo:hi], paths[j])
            try:
                loss = self.um.loss_func(y[lo:hi], logits)
            except Exception as e:
                raise _user_error("UserModule.loss_func", e, "computing the loss") from None
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise DoptError("UserModule.loss_func must return a scalar tensor",
                                file="user_module.py", field="UserModule.loss_func",
                                found=type(loss).__name__)
            (loss * ((hi - lo) / n)).backward()
            total += float(loss.detach()) * (hi - lo) / n
        if self.world > 1:
            for p in net.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.world
        opt.step()
        return total

    def _save_ckpt(self, ckpt: Path, net, opt, sched, epoch, step) -> None:
        if self.rank != 0:
            return
        state = {"epoch": epoch, "step": step, "model": net.state_dict(),
                 "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict() if sched is not None else None}
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, ckpt)

    def _load_ckpt(self, ckpt: Path) -> dict:
        try:
            return torch.load(ckpt, map_location=self.device, weights_only=True)
        except Exception as e:
            raise DoptError(f"cannot read the supernet checkpoint: {e.__class__.__name__}",
                            file=str(ckpt), hint="delete it to train the supernet again") \
                from None

    def supernet_done(self, ckpt: Path) -> bool:
        return ckpt.is_file() and int(self._load_ckpt(ckpt)["epoch"]) >= self.cfg.epochs

    def load_supernet(self, ckpt: Path) -> None:
        self._load_model(ckpt, self._load_ckpt(ckpt))

    def _load_model(self, ckpt: Path, state: dict) -> None:
        try:
            self.supernet.load_state_dict(state["model"])
        except (KeyError, RuntimeError):
            raise DoptError("the supernet checkpoint does not fit this search space (written "
                            "by another version of dopt or another skeleton)", file=str(ckpt),
                            hint="delete it (or pass another --output) to train the supernet "
                                 "again") from None

    # --- candidates -----------------------------------------------------------------------
    def _static(self, arch):
        return build_static(self.space, arch, copy.deepcopy(self.pre).cpu(),
                            copy.deepcopy(self.post).cpu(), self.cfg.feature_choose)

    def measure(self, arch) -> dict:
        """Parameters of the whole network and multiply-accumulates of one inference."""
        net = self._static(arch).eval()
        macs = 0

        def hook(m, inp, out):
            nonlocal macs
            if isinstance(m, nn.Conv2d):
                macs += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] \
                    * m.kernel_size[1]
            elif isinstance(m, nn.Linear):
                macs += out.numel() * m.in_features
        hs = [m.register_forward_hook(hook) for m in net.modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            net(torch.zeros((1,) + tuple(self.cfg.input_chw)))
        for h in hs:
            h.remove()
        return {"params": int(sum(p.numel() for p in net.parameters())), "macs": int(macs)}

    def export_onnx(self, arch, path: Path, net=None) -> None:
        net = (net or self._static(arch)).cpu().eval()
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (torch.zeros((1,) + tuple(self.cfg.input_chw)),), buf,
                              dynamo=False, opset_version=OPSET, input_names=["input"],
                              output_names=["output"], do_constant_folding=True)
        Path(path).write_bytes(buf.getvalue())

    def _subnet(self, arch):
        """The sub-net with inherited weights and BatchNorm statistics recalibrated on
        ``BN_CALIB_BATCHES`` training batches (the supernet's running statistics mix paths)."""
        net = extract(self.supernet, arch).to(self.device)
        train_ds, _ = self._datasets()
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
        net.train()
        loader = self._loader(train_ds, shuffle=True, seed=self.cfg.seed + 7919)
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if i >= BN_CALIB_BATCHES:
                    break
                net(self._split(batch)[0].to(self.device))
        return net.eval()

    def evaluate(self, arch) -> float:
        """The user's metric of the sub-net on the validation set."""
        net = self._subnet(arch)
        _, val_ds = self._datasets()
        loader = self._loader(val_ds, shuffle=False)

        def eval_function(x):
            with torch.no_grad():
                return net(x.to(self.device))
        try:
            value = self.um.metrics_func(loader, eval_function)
        except Exception as e:
            raise _user_error("UserModule.metrics_func", e, "evaluating a candidate") from None
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise DoptError("UserModule.metrics_func must return one finite number (higher is "
                            "better)", file="user_module.py", field="UserModule.metrics_func",
                            found=repr(value)[:80])
        return float(value)

    def write_result(self, arch, py_path: Path, header: dict) -> list[Path]:
        """``model_arch_result_N.py`` (runnable alone) and its inherited weights."""
        net = self._subnet(arch).cpu()
        weights = py_path.with_name(py_path.stem + ".supernet.pth")
        torch.save(net.state_dict(), weights)
        specs = [list(s) for s in self.supernet.specs(arch)]
        py_path.write_text(render_result(header, specs, self.cfg.feature_choose,
                                         (1,) + tuple(self.cfg.input_chw)), encoding="utf-8")
        return [py_path, weights]

    # --- distribution ---------------------------------------------------------------------
    def barrier(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


_MAIN = '''

LAYERS = {layers}
FEATURE_CHOOSE = {fc}
INPUT_SHAPE = {shape}


def build():
    """PreNet and PostNet come from the user_module.py of the search."""
    um = _user_module()
    return SearchedNet(um.PreNet(), SearchedBackbone(LAYERS, FEATURE_CHOOSE), um.PostNet())


def main():
    net = build()
    stem = os.path.splitext(os.path.basename(__file__))[0]
    inherited = os.path.join(os.path.dirname(os.path.abspath(__file__)), stem + ".supernet.pth")
    if os.path.isfile(inherited):  # the weights the search evaluated (train further from them)
        net.load_state_dict(torch.load(inherited, map_location="cpu", weights_only=True))
    net.eval()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(net, (torch.zeros(INPUT_SHAPE),), stem + ".onnx", dynamo=False,
                          opset_version=13, input_names=["input"], output_names=["output"],
                          dynamic_axes={{"input": {{0: "batch"}}, "output": {{0: "batch"}}}})
    torch.save(net.state_dict(), stem + ".pth")
    print(f"wrote {{stem}}.onnx and {{stem}}.pth ({{model_param_size}} parameters, "
          f"search accuracy {{accuracy}})")


if __name__ == "__main__":
    main()
'''


def render_result(header: dict, specs: list, feature_choose, input_shape) -> str:
    return result_file(header, inspect.getsource(nas_blocks),
                       ["model_arch_result_N.onnx", "model_arch_result_N.pth"],
                       _MAIN.format(layers=layers_literal(specs),
                                    fc=repr(list(feature_choose) if feature_choose else None),
                                    shape=repr(tuple(input_shape))))
