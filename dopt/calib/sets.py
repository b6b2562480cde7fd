"""Calibration sets of no-training quantization: readers (streaming) and writers.

A ``preprocess_parameter`` of ``config.prototxt`` (:mod:`dopt.calib.prototxt`) names one model
input's calibration data, either BINARY (a ``.bin`` file) or IMAGE (a folder of images).
The model input's shape is the one given by ``--input_shape``, ``(n, *rest)`` in the
model's layout (``--input_format``); ``n`` is the model batch. A calibration set holds
``N`` samples, each of shape ``rest``; the caller batches them as it likes.

BINARY, little-endian, float32 data after the header:

* magic 610 (any rank): ``int32 610, int32 rank (1..8), rank x int32 dims, data``. The
  dims are ``(N, *rest)``; the trailing dims must equal the model input's trailing dims
  exactly. 610 data is never reordered (reference rule).
* magic 510 (4-D): ``int32 510, int32 N, C, H, W, data`` in NCHW. With
  ``--input_format NHWC`` each sample is transposed to ``(H, W, C)`` (reference rule:
  IMAGE and 510 inputs are reordered for NHWC, 610 inputs are not).

IMAGE: the files of the folder (not recursive) whose extension is one of the
reference's 23 (:data:`IMAGE_EXTENSIONS`, case as listed), sorted by name; each is
decoded with Pillow, EXIF orientation applied, converted to 3-channel and ordered BGR
(default) or RGB; as dopt's addition a model input with C == 1 reads grayscale
(Pillow mode ``L``); resized when needed to the input's H, W with
``Image.resize((W, H), Image.Resampling.BILINEAR)``; then ``(x - mean[c]) / std`` in
float32, where an absent ``mean_value`` means zeros and ``standard_deviation`` 0.0
(the reference's default) means no division.

Readers stream: a ``.bin`` is read one batch at a time with seek + ``readinto``, images
are decoded one batch at a time, so memory does not grow with the number of samples.
"""
from __future__ import annotations

import contextlib
import math
import os
import struct
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..errors import DoptError
from ..formats.fileio import atomic_path
from .prototxt import Preprocess, SoConfig

__all__ = ["IMAGE_EXTENSIONS", "MAGIC_ND", "MAGIC_NCHW", "MAX_RANK", "MAX_IMAGE_PIXELS",
           "CalibrationReader", "open_calibration", "open_all", "iter_feeds",
           "read_bin_header", "BinWriter", "write_bin610", "write_bin510", "images_to_bin"]

IMAGE_EXTENSIONS = (".bmp", ".dib", ".jpeg", ".jpg", ".jpe", ".png", ".webp", ".pbm", ".pgm",
                    ".ppm", ".tiff", ".tif", ".BMP", ".DIB", ".JPEG", ".JPG", ".JPE", ".PNG",
                    ".WEBP", ".PBM", ".PGM", ".PPM", ".TIFF", ".TIF")
MAGIC_ND = 610
MAGIC_NCHW = 510
MAX_RANK = 8
MAX_DIM = (1 << 31) - 1
MAX_IMAGE_PIXELS = 89_478_485          # Pillow's own default limit, checked by us per file
_WRITE_CHUNK_BYTES = 16 << 20
_FORMATS = ("NCHW", "NHWC")


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _fmt_dims(shape) -> str:
    return ",".join(str(d) for d in shape)


# ------------------------------------------------------------------ header

def read_bin_header(f, size: int, file: str) -> tuple[int, int, tuple[int, ...]]:
    """Read and check a BINARY header: ``(magic, header_bytes, dims)``; ``f`` at offset 0."""
    head = f.read(4)
    if len(head) < 4:
        raise DoptError("the calibration .bin file is too short to hold a header", file=file,
                        field="offset 0 (magic)", expected="at least 4 bytes for the int32 magic",
                        found=f"{size} bytes",
                        hint="regenerate it with python -m dopt.bin_data_preprocessing")
    magic = int.from_bytes(head, "little", signed=True)
    if magic == MAGIC_ND:
        raw = f.read(4)
        if len(raw) < 4:
            raise DoptError("the 610 header is truncated", file=file, field="offset 4 (rank)",
                            expected="an int32 rank at offset 4", found=f"a {size}-byte file",
                            hint="the file is cut short; regenerate it")
        rank = int.from_bytes(raw, "little", signed=True)
        if not 1 <= rank <= MAX_RANK:
            raise DoptError("the 610 header has an invalid rank", file=file,
                            field="offset 4 (rank)", expected=f"1 to {MAX_RANK}", found=str(rank),
                            hint="the header is corrupt or not little-endian int32; regenerate "
                                 "it with python -m dopt.bin_data_preprocessing")
        hdr = 8 + 4 * rank
        raw = f.read(4 * rank)
        if len(raw) < 4 * rank:
            raise DoptError("the 610 header is truncated", file=file,
                            field=f"offsets 8-{hdr - 1} (dims)",
                            expected=f"a {hdr}-byte header ({rank} int32 dims after magic and "
                                     f"rank)", found=f"a {size}-byte file",
                            hint="the file is cut short; regenerate it")
        dims = struct.unpack(f"<{rank}i", raw)
        names = [f"dim {i}" for i in range(rank)]
    elif magic == MAGIC_NCHW:
        hdr = 20
        raw = f.read(16)
        if len(raw) < 16:
            raise DoptError("the 510 header is truncated", file=file, field="offsets 4-19 (N, C, H, W)",
                            expected="a 20-byte header (magic, N, C, H, W as int32)",
                            found=f"a {size}-byte file", hint="the file is cut short; regenerate it")
        dims = struct.unpack("<4i", raw)
        names = ["N", "C", "H", "W"]
    else:
        swapped = int.from_bytes(head, "big", signed=True)
        if swapped in (MAGIC_ND, MAGIC_NCHW):
            hint = "the header was written big-endian; write every int32 and float32 little-endian"
        elif head == b"\x93NUM":
            hint = ("this is a NumPy .npy file; convert it with python -m "
                    "dopt.bin_data_preprocessing --npy FILE --output FILE.bin")
        else:
            hint = ("write the file with python -m dopt.bin_data_preprocessing, or use "
                    "input_type: IMAGE for a folder of images")
        raise DoptError("the calibration .bin file has an unknown magic number", file=file,
                        field="offset 0 (magic)",
                        expected=f"{MAGIC_ND} (any rank) or {MAGIC_NCHW} (NCHW) as little-endian "
                                 f"int32", found=f"{magic} (bytes {head.hex(' ')})", hint=hint)
    for i, (d, name) in enumerate(zip(dims, names)):
        if d < 1:
            off = (8 if magic == MAGIC_ND else 4) + 4 * i
            raise DoptError(f"the {magic} header has a non-positive dimension", file=file,
                            field=f"offset {off} ({name})", expected="an int32 >= 1",
                            found=str(d), hint="the header is corrupt; regenerate the file")
    want = hdr + 4 * math.prod(dims)
    if size != want:
        data = size - hdr
        what = ("the file is truncated" if size < want else
                "the file is longer than its header says")
        raise DoptError(f"{what}: its data size does not match the {magic} header's dims "
                        f"{_fmt_shape(dims)}", file=file, field=f"offset {hdr} (float32 data)",
                        expected=f"{want - hdr} bytes of float32 data ({math.prod(dims)} values)"
                                 f" after the {hdr}-byte header, {want} bytes in all",
                        found=f"{data} bytes of data, {size} bytes in all",
                        hint="regenerate the file; the data must be float32 (4 bytes each)"
                             " and the header dims must describe all of it")
    return magic, hdr, tuple(dims)


# ------------------------------------------------------------------ readers

class CalibrationReader:
    """The calibration samples of one model input.

    ``kind`` is 'bin610', 'bin510' or 'image'; ``source`` the path; ``num_samples`` the
    number of samples N; ``sample_shape`` the shape of one sample, ``input_shape[1:]``.
    """
    kind: str
    source: str
    input_name: str
    num_samples: int
    sample_shape: tuple[int, ...]

    def _ctx(self, config_file, index) -> str:
        s = f"the calibration set of input '{self.input_name}'"
        if config_file:
            s += f" (preprocess_parameter #{index + 1} of {config_file})"
        return s

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        """Float32 arrays ``(b, *sample_shape)`` of ``batch_size`` samples (the last may be
        smaller), at most ``limit`` samples in all (``None`` or 0: all)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise DoptError("the calibration batch size must be a positive integer",
                            field="batch_size", found=repr(batch_size))
        if limit is not None and (isinstance(limit, bool) or limit < 0):
            raise DoptError("the calibration sample limit must be >= 0 (0 = all)",
                            field="calibration_samples", found=repr(limit))
        total = self.num_samples if not limit else min(int(limit), self.num_samples)
        return self._iter(int(batch_size), total)

    def _iter(self, batch_size: int, total: int) -> Iterator[np.ndarray]:
        for start in range(0, total, batch_size):
            yield self._read(start, min(batch_size, total - start))

    def _read(self, start: int, count: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.kind} input={self.input_name!r} "
                f"N={self.num_samples} sample_shape={self.sample_shape} source={self.source!r}>")


class _BinReader(CalibrationReader):
    def __init__(self, pp: Preprocess, input_name: str, input_shape: tuple[int, ...],
                 input_format: str, config_file: str | None):
        self.input_name, self.source = input_name, str(pp.path)
        ctx = self._ctx(config_file, pp.index)
        if not Path(self.source).is_file():
            raise DoptError(f"{ctx}: input_type is BINARY but the path is not a file",
                            file=self.source, field="input_file_path",
                            expected="a .bin file with magic 610 or 510",
                            hint="point input_file_path to the .bin file")
        self._f = open(self.source, "rb")
        try:
            size = os.fstat(self._f.fileno()).st_size
            magic, self._hdr, dims = read_bin_header(self._f, size, self.source)
            self._setup(magic, dims, input_shape, input_format, ctx)
        except BaseException:
            self._f.close()
            raise

    def _setup(self, magic, dims, input_shape, input_format, ctx):
        model_rest = tuple(input_shape[1:])
        given = f"--input_shape '{self.input_name}:{_fmt_dims(input_shape)}'"
        self.num_samples = dims[0]
        self._file_sample = tuple(dims[1:])
        self._transpose = False
        if magic == MAGIC_ND:
            self.kind = "bin610"
            if self._file_sample != model_rest:
                hint = ("write one sample per leading index, each shaped like the input's "
                        f"trailing dims, or fix {given}")
                if len(model_rest) == 3 and input_format == "NHWC" and \
                        self._file_sample == (model_rest[2], model_rest[0], model_rest[1]):
                    hint = ("the data looks NCHW but the input is NHWC; 610 files are never "
                            "reordered (reference rule): write it as (N, H, W, C), or write a 510 "
                            "file, which is reordered to NHWC")
                elif len(model_rest) == 3 and input_format == "NCHW" and \
                        self._file_sample == (model_rest[1], model_rest[2], model_rest[0]):
                    hint = ("the data looks NHWC but the input is NCHW; 610 files are never "
                            "reordered (reference rule): write it as (N, C, H, W)")
                raise DoptError(f"{ctx}: the 610 file's dims do not match the model input",
                                file=self.source, field="offset 8 (dims)",
                                expected=f"(N, {', '.join(map(str, model_rest))}) - N samples, "
                                         f"then the trailing dims of {given}".replace("(N, )", "(N,)"),
                                found=f"dims {_fmt_shape(dims)}", hint=hint)
        else:
            self.kind = "bin510"
            if len(input_shape) != 4:
                raise DoptError(f"{ctx}: a 510 file is 4-D (N, C, H, W) but the model input has "
                                f"rank {len(input_shape)}", file=self.source, field="offset 0 (magic)",
                                expected=f"a 610 file (any rank) for {given}",
                                found=f"a 510 file with dims {_fmt_shape(dims)}",
                                hint="write the data as a 610 file (python -m "
                                     "dopt.bin_data_preprocessing --magic 610)")
            c, h, w = self._file_sample
            sample = (h, w, c) if input_format == "NHWC" else (c, h, w)
            self._transpose = input_format == "NHWC"
            if sample != model_rest:
                layout = ("reordered to NHWC (H, W, C) because --input_format is NHWC"
                          if self._transpose else "read as NCHW (C, H, W)")
                raise DoptError(f"{ctx}: the 510 file's (C, H, W) does not match the model input "
                                f"(510 data is NCHW and is {layout})", file=self.source,
                                field="offsets 8-19 (C, H, W)",
                                expected=(f"C, H, W = {model_rest[2]}, {model_rest[0]}, "
                                          f"{model_rest[1]} for {given}" if self._transpose else
                                          f"C, H, W = {', '.join(map(str, model_rest))} for {given}"),
                                found=f"N, C, H, W = {', '.join(map(str, dims))}",
                                hint="510 files are always NCHW; regenerate the file in NCHW, or "
                                     "use a 610 file already in the model's layout")
        self.sample_shape = model_rest
        self._sample_bytes = 4 * math.prod(self._file_sample)

    def _read(self, start: int, count: int) -> np.ndarray:
        if self._f.closed:
            raise DoptError("the calibration reader is closed", file=self.source)
        arr = np.empty((count,) + self._file_sample, dtype="<f4")
        self._f.seek(self._hdr + start * self._sample_bytes)
        got = self._f.readinto(memoryview(arr).cast("B")) if arr.size else 0
        if got != arr.nbytes:
            raise DoptError("the calibration .bin file became shorter while it was read",
                            file=self.source, field=f"offset {self._hdr + start * self._sample_bytes}",
                            expected=f"{arr.nbytes} bytes for samples {start}..{start + count - 1}",
                            found=f"{got} bytes", hint="do not modify the file during quantization")
        arr = arr.astype(np.float32, copy=False)
        if self._transpose:
            arr = np.ascontiguousarray(arr.transpose(0, 2, 3, 1))
        return arr

    def close(self) -> None:
        self._f.close()


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError:  # pragma: no cover - Pillow is a core dependency
        raise DoptError("reading IMAGE calibration sets needs the Python package 'Pillow', "
                        "which is not installed", hint="pip install pillow") from None
    return Image, ImageOps


class _ImageReader(CalibrationReader):
    kind = "image"

    def __init__(self, pp: Preprocess, input_name: str, input_shape: tuple[int, ...],
                 input_format: str, config_file: str | None):
        self.input_name, self.source = input_name, str(pp.path)
        ctx = self._ctx(config_file, pp.index)
        folder = Path(self.source)
        if not folder.is_dir():
            raise DoptError(f"{ctx}: input_type is IMAGE but the path is not a folder",
                            file=self.source, field="input_file_path",
                            expected="a folder holding the calibration images",
                            hint="point input_file_path to the folder, or write input_type: BINARY "
                                 "for a .bin file")
        given = f"--input_shape '{input_name}:{_fmt_dims(input_shape)}'"
        if len(input_shape) != 4:
            raise DoptError(f"{ctx}: IMAGE input needs a 4-D model input", file=self.source,
                            field="input_type", expected=f"a 4-D {input_format} input shape",
                            found=given, hint="use input_type: BINARY with a 610 file for this input")
        if input_format == "NHWC":
            _, h, w, c = input_shape
        else:
            _, c, h, w = input_shape
        if c not in (1, 3):
            raise DoptError(f"{ctx}: IMAGE input reads 3-channel (BGR/RGB) or 1-channel "
                            f"(grayscale) images but the model input has {c} channels",
                            file=self.source, field="input_type",
                            expected=f"C = 3 (or 1) in the {input_format} {given}", found=f"C = {c}",
                            hint="use input_type: BINARY with a .bin file for this input")
        mean = tuple(float(m) for m in pp.mean_value)
        if mean and len(mean) != c:
            raise DoptError(f"{ctx}: mean_value needs one value per input channel",
                            file=config_file,
                            field=f"preprocess_parameter[{pp.index}].mean_value" if config_file
                            else "mean_value",
                            expected=f"{c} mean_value lines (C of {given}), or none for zeros",
                            found=f"{len(mean)} values {list(mean)}",
                            hint=f"give exactly {c} mean_value entries")
        std = float(pp.standard_deviation)
        if not math.isfinite(std) or std < 0:
            raise DoptError(f"{ctx}: standard_deviation must be a finite number >= 0",
                            file=config_file,
                            field=f"preprocess_parameter[{pp.index}].standard_deviation"
                            if config_file else "standard_deviation",
                            found=repr(std))
        self._c, self._h, self._w = c, h, w
        self._nhwc = input_format == "NHWC"
        self._rgb = pp.image_format == "RGB"
        self._mean = np.asarray(mean if mean else (0.0,) * c, dtype=np.float32)
        self._std = np.float32(std)
        self.sample_shape = tuple(input_shape[1:])
        files, others, dirs = [], 0, 0
        with os.scandir(folder) as it:
            for e in it:
                if e.is_dir():
                    dirs += 1
                elif os.path.splitext(e.name)[1] in IMAGE_EXTENSIONS and e.is_file():
                    files.append(e.name)
                else:
                    others += 1
        if not files:
            raise DoptError(f"{ctx}: the folder holds no image files", file=self.source,
                            field="input_file_path",
                            expected=f"files ending in {', '.join(IMAGE_EXTENSIONS[:12])} (or "
                                     f"the same in upper case) directly in the folder",
                            found=f"{others} other file(s) and {dirs} subfolder(s) (subfolders are "
                                  f"not searched)",
                            hint="put the calibration images directly in this folder, or use "
                                 "input_type: BINARY for a .bin file")
        self._files = sorted(files)
        self.num_samples = len(self._files)
        self._ctx_text = ctx

    @property
    def files(self) -> list[str]:
        """The image file names, in reading order."""
        return list(self._files)

    def _load(self, name: str) -> np.ndarray:
        """One image as float32 (H, W, C) in BGR/RGB (or grayscale), resized, not normalized."""
        Image, ImageOps = _pil()
        path = os.path.join(self.source, name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    w, h = im.size
                    if w * h > MAX_IMAGE_PIXELS:
                        raise DoptError(f"{self._ctx_text}: an image is too large", file=path,
                                        expected=f"at most {MAX_IMAGE_PIXELS} pixels",
                                        found=f"{w} x {h}", hint="downscale or remove this image")
                    im = ImageOps.exif_transpose(im)
                    if im.mode.startswith("I;16") or im.mode == "I":
                        a16 = np.asarray(im).astype(np.int64)
                        im = Image.fromarray((np.clip(a16, 0, 65535) >> 8).astype(np.uint8), "L")
                    im = im.convert("L" if self._c == 1 else "RGB")
                    if im.size != (self._w, self._h):
                        im = im.resize((self._w, self._h), Image.Resampling.BILINEAR)
                    arr = np.asarray(im, dtype=np.float32)
        except DoptError:
            raise
        except Exception as e:  # Pillow raises many types for corrupt files
            raise DoptError(f"{self._ctx_text}: cannot read an image "
                            f"({type(e).__name__}: {e})", file=path,
                            expected="a readable image file", found="a corrupt or unsupported file",
                            hint="replace or delete this file; images are not skipped") from None
        if self._c == 1:
            arr = arr[:, :, None]
        elif not self._rgb:
            arr = arr[:, :, ::-1]
        return arr

    def _read(self, start: int, count: int) -> np.ndarray:
        out = np.empty((count,) + self.sample_shape, dtype=np.float32)
        for i in range(count):
            x = self._load(self._files[start + i]) - self._mean
            if self._std != 0:
                x /= self._std
            out[i] = x if self._nhwc else x.transpose(2, 0, 1)
        return out


def open_calibration(pp: Preprocess, *, input_name: str, input_shape: Sequence[int],
                     input_format: str = "NCHW", config_file: str | None = None
                     ) -> CalibrationReader:
    """Open the calibration set of one model input (``input_shape`` = ``(n, *rest)``)."""
    fmt = str(input_format).upper()
    if fmt not in _FORMATS:
        raise DoptError("unknown input format", field="--input_format",
                        expected="NCHW or NHWC", found=repr(input_format))
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise DoptError(f"the shape of input '{input_name}' is not usable for calibration",
                        field="--input_shape", expected="positive dims (n, ...)",
                        found=_fmt_shape(shape))
    if pp.input_type not in ("BINARY", "IMAGE"):
        raise DoptError("unknown input_type", file=config_file, field="input_type",
                        expected="BINARY or IMAGE", found=repr(pp.input_type))
    cls = _BinReader if pp.input_type == "BINARY" else _ImageReader
    return cls(pp, input_name, shape, fmt, config_file)


def open_all(config: SoConfig, input_shapes: dict[str, Sequence[int]],
             input_format: str = "NCHW") -> list[CalibrationReader]:
    """One reader per model input: the i-th preprocess_parameter for the i-th input of
    ``input_shapes`` (in the order ``--input_shape`` gives them). All inputs must hold
    the same number of samples."""
    names = list(input_shapes)
    if len(config.preprocess) != len(names):
        raise DoptError("the number of preprocess_parameter blocks does not match the number "
                        "of model inputs", file=config.path, field="preprocess_parameter",
                        expected=f"{len(names)} block(s), one per input of --input_shape "
                                 f"({', '.join(names)}), in that order",
                        found=f"{len(config.preprocess)} block(s)",
                        hint="add or remove preprocess_parameter blocks so that the i-th block "
                             "is the data of the i-th input")
    readers: list[CalibrationReader] = []
    try:
        for pp, name in zip(config.preprocess, names):
            readers.append(open_calibration(pp, input_name=name, input_shape=input_shapes[name],
                                            input_format=input_format, config_file=config.path))
        counts = {r.input_name: r.num_samples for r in readers}
        if len(set(counts.values())) > 1:
            raise DoptError("the inputs' calibration sets hold different numbers of samples",
                            file=config.path, field="preprocess_parameter",
                            expected="the same number of samples for every input (sample i of "
                                     "each input forms one calibration feed)",
                            found=", ".join(f"'{k}': {v} ({r.source})"
                                            for (k, v), r in zip(counts.items(), readers)),
                            hint="give every input the same number of samples")
    except BaseException:
        for r in readers:
            r.close()
        raise
    return readers


def iter_feeds(readers: Sequence[CalibrationReader], names: Sequence[str] | None = None,
               batch_size: int = 1, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """``{input_name: batch}`` dicts, the inputs' batches taken in step."""
    names = [r.input_name for r in readers] if names is None else list(names)
    if len(names) != len(readers):
        raise DoptError("iter_feeds needs one name per reader",
                        expected=f"{len(readers)} names", found=f"{len(names)}")
    if not readers:
        return
    n = min(r.num_samples for r in readers)
    limit = n if not limit else min(int(limit), n)
    its = [r.batches(batch_size, limit) for r in readers]
    for batch in zip(*its):
        yield dict(zip(names, batch))


# ------------------------------------------------------------------ writers

class BinWriter:
    """Write a BINARY calibration file batch by batch; the header's N is set at close.

    The file is written to a temporary sibling and renamed over ``path`` at
    :meth:`close` (or at the end of a ``with`` block without an exception); on error or
    :meth:`abort` nothing is left. ``sample_shape`` is fixed by the first batch if not
    given; a 510 sample is (C, H, W).
    """

    def __init__(self, path, *, magic: int = MAGIC_ND, sample_shape: Sequence[int] | None = None):
        if magic not in (MAGIC_ND, MAGIC_NCHW):
            raise DoptError("unknown magic number for a calibration .bin file", field="magic",
                            expected=f"{MAGIC_ND} or {MAGIC_NCHW}", found=repr(magic))
        self.path, self.magic = str(path), magic
        self.sample_shape: tuple[int, ...] | None = None
        self.num_samples = 0
        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(atomic_path(path))
        self._f = open(self._tmp, "wb")
        self._done = False
        if sample_shape is not None:
            self._start(tuple(int(d) for d in sample_shape))

    def _start(self, sample_shape: tuple[int, ...]) -> None:
        if self.magic == MAGIC_NCHW and len(sample_shape) != 3:
            self.abort()
            raise DoptError("a 510 file holds 4-D NCHW data", file=self.path, field="magic",
                            expected="samples of shape (C, H, W), i.e. an (N, C, H, W) array",
                            found=f"samples of shape {_fmt_shape(sample_shape)}",
                            hint="use magic 610 for data of any other rank")
        if len(sample_shape) + 1 > MAX_RANK or any(not 1 <= d <= MAX_DIM for d in sample_shape):
            self.abort()
            raise DoptError("the data's shape cannot be stored in a calibration .bin file",
                            file=self.path, expected=f"rank 1 to {MAX_RANK}, every dim >= 1",
                            found=f"(N, {', '.join(map(str, sample_shape))})")
        self.sample_shape = sample_shape
        if self.magic == MAGIC_ND:
            head = struct.pack(f"<{2 + 1 + len(sample_shape)}i", MAGIC_ND, 1 + len(sample_shape),
                               0, *sample_shape)
        else:
            head = struct.pack("<5i", MAGIC_NCHW, 0, *sample_shape)
        self._f.write(head)

    def append(self, batch) -> None:
        """Append samples: an array ``(b, *sample_shape)``, cast to float32."""
        if self._done:
            raise DoptError("the .bin writer is already closed", file=self.path)
        arr = np.asarray(batch)
        if arr.ndim < 1 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            self.abort()
            raise DoptError("calibration data must be a numeric array with a leading sample axis",
                            file=self.path, found=f"dtype {arr.dtype}, shape {arr.shape}")
        if self.sample_shape is None:
            self._start(tuple(arr.shape[1:]))
        if tuple(arr.shape[1:]) != self.sample_shape:
            self.abort()
            raise DoptError("a batch's sample shape differs from the file's", file=self.path,
                            expected=f"(b, {', '.join(map(str, self.sample_shape))})",
                            found=_fmt_shape(arr.shape))
        if self.num_samples + arr.shape[0] > MAX_DIM:
            self.abort()
            raise DoptError("too many samples for an int32 header", file=self.path,
                            expected=f"at most {MAX_DIM}")
        per = max(1, _WRITE_CHUNK_BYTES // max(1, 4 * math.prod(self.sample_shape)))
        for s in range(0, arr.shape[0], per):
            chunk = np.ascontiguousarray(arr[s:s + per], dtype="<f4")
            if not np.isfinite(chunk).all():
                bad = s + int(np.argmin(np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1)))
                self.abort()
                raise DoptError("the calibration data holds NaN or infinity", file=self.path,
                                field=f"sample {self.num_samples + bad}",
                                expected="finite float32 values", found="NaN/inf",
                                hint="clean the data before writing it")
            self._f.write(chunk.tobytes())
        self.num_samples += arr.shape[0]

    def close(self) -> None:
        """Write N into the header and move the file into place."""
        if self._done:
            return
        if self.num_samples == 0:
            self.abort()
            raise DoptError("no samples were written; the calibration file was not created",
                            file=self.path, expected="at least one sample")
        self._f.seek(8 if self.magic == MAGIC_ND else 4)
        self._f.write(struct.pack("<i", self.num_samples))
        self._f.close()
        self._done = True
        self._stack.close()

    def abort(self) -> None:
        """Discard the temporary file; ``path`` is left as it was."""
        if self._done:
            return
        self._done = True
        self._f.close()
        self._stack.__exit__(_Aborted, _Aborted(), None)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self):
        if not getattr(self, "_done", True):
            self.abort()


class _Aborted(Exception):
    pass


def write_bin610(path, array) -> None:
    """Write ``array`` (``(N, ...)``, rank 1..8) as a 610 file, atomically."""
    with BinWriter(path, magic=MAGIC_ND) as w:
        w.append(array)


def write_bin510(path, array) -> None:
    """Write an NCHW ``array`` ``(N, C, H, W)`` as a 510 file, atomically."""
    arr = np.asarray(array)
    if arr.ndim != 4:
        raise DoptError("a 510 file holds 4-D NCHW data", file=str(path),
                        expected="an (N, C, H, W) array", found=f"shape {arr.shape}",
                        hint="use write_bin610 for other ranks")
    with BinWriter(path, magic=MAGIC_NCHW) as w:
        w.append(arr)


def images_to_bin(folder, path, *, shape: Sequence[int], image_format: str = "BGR",
                  mean: Iterable[float] | None = None, std: float = 0.0, magic: int = MAGIC_ND,
                  input_format: str = "NCHW", batch_size: int = 32) -> int:
    """Read a folder of images as an IMAGE calibration set would and write a .bin file.

    ``shape`` is the model input shape ``(n, C, H, W)`` (or ``(n, H, W, C)`` with
    ``input_format='NHWC'``); ``n`` is ignored, the file holds one sample per image.
    A 610 file is written in ``input_format``; a 510 file is always NCHW (a reader with
    ``--input_format NHWC`` reorders it back). Returns the number of samples written.
    """
    fmt = str(input_format).upper()
    if fmt not in _FORMATS:
        raise DoptError("unknown input format", field="input_format", expected="NCHW or NHWC",
                        found=repr(input_format))
    image_format = str(image_format).upper()
    if image_format not in ("BGR", "RGB"):
        raise DoptError("unknown image format", field="image_format", expected="BGR or RGB",
                        found=repr(image_format))
    std = float(std)
    if not math.isfinite(std) or std < 0:
        raise DoptError("the standard deviation must be a finite number >= 0 (0 = no division)",
                        field="std", found=repr(std))
    mean_t = tuple(float(m) for m in (mean or ()))
    for m in mean_t:
        if not math.isfinite(m) or not 0.0 <= m <= 255.0:
            raise DoptError("a mean value is out of range", field="mean",
                            expected="0.0 to 255.0", found=repr(m))
    shape = tuple(int(d) for d in shape)
    if magic == MAGIC_NCHW and fmt == "NHWC":
        if len(shape) != 4:
            raise DoptError("a 510 file holds 4-D data", field="shape", found=_fmt_shape(shape))
        shape, fmt = (shape[0], shape[3], shape[1], shape[2]), "NCHW"
    pp = Preprocess(input_file_path=str(folder), input_type="IMAGE", image_format=image_format,
                    mean_value=mean_t, standard_deviation=std)
    with open_calibration(pp, input_name="images", input_shape=shape, input_format=fmt) as r, \
            BinWriter(path, magic=magic, sample_shape=r.sample_shape) as w:
        for batch in r.batches(batch_size):
            w.append(batch)
        return w.num_samples
