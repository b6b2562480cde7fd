"""Fashion-MNIST from IDX files (the format the dataset ships in), no torchvision needed.

Search order for the files: an explicit folder, ``$DOPT_FASHION_MNIST``, the copy
shipped with this demo (test set + a training subset), the Debian package
``dataset-fashion-mnist``.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHIPPED = HERE / "data"
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
MAX_ITEMS = 1 << 20


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: too short for an IDX header")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or not 1 <= ndim <= 3:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    if dims[0] > MAX_ITEMS or int(np.prod(dims)) != len(data) - 4 - 4 * ndim:
        raise ValueError(f"{path}: IDX header dims {dims} do not match the file size")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_idx(path: Path, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as f:
        f.write(header + arr.tobytes())


def find_dir(split: str, folder=None) -> Path:
    cands = [Path(p) for p in (folder, os.environ.get("DOPT_FASHION_MNIST")) if p]
    cands += [SHIPPED, DEBIAN]
    for c in cands:
        if all((c / f).is_file() for f in FILES[split]):
            return c
    raise FileNotFoundError(f"Fashion-MNIST {split} files {FILES[split]} not found in "
                            f"{[str(c) for c in cands]}; set DOPT_FASHION_MNIST to the folder")


def load(split: str, folder=None, limit: int | None = None):
    """(images float32 N x 1 x 28 x 28, normalised; labels int64)."""
    d = find_dir(split, folder)
    x = read_idx(d / FILES[split][0])
    y = read_idx(d / FILES[split][1]).astype(np.int64)
    if limit:
        x, y = x[:limit], y[:limit]
    x = ((x.astype(np.float32) / 255.0 - MEAN) / STD)[:, None]
    return x, y
