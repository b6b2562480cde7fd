"""Calibration and evaluation data of the PTQ benchmark (``bench/bench_ptq.py``).

Everything here is real data that ships with an installed package, no download at run time:

* Fashion-MNIST (``demos.fashion_mnist.data``): calibration = the first K training images,
  evaluation = the 10k test set, normalised as the demo trains ((x/255 - 0.2860) / 0.3530).
* Photos of scikit-image's ``skimage.data`` (those inside the wheel; grayscale ones are repeated
  to 3 channels, ``stereo_motorcycle`` is its left image). Random-resized crops (+ horizontal
  flips) with fixed seeds make the ImageNet (EfficientNet-Lite0, 224x224) and PP-OCR det
  (320x320) sets. Calibration and evaluation crops come from DISJOINT photos (regions, for the
  two text images), so no evaluation pixel was seen in calibration: with only ~20 photos,
  crops of the same photo overlap heavily and a shared photo would make the evaluation
  optimistic. ``chelsea`` and ``cat`` are the same picture; only ``chelsea`` is used.
"""
from __future__ import annotations

import math

import numpy as np

# --- photos ------------------------------------------------------------------------------------

# ImageNet classifier (EfficientNet-Lite0). The evaluation side holds the two photos whose
# classes the float model's self-check verifies (cat, coffee cup) and the motorcycle.
IMAGENET_CALIB_PHOTOS = ["astronaut", "rocket", "immunohistochemistry", "camera", "coins",
                         "grass", "moon", "page"]
IMAGENET_EVAL_PHOTOS = ["chelsea", "coffee", "stereo_motorcycle", "hubble_deep_field",
                        "retina", "clock", "brick", "gravel", "cell"]

# PP-OCR text detector: the photos with text (``page``, a scanned printed page, and ``text``,
# handwritten formulas on a slanted sheet) are split into a left part (calibration) and a
# right part (evaluation); ``logo`` (the scikit-image logo, with lettering) is calibration
# only. "name:left"/"name:right" select the part. Crops are drawn round-robin over the list,
# so ``page`` is listed three times: about 3/10 of the crops are of printed text, the only
# text the detector finds reliably here (``text`` is handwriting), the rest are text-free or
# nearly text-free scenes (false-positive behaviour counts too).
OCR_CALIB_PHOTOS = ["page:left", "text:left", "logo", "astronaut", "page:left", "rocket",
                    "camera", "page:left", "coins", "immunohistochemistry"]
OCR_EVAL_PHOTOS = ["page:right", "text:right", "coffee", "chelsea", "page:right",
                   "stereo_motorcycle", "clock", "page:right", "hubble_deep_field", "brick"]

IMAGENET_SIZE = 224
IMAGENET_MEAN, IMAGENET_STD = 127.0, 128.0  # EfficientNet-Lite (TF) preprocessing, RGB
OCR_SIZE = 320                               # multiple of 32, as DB detection requires
OCR_MEAN, OCR_STD = 0.5, 0.5                 # rapidocr's det config: (x/255 - 0.5)/0.5, BGR


def photo(name: str) -> np.ndarray:
    """An ``skimage.data`` photo as RGB uint8 (H, W, 3); ``name:left``/``name:right`` halves."""
    import skimage.data

    base, _, part = name.partition(":")
    img = getattr(skimage.data, base)()
    if base == "stereo_motorcycle":
        img = img[0]
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[2] == 4:  # RGBA (logo): composite on white
        a = img[:, :, 3:4].astype(np.float32) / 255.0
        img = (img[:, :, :3] * a + 255.0 * (1.0 - a)).round().astype(np.uint8)
    if part:
        w = img.shape[1] // 2
        img = img[:, :w] if part == "left" else img[:, w:]
    return np.ascontiguousarray(img, dtype=np.uint8)


def random_resized_crops(names, n: int, size: int, seed: int, scale=(0.2, 1.0),
                         ratio=(3 / 4, 4 / 3), flip: bool = True) -> np.ndarray:
    """``n`` crops (uint8, n x size x size x 3), photos taken round-robin from ``names``.

    Each crop covers a random fraction ``scale`` of the photo's area with a random aspect
    ratio in ``ratio`` (log-uniform), at a random position, then is resized (bilinear, with
    PIL's antialiasing) to ``size`` x ``size`` and flipped left-right with probability 1/2.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = {nm: Image.fromarray(photo(nm)) for nm in names}
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        im = photos[names[i % len(names)]]
        W, H = im.size
        for _ in range(10):
            area = W * H * rng.uniform(*scale)
            r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            w, h = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
            if 0 < w <= W and 0 < h <= H:
                break
        else:
            w, h = min(W, H), min(W, H)
        x0, y0 = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
        crop = im.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
        a = np.asarray(crop)
        if flip and rng.random() < 0.5:
            a = a[:, ::-1]
        out[i] = a
    return out


# --- ImageNet (EfficientNet-Lite0) ---------------------------------------------------------------

def imagenet_normalize(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., H, W, 3) -> float32 (..., 3, H, W), (x - 127) / 128."""
    x = (rgb.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def imagenet_preprocess(rgb: np.ndarray, size: int = IMAGENET_SIZE) -> np.ndarray:
    """One whole photo the way the TF EfficientNet evaluation does: center crop of
    size/(size+32) of the shorter side, bicubic resize to ``size``, normalise -> (3, H, W)."""
    from PIL import Image

    im = Image.fromarray(rgb)
    W, H = im.size
    c = size / (size + 32) * min(W, H)
    x0, y0 = (W - c) / 2, (H - c) / 2
    im = im.resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + c, y0 + c))
    return imagenet_normalize(np.asarray(im))


def imagenet_sets(n_calib: int = 256, n_eval: int = 512, seed: int = 0):
    """(calibration float32 N x 3 x 224 x 224, evaluation float32 M x 3 x 224 x 224)."""
    calib = random_resized_crops(IMAGENET_CALIB_PHOTOS, n_calib, IMAGENET_SIZE, seed)
    ev = random_resized_crops(IMAGENET_EVAL_PHOTOS, n_eval, IMAGENET_SIZE, seed + 1)
    return imagenet_normalize(calib), imagenet_normalize(ev)


# --- PP-OCR det ----------------------------------------------------------------------------------

def ocr_normalize(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., H, W, 3) -> float32 BGR (..., 3, H, W), (x/255 - 0.5) / 0.5.

    rapidocr feeds the detector OpenCV's BGR order (``LoadImage`` converts RGB to BGR), with
    the det config's mean = std = 0.5, in an NCHW tensor whose sides are multiples of 32."""
    x = (rgb[..., ::-1].astype(np.float32) / 255.0 - OCR_MEAN) / OCR_STD
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def ocr_sets(n_calib: int = 64, n_eval: int = 128, size: int = OCR_SIZE, seed: int = 0):
    """(calibration, evaluation) float32 N x 3 x size x size for the PP-OCR text detector.

    Crops cover 30-100 % of the photo (text stays legible at 320x320); no flips (mirrored
    text is not what a text detector sees)."""
    calib = random_resized_crops(OCR_CALIB_PHOTOS, n_calib, size, seed + 10, scale=(0.3, 1.0),
                                 flip=False)
    ev = random_resized_crops(OCR_EVAL_PHOTOS, n_eval, size, seed + 11, scale=(0.3, 1.0),
                              flip=False)
    return ocr_normalize(calib), ocr_normalize(ev)


# --- Fashion-MNIST -------------------------------------------------------------------------------

def fmnist_sets(n_calib: int = 512, n_eval: int | None = None):
    """(calibration x: first ``n_calib`` training images, eval x, eval labels: the test set).

    float32 N x 1 x 28 x 28, normalised by ``demos.fashion_mnist.data.load``."""
    from demos.fashion_mnist import data

    calib, _ = data.load("train", limit=n_calib)
    ex, ey = data.load("test", limit=n_eval)
    return calib, ex, ey


def batches(x: np.ndarray, batch: int):
    """Consecutive batches of ``x`` (the last one may be smaller)."""
    for i in range(0, len(x), batch):
        yield x[i:i + batch]
