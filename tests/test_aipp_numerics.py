"""AIPP numerics (dopt.npu.aipp): golden vectors of docs/numerics.md, the CSC presets against
their float formulas, NV12/NV21 -> RGB against OpenCV."""
from __future__ import annotations

import numpy as np
import pytest

from dopt.errors import DoptError
from dopt.npu import aipp as A
from dopt.npu import aipp_config as C


def test_csc_golden_vectors():
    m, ib, ob = A.csc_preset("JPEG", "RGB888_U8")
    # the reference's own YUV->RGB matrix and biases
    assert m.tolist() == [[256, 0, 359], [256, -88, -183], [256, 454, 0]]
    assert ib.tolist() == [0, 128, 128] and ob.tolist() == [0, 0, 0]
    assert A.csc(np.array([[100, 150, 200]], np.uint8), m, ib, ob).tolist() == [[201, 41, 139]]
    px = np.array([[16, 128, 128], [235, 128, 128], [81, 90, 240]], np.uint8)
    out = A.csc(px, *A.csc_preset("BT_601_NARROW", "RGB888_U8"))
    assert out.tolist() == [[0, 0, 0], [255, 255, 255], [255, 0, 0]]


@pytest.mark.parametrize("space", A.COLOR_SPACES)
@pytest.mark.parametrize("out_fmt", C.CSC_TO_RGB + C.CSC_TO_YUV)
def test_every_preset_within_one_lsb_of_its_float_formula(space, out_fmt):
    rng = np.random.default_rng(1)
    px = rng.integers(0, 256, (4096, 3), dtype=np.uint8)
    m, ib, ob = A.csc_float(space, out_fmt)
    ref = np.clip(np.rint((px.astype(np.float64) - ib) @ m.T + ob[: m.shape[0]]), 0, 255)
    got = A.csc(px, *A.csc_preset(space, out_fmt)).astype(np.float64)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 2   # Q8 coefficients: stated tolerance 2 LSB
    assert np.mean(np.abs(got - ref) <= 1) > 0.99


def _nv(img, order):
    h, w = img.shape[:2]
    cv2 = pytest.importorskip("cv2")
    i420 = cv2.cvtColor(img, cv2.COLOR_RGB2YUV_I420).reshape(-1)
    y, u, v = i420[: h * w], i420[h * w: h * w * 5 // 4], i420[h * w * 5 // 4:]
    uv = np.stack([u, v] if order == "NV12" else [v, u], -1).reshape(-1)
    return np.concatenate([y, uv]).reshape(h * 3 // 2, w)


def _photos():
    try:
        import skimage.data as sd
        photos = [sd.astronaut(), sd.coffee(), sd.chelsea()]
    except ImportError:
        photos = []
    photos.append(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    return [np.ascontiguousarray(p[: p.shape[0] // 2 * 2, : p.shape[1] // 2 * 2])
            for p in photos]


@pytest.mark.parametrize("order", ["NV12", "NV21"])
def test_yuv420sp_to_rgb_within_one_lsb_of_opencv(order):
    cv2 = pytest.importorskip("cv2")
    code = cv2.COLOR_YUV2RGB_NV12 if order == "NV12" else cv2.COLOR_YUV2RGB_NV21
    spec_cs = {"switch": True, "dynamic": False, "output_format": "RGB888_U8",
               "color_space": "BT_601_NARROW"}
    for img in _photos():
        h, w = img.shape[:2]
        frame = _nv(img, order)
        ref = cv2.cvtColor(frame, code).astype(int)
        x = A.decode(frame[None], "YUV420SP_U8", w, h)
        if order == "NV21":
            x = x[..., [0, 2, 1]]          # what rbuv_swap_switch does
        got = A.csc(x, *A._csc_params(spec_cs, "YUV420SP_U8"))[0].astype(int)
        assert np.abs(got - ref).max() <= 1


def test_decode_layouts_agree():
    rng = np.random.default_rng(2)
    h, w = 4, 6
    y = rng.integers(0, 256, (h, w), dtype=np.uint8)
    u = rng.integers(0, 256, (h, w // 2), dtype=np.uint8)
    v = rng.integers(0, 256, (h, w // 2), dtype=np.uint8)
    yuyv = np.stack([y[:, 0::2], u, y[:, 1::2], v], -1).reshape(1, h, w, 2)
    sp422 = np.concatenate([y.reshape(-1), np.stack([u, v], -1).reshape(-1)]).reshape(1, -1)
    a = A.decode(yuyv, "YUYV_U8", w, h)
    b = A.decode(sp422, "YUV422SP_U8", w, h)
    assert a.shape == (1, h, w, 3) and np.array_equal(a, b)
    assert np.array_equal(a[0, :, 1::2, 1], u) and np.array_equal(a[0, ..., 0], y)


def test_bilinear_golden():
    x = np.array([[0, 100], [200, 255]], np.uint8)[None, :, :, None]
    assert A.bilinear(x, 4, 4)[0, :, :, 0].tolist() == [
        [0, 25, 75, 100], [50, 72, 117, 139], [150, 167, 200, 216], [200, 214, 241, 255]]
    y = (np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1) * 16)
    assert A.bilinear(y, 2, 2)[0, :, :, 0].tolist() == [[40, 72], [168, 200]]


def _spec(text):
    return C.parse_text(text)[0]


def test_pipeline_golden_dtc_rotation_padding():
    spec = _spec("""aipp_op { input_para { format: RGB888_U8 shape { src_image_size_w: 3
        src_image_size_h: 2 } }
        swap_func { rbuv_swap_switch: true }
        dtc_func { switch: true mean_chn_0: 4 mean_chn_1: 4 mean_chn_2: 4 min_chn_0: 2.0
                   min_chn_1: 2.0 min_chn_2: 2.0 var_reci_chn_0: 2.0 var_reci_chn_1: 2.0
                   var_reci_chn_2: 2.0 }
        rotation_func { switch: true rotation_angle: 90 }
        padding_func { switch: true top_padding_size: 1 padding_value_chn_0: 7.5 } }""")
    raw = np.arange(18, dtype=np.uint8).reshape(1, 2, 3, 3) * 10   # BGR bytes
    out = A.run(spec, raw, 3)
    assert out.dtype == np.float16 and out.shape == (1, 3, 4, 2)
    assert out[0, :, 0].tolist() == [[7.5, 7.5], [0, 0], [0, 0]]   # top padding row
    # channel 0 is the R byte (index 2 after the swap); (x - 4 - 2) * 2; rotated clockwise
    r = (raw[0, ..., 2].astype(np.float32) - 6) * 2
    assert out[0, 0, 1:].tolist() == np.rot90(r, -1).tolist()
    assert A.output_hw(spec) == (4, 2)


def test_dtc_rounds_to_fp16_with_fp16_constants():
    spec = _spec("""aipp_op { input_para { format: YUV400_U8 shape { src_image_size_w: 2
        src_image_size_h: 2 } } dtc_func { switch: true mean_chn_0: 72 min_chn_0: 0.93
        var_reci_chn_0: 0.01110926 } }""")
    out = A.run(spec, np.array([[[73, 0], [255, 72]]], np.uint8), 1)
    # min and var_reci are stored as FP16 (0.93017578125, 0.0111083984375)
    assert float(out[0, 0, 0, 0]) == 0.0007758140563964844
    assert np.array_equal(out[0, 0], ((np.array([[73, 0], [255, 72]], np.float32) - 72
                                    - np.float32(np.float16(0.93)))
                                   * np.float32(np.float16(0.01110926))).astype(np.float16))


def test_runtime_params_checked_against_the_maxima():
    spec = _spec("""aipp_op { input_para { format: RGB888_U8 shape { src_image_size_w: 64
        src_image_size_h: 64 } }
        crop_func { switch: true dynamic: true crop_size_w: 32 crop_size_h: 32 }
        resize_func { switch: true resize_output_w: 32 resize_output_h: 32 } }""")
    raw = np.zeros((1, 64, 64, 3), np.uint8)
    assert A.run(spec, raw, 3, {"crop_size_w": 16, "crop_size_h": 16}).shape == (1, 3, 32, 32)
    for params, needle in [({"crop_size_w": 40, "crop_size_h": 32}, "over the compiled maximum"),
                           ({"resize_output_w": 20}, "static in this model"),
                           ({"crop_size_w": 16, "crop_size_h": 16, "load_start_pos_w": 60},
                            "leaves the image"),
                           ({"bogus": 1}, "unknown AIPP run-time field"),
                           ({"crop_size_w": "8"}, "invalid")]:
        with pytest.raises(DoptError, match=needle):
            A.run(spec, raw, 3, params)
