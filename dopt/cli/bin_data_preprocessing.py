"""Write a BINARY calibration set (.bin, magic 610 or 510) from images or a .npy array.

The reference tool ships ``bin_data_preprocessing.py`` for this; this is dopt's::

    python -m dopt.bin_data_preprocessing --images DIR --output calib.bin --shape 1,3,224,224 \\
        [--magic 610|510] [--mean 104,113,123] [--std 58] [--rgb] [--input_format NCHW|NHWC]
    python -m dopt.bin_data_preprocessing --npy data.npy --output calib.bin [--magic 610|510] \\
        [--shape 1,3,224,224]

Images are read exactly as an IMAGE calibration set is (see docs/calibration_sets.md), so
a .bin made here and the folder it came from calibrate identically. A .npy array is
written as it is: its first axis is the sample axis, the rest must match ``--shape``'s
trailing dims when ``--shape`` is given; a 510 file needs a 4-D (N, C, H, W) array.
Both inputs are streamed batch by batch. Exit code 0 on success, 2 on a user error (one
paragraph on stderr).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from ..calib.sets import MAGIC_NCHW, MAGIC_ND, BinWriter, images_to_bin
from ..errors import DoptError, run_cli

_CHUNK_SAMPLES = 256


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace(" ", "").strip(",").split(","))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise DoptError("malformed --shape", field="--shape",
                        expected="positive integers separated by ',', e.g. 1,3,224,224",
                        found=repr(text))
    return dims


def _parse_floats(parts: list[str] | None, flag: str) -> tuple[float, ...]:
    out: list[float] = []
    for p in parts or []:
        for t in p.split(","):
            if t.strip():
                try:
                    out.append(float(t))
                except ValueError:
                    raise DoptError(f"malformed {flag}", field=flag,
                                    expected="numbers separated by ',' or spaces, e.g. 104,113,123",
                                    found=repr(t)) from None
    return tuple(out)


def npy_to_bin(npy_path, path, *, magic: int = MAGIC_ND,
               shape: tuple[int, ...] | None = None) -> tuple[int, tuple[int, ...]]:
    """Stream a .npy array into a .bin file; returns ``(N, sample_shape)``."""
    try:
        arr = np.load(npy_path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DoptError("the .npy file does not exist", file=str(npy_path), field="--npy") from None
    except (OSError, ValueError, EOFError) as e:
        raise DoptError(f"cannot read the input as a NumPy .npy file ({e})", file=str(npy_path),
                        field="--npy", hint="save it with numpy.save(path, array)") from None
    if not isinstance(arr, np.ndarray):
        raise DoptError("the file holds several arrays (.npz), not one", file=str(npy_path),
                        field="--npy", hint="save a single array with numpy.save")
    if arr.ndim < 1 or not np.issubdtype(arr.dtype, np.number):
        raise DoptError("the .npy array cannot be a calibration set", file=str(npy_path),
                        field="--npy", expected="a numeric array (N, ...) with a sample axis",
                        found=f"dtype {arr.dtype}, shape {arr.shape}")
    if magic == MAGIC_NCHW and arr.ndim != 4:
        raise DoptError("a 510 file holds 4-D NCHW data", file=str(npy_path), field="--magic",
                        expected="an (N, C, H, W) array", found=f"shape {arr.shape}",
                        hint="use --magic 610 for other ranks")
    if shape is not None and tuple(arr.shape[1:]) != tuple(shape[1:]):
        raise DoptError("the .npy array's sample shape does not match --shape", file=str(npy_path),
                        field="--shape",
                        expected=f"(N, {', '.join(map(str, shape[1:]))})",
                        found=f"shape {arr.shape}",
                        hint="fix --shape or the array (the first axis is the sample axis)")
    with BinWriter(path, magic=magic, sample_shape=arr.shape[1:]) as w:
        for s in range(0, arr.shape[0], _CHUNK_SAMPLES):
            w.append(np.asarray(arr[s:s + _CHUNK_SAMPLES]))
        return w.num_samples, tuple(arr.shape[1:])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m dopt.bin_data_preprocessing",
        description="Write a BINARY calibration set (.bin, magic 610 or 510) from a folder of "
                    "images or a .npy array.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="folder of images (read like input_type: IMAGE)")
    src.add_argument("--npy", metavar="FILE", help=".npy array (N, ...) written as it is")
    ap.add_argument("--output", required=True, metavar="FILE", help="the .bin file to write")
    ap.add_argument("--shape", help="model input shape, e.g. 1,3,224,224 (required with --images; "
                                    "the leading n is ignored)")
    ap.add_argument("--magic", type=int, choices=(MAGIC_ND, MAGIC_NCHW), default=MAGIC_ND,
                    help="610: any rank (default); 510: 4-D NCHW")
    ap.add_argument("--mean", nargs="+", metavar="M",
                    help="per-channel mean, e.g. 104,113,123 (images only; default zeros)")
    ap.add_argument("--std", type=float, default=0.0,
                    help="standard deviation (images only; 0 = no division, the default)")
    ap.add_argument("--rgb", action="store_true", help="channel order RGB (default BGR; images only)")
    ap.add_argument("--input_format", type=str.upper, choices=("NCHW", "NHWC"), default="NCHW",
                    help="layout of --shape and of a 610 file from images (default NCHW)")
    return ap


def _convert(a) -> tuple[int, tuple]:
    shape = _parse_shape(a.shape) if a.shape else None
    if a.images is not None:
        if shape is None:
            raise DoptError("--images needs --shape (the model input shape)", field="--shape",
                            hint="add e.g. --shape 1,3,224,224")
        n = images_to_bin(a.images, a.output, shape=shape, image_format="RGB" if a.rgb else "BGR",
                          mean=_parse_floats(a.mean, "--mean"), std=a.std, magic=a.magic,
                          input_format=a.input_format)
        sample = shape[1:]
        if a.magic == MAGIC_NCHW and a.input_format == "NHWC":
            sample = (shape[3], shape[1], shape[2])
    else:
        if a.mean or a.std or a.rgb:
            raise DoptError("--mean, --std and --rgb apply to --images only", field="--npy",
                            hint="normalize the array before saving it, or drop those options")
        n, sample = npy_to_bin(a.npy, a.output, magic=a.magic, shape=shape)
    return n, tuple(sample)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)

    def body():
        n, sample = _convert(a)
        print(f"wrote {n} sample(s) of shape ({', '.join(map(str, sample))}) to {a.output} "
              f"(magic {a.magic}, {os.path.getsize(a.output)} bytes)")
        return 0
    return run_cli("bin_data_preprocessing", body)


if __name__ == "__main__":
    sys.exit(main())
