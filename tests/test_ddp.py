"""Range statistics under DistributedDataParallel: 2 CPU processes over gloo."""
import json
import os
import socket

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    scale = 1.0 + 2.0 * rank  # ranks see different ranges on purpose
    return [torch.randn(4, 3, 16, 16, generator=g) * scale for _ in range(3)]


def _ranges(model):
    from dopt_adapters.torch.modules import quant_layers
    return {n: [q.act.lo.item(), q.act.hi.item()] for n, q in quant_layers(model)}


def _worker(rank, world, port, cfg, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from dopt.dopt_torch.opt_main import optimize_model, set_calibrate_state
        from tests.tiny_net import build
        q = optimize_model(build(), cfg)
        ddp = torch.nn.parallel.DistributedDataParallel(q)
        set_calibrate_state(ddp, True)
        with torch.no_grad():
            for x in _data(rank):
                ddp(x)
        set_calibrate_state(ddp, False)
        calib = _ranges(q)
        # one QAT step under DDP: learnable ranges get averaged gradients, stay identical
        ddp.train()
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        loss = ddp(_data(rank)[0]).pow(2).sum() * 100  # big enough to move every range
        opt.zero_grad()
        loss.backward()
        opt.step()
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"calib": calib, "qat": _ranges(q)}, f)
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_ddp_ranges_synchronized_and_equal_to_single_process(tmp_path):
    from dopt.dopt_torch.opt_main import optimize_model, set_calibrate_state
    from tests.test_torch_adapter import write_cfg
    from tests.tiny_net import build
    cfg = str(write_cfg(tmp_path, build()))
    out = str(tmp_path / "ranges")
    mp.spawn(_worker, args=(2, _free_port(), cfg, out), nprocs=2, join=True)
    r0 = json.load(open(f"{out}.0"))
    r1 = json.load(open(f"{out}.1"))
    assert r0 == r1  # identical on both ranks, after calibration and after a QAT step
    single = optimize_model(build(), cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same float accumulation order as the workers
    try:
        set_calibrate_state(single, True)
        with torch.no_grad():
            for rank in range(2):
                for x in _data(rank):
                    single(x)
        set_calibrate_state(single, False)
    finally:
        torch.set_num_threads(threads)
    assert r0["calib"] == _ranges(single)  # min/max over the union of both ranks' data
    assert r0["calib"] != r0["qat"]
