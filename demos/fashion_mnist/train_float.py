"""Train the float demo networks once; their weights ship in ``weights/``.

    python -m demos.fashion_mnist.train_float --data ../shared/data/fashion-mnist \
        --model resnet8 --epochs 4

Uses the full 60k training set; prints test accuracy; writes ``weights/<model>.pth``
atomically (state dict only, loadable with ``weights_only=True``).
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data, models

WEIGHTS = Path(__file__).resolve().parent / "weights"


def evaluate(model, x, y, batch=500) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy()
                        == y[i:i + batch]).sum()
    return 100.0 * correct / len(x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=None, help="folder with the four Fashion-MNIST .gz files")
    ap.add_argument("--model", choices=sorted(models.MODELS), required=True)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    xtr, ytr = data.load("train", a.data)
    xte, yte = data.load("test", a.data)
    model = models.build(a.model)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-4)
    steps = a.epochs * math.ceil(len(xtr) / a.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, a.lr, total_steps=steps)
    t0 = time.time()
    for ep in range(a.epochs):
        model.train()
        perm = rng.permutation(len(xtr))
        for i in range(0, len(xtr), a.batch):
            idx = perm[i:i + a.batch]
            xb = torch.from_numpy(xtr[idx])
            if rng.random() < 0.5:  # horizontal flip: clothes are left-right symmetric
                xb = xb.flip(3)
            loss = F.cross_entropy(model(xb), torch.from_numpy(ytr[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {ep + 1}/{a.epochs}: loss {loss.item():.3f} test acc "
              f"{evaluate(model, xte, yte):.2f}% ({time.time() - t0:.0f}s)", flush=True)
    WEIGHTS.mkdir(exist_ok=True)
    dst = WEIGHTS / f"{a.model}.pth"
    tmp = dst.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, dst)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
