"""Calibration set readers (BINARY 610/510, IMAGE folders), writers and the converter CLI."""
import os
import random
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from dopt.calib import sets as cs
from dopt.cli import bin_data_preprocessing as bdp
from dopt.errors import DoptError
from dopt.calib.prototxt import Preprocess, SoConfig, parse_so_config_text


def _bin(path):
    return Preprocess(input_file_path=str(path), input_type="BINARY")


def _img(path, fmt="BGR", mean=(), std=0.0):
    return Preprocess(input_file_path=str(path), input_type="IMAGE", image_format=fmt,
                      mean_value=tuple(mean), standard_deviation=std)


def _open(pp, shape, fmt="NCHW", name="x"):
    return cs.open_calibration(pp, input_name=name, input_shape=shape, input_format=fmt)


def _read_all(reader, bs=3):
    parts = list(reader.batches(bs))
    return np.concatenate(parts) if parts else None


def _raises(fn, *needles):
    with pytest.raises(DoptError) as ei:
        fn()
    msg = str(ei.value)
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def _rng_data(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------ BINARY

@pytest.mark.parametrize("shape", [(7,), (5, 4), (4, 2, 3), (3, 3, 5, 5), (2, 1, 2, 3, 2),
                                   (2, 1, 1, 1, 1, 1, 1, 2)])
def test_610_round_trip_any_rank(tmp_path, shape):
    data = _rng_data(shape)
    p = tmp_path / "d.bin"
    cs.write_bin610(p, data)
    raw = p.read_bytes()
    assert struct.unpack("<2i", raw[:8]) == (610, len(shape))
    assert struct.unpack(f"<{len(shape)}i", raw[8:8 + 4 * len(shape)]) == shape
    with _open(_bin(p), (1,) + shape[1:]) as r:
        assert (r.kind, r.num_samples, r.sample_shape) == ("bin610", shape[0], shape[1:])
        assert r.source == str(p)
        got = _read_all(r)
    np.testing.assert_array_equal(got, data)
    assert got.dtype == np.float32


def test_510_round_trip_and_header(tmp_path):
    data = _rng_data((5, 3, 4, 6))
    p = tmp_path / "d.bin"
    cs.write_bin510(p, data)
    raw = p.read_bytes()
    assert struct.unpack("<5i", raw[:20]) == (510, 5, 3, 4, 6) and len(raw) == 20 + data.nbytes
    with _open(_bin(p), (2, 3, 4, 6)) as r:
        assert (r.kind, r.num_samples, r.sample_shape) == ("bin510", 5, (3, 4, 6))
        np.testing.assert_array_equal(_read_all(r, 2), data)


def test_510_reordered_for_nhwc(tmp_path):
    data = _rng_data((4, 3, 2, 5))
    p = tmp_path / "d.bin"
    cs.write_bin510(p, data)
    with _open(_bin(p), (1, 2, 5, 3), "NHWC") as r:
        assert r.sample_shape == (2, 5, 3)
        got = _read_all(r, 3)
    np.testing.assert_array_equal(got, data.transpose(0, 2, 3, 1))
    assert got.flags.c_contiguous
    # an NHWC-shaped 510 header is still read as NCHW: mismatch
    _raises(lambda: _open(_bin(p), (1, 3, 2, 5), "NHWC"), "510", "NCHW", "C, H, W = 5, 3, 2")


def test_610_not_reordered(tmp_path):
    data = _rng_data((4, 2, 5, 3))  # NHWC data
    p = tmp_path / "d.bin"
    cs.write_bin610(p, data)
    with _open(_bin(p), (1, 2, 5, 3), "NHWC") as r:
        np.testing.assert_array_equal(_read_all(r), data)
    nchw = tmp_path / "nchw.bin"
    cs.write_bin610(nchw, data.transpose(0, 3, 1, 2))
    _raises(lambda: _open(_bin(nchw), (1, 2, 5, 3), "NHWC"), "never reordered", "(N, 2, 5, 3)",
            "(4, 3, 2, 5)", "input 'x'", str(nchw))


def test_batches_limit_and_sizes(tmp_path):
    data = _rng_data((10, 2))
    p = tmp_path / "d.bin"
    cs.write_bin610(p, data)
    with _open(_bin(p), (1, 2)) as r:
        assert [b.shape[0] for b in r.batches(4)] == [4, 4, 2]
        assert [b.shape[0] for b in r.batches(4, limit=6)] == [4, 2]
        assert [b.shape[0] for b in r.batches(4, limit=0)] == [4, 4, 2]
        assert [b.shape[0] for b in r.batches(20, limit=99)] == [10]
        np.testing.assert_array_equal(np.concatenate(list(r.batches(3, limit=5))), data[:5])
        assert len(r) == 10
        for bad in (0, -1, True, 1.5):
            with pytest.raises(DoptError):
                r.batches(bad)
        with pytest.raises(DoptError):
            r.batches(1, limit=-1)


def test_wrong_magic(tmp_path):
    p = tmp_path / "d.bin"
    p.write_bytes(struct.pack("<5i", 511, 1, 1, 1, 1) + b"\0" * 4)
    _raises(lambda: _open(_bin(p), (1, 1, 1, 1)), "unknown magic", "511", "610", "510",
            "offset 0")
    p.write_bytes(struct.pack(">5i", 510, 1, 1, 1, 1) + b"\0" * 4)
    _raises(lambda: _open(_bin(p), (1, 1, 1, 1)), "big-endian")
    np.save(tmp_path / "a.npy", np.zeros((2, 2), np.float32))
    _raises(lambda: _open(_bin(tmp_path / "a.npy"), (1, 2)), "--npy")


@pytest.mark.parametrize("raw, needle", [
    (b"", "too short"),
    (b"\x62\x02", "too short"),
    (struct.pack("<i", 610) + b"\x03\x00", "rank"),
    (struct.pack("<2i", 610, 3) + b"\0" * 6, "truncated"),
    (struct.pack("<3i", 510, 2, 3), "truncated"),
    (struct.pack("<2i", 610, 0), "1 to 8"),
    (struct.pack("<2i", 610, 9) + b"\0" * 36, "1 to 8"),
    (struct.pack("<2i", 610, -1), "1 to 8"),
    (struct.pack("<4i", 610, 2, 3, 0), "non-positive"),
    (struct.pack("<5i", 510, 1, -3, 1, 1), "offset 8 (C)"),
])
def test_bad_headers(tmp_path, raw, needle):
    p = tmp_path / "d.bin"
    p.write_bytes(raw)
    _raises(lambda: _open(_bin(p), (1, 3, 1, 1)), needle, str(p))


def test_truncated_and_long_data(tmp_path):
    p = tmp_path / "d.bin"
    cs.write_bin610(p, _rng_data((3, 2, 2)))
    full = p.read_bytes()
    p.write_bytes(full[:-5])
    _raises(lambda: _open(_bin(p), (1, 2, 2)), "truncated", "48 bytes of float32 data",
            "43 bytes of data")
    p.write_bytes(full + b"\0" * 4)
    _raises(lambda: _open(_bin(p), (1, 2, 2)), "longer than its header", "52 bytes of data")


def test_dims_mismatch(tmp_path):
    p = tmp_path / "d.bin"
    cs.write_bin610(p, _rng_data((3, 2, 2)))
    _raises(lambda: _open(_bin(p), (1, 2, 3), name="img"), "input 'img'", "(N, 2, 3)",
            "dims (3, 2, 2)", "--input_shape 'img:1,2,3'")
    _raises(lambda: _open(_bin(p), (1, 2, 2, 1)), "(N, 2, 2, 1)")
    q = tmp_path / "e.bin"
    cs.write_bin510(q, _rng_data((2, 3, 4, 4)))
    _raises(lambda: _open(_bin(q), (1, 3, 4, 5)), "C, H, W = 3, 4, 5", "N, C, H, W = 2, 3, 4, 4")
    _raises(lambda: _open(_bin(q), (1, 48)), "510 file is 4-D", "rank 2")


def test_binary_path_not_a_file(tmp_path):
    _raises(lambda: _open(_bin(tmp_path), (1, 2)), "not a file")


# ------------------------------------------------------------------ IMAGE

def _png(path, rgb, size=(4, 3)):
    w, h = size
    Image.fromarray(np.tile(np.asarray(rgb, np.uint8), (h, w, 1))).save(path)


def test_image_bgr_vs_rgb(tmp_path):
    _png(tmp_path / "a.png", (10, 20, 30))
    with _open(_img(tmp_path), (1, 3, 3, 4)) as r:
        assert (r.kind, r.num_samples, r.sample_shape) == ("image", 1, (3, 3, 4))
        x = _read_all(r)
    assert x.shape == (1, 3, 3, 4) and x.dtype == np.float32
    assert x[0, :, 0, 0].tolist() == [30, 20, 10]          # BGR, the default
    with _open(_img(tmp_path, "RGB"), (1, 3, 3, 4)) as r:
        assert _read_all(r)[0, :, 1, 2].tolist() == [10, 20, 30]
    with _open(_img(tmp_path), (1, 3, 4, 3), "NHWC") as r:
        y = _read_all(r)
    assert y.shape == (1, 3, 4, 3) and y[0, 2, 3].tolist() == [30, 20, 10]


def test_image_grayscale_for_one_channel(tmp_path):
    Image.fromarray(np.full((3, 4), 77, np.uint8)).save(tmp_path / "g.png")
    _png(tmp_path / "h.png", (10, 20, 30))
    with _open(_img(tmp_path), (1, 1, 3, 4)) as r:
        x = _read_all(r)
    assert x.shape == (2, 1, 3, 4)
    assert np.all(x[0] == 77)
    expect = np.asarray(Image.open(tmp_path / "h.png").convert("L"), np.float32)
    np.testing.assert_array_equal(x[1, 0], expect)
    # 16-bit grayscale is scaled to 8 bit by >> 8
    Image.fromarray(np.full((3, 4), 0x1234, np.uint16)).save(tmp_path / "i16.png")
    with _open(_img(tmp_path), (1, 1, 3, 4)) as r:
        assert np.all(_read_all(r)[2] == 0x12)
    _raises(lambda: _open(_img(tmp_path), (1, 4, 3, 4)), "4 channels", "BINARY")
    _raises(lambda: _open(_img(tmp_path), (1, 3, 4)), "4-D")


def test_image_resize_bilinear(tmp_path):
    grad = np.zeros((6, 8, 3), np.uint8)
    grad[:, :, 0] = np.arange(8, dtype=np.uint8)[None, :] * 30      # varies along W
    grad[:, :, 1] = np.arange(6, dtype=np.uint8)[:, None] * 40      # varies along H
    Image.fromarray(grad).save(tmp_path / "g.png")
    with _open(_img(tmp_path, "RGB"), (1, 3, 3, 5)) as r:
        x = _read_all(r)[0]
    expect = np.asarray(Image.fromarray(grad).resize((5, 3), Image.Resampling.BILINEAR), np.float32)
    np.testing.assert_array_equal(x, expect.transpose(2, 0, 1))
    assert np.all(np.diff(x[0], axis=1) > 0) and np.all(np.diff(x[1], axis=0) > 0)


def test_image_mean_std(tmp_path):
    _png(tmp_path / "a.png", (10, 20, 30))
    with _open(_img(tmp_path, mean=(1, 2, 4), std=0.5), (1, 3, 3, 4)) as r:
        assert _read_all(r)[0, :, 0, 0].tolist() == [(30 - 1) / 0.5, (20 - 2) / 0.5, (10 - 4) / 0.5]
    with _open(_img(tmp_path, mean=(1, 2, 4)), (1, 3, 3, 4)) as r:    # std 0: no division
        assert _read_all(r)[0, :, 0, 0].tolist() == [29, 18, 6]
    with _open(_img(tmp_path, std=2.0), (1, 3, 4, 3), "NHWC") as r:
        assert _read_all(r)[0, 0, 0].tolist() == [15, 10, 5]
    _raises(lambda: _open(_img(tmp_path, mean=(1, 2)), (1, 3, 3, 4)), "one value per input channel",
            "3 mean_value", "found 2 values")


def test_image_listing_rules(tmp_path):
    for name in ("b.PNG", "a.png", "c.Png", "notes.txt", "d.JPEG", ".hidden"):
        if name.lower().endswith((".png", ".jpeg")):
            _png(tmp_path / name, (1, 2, 3))
        else:
            (tmp_path / name).write_text("x")
    (tmp_path / "sub").mkdir()
    _png(tmp_path / "sub" / "e.png", (1, 2, 3))
    with _open(_img(tmp_path), (1, 3, 3, 4)) as r:
        assert r.files == ["a.png", "b.PNG", "d.JPEG"]        # ".Png" is not in the list
        assert r.num_samples == 3
    assert len(cs.IMAGE_EXTENSIONS) == 24 and len(set(cs.IMAGE_EXTENSIONS)) == 24


def test_image_empty_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "nested").mkdir()
    _raises(lambda: _open(_img(tmp_path), (1, 3, 3, 4)), "no image files",
            "1 other file(s) and 1 subfolder(s)")
    _raises(lambda: _open(_img(tmp_path / "readme.txt"), (1, 3, 3, 4)), "not a folder")


def test_image_corrupt_file_named(tmp_path):
    _png(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with _open(_img(tmp_path), (1, 3, 3, 4)) as r:
        it = r.batches(1)
        next(it)
        _raises(lambda: next(it), "cannot read an image", "b.jpg", "not skipped")
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(img).save(trunc / "c.png")
    raw = (trunc / "c.png").read_bytes()
    (trunc / "c.png").write_bytes(raw[:len(raw) // 2])
    with _open(_img(trunc), (1, 3, 3, 4)) as r:
        _raises(lambda: _read_all(r), "cannot read an image", "c.png")


def test_image_too_large(tmp_path, monkeypatch):
    _png(tmp_path / "a.png", (1, 2, 3), size=(10, 10))
    monkeypatch.setattr(cs, "MAX_IMAGE_PIXELS", 50)
    with _open(_img(tmp_path), (1, 3, 3, 4)) as r:
        _raises(lambda: _read_all(r), "too large", "10 x 10", "a.png")


def test_images_decoded_lazily(tmp_path, monkeypatch):
    for i in range(10):
        _png(tmp_path / f"{i:02d}.png", (i, i, i))
    with _open(_img(tmp_path), (1, 3, 3, 4)) as r:
        seen = []
        orig = r._load
        monkeypatch.setattr(r, "_load", lambda n: seen.append(n) or orig(n))
        b = next(r.batches(4))
        assert seen == ["00.png", "01.png", "02.png", "03.png"]
        assert b[:, 0, 0, 0].tolist() == [0, 1, 2, 3]


# ------------------------------------------------------------------ streaming

@pytest.mark.parametrize("magic, fmt", [(610, "NCHW"), (510, "NHWC")])
def test_bin_reader_memory_does_not_grow(tmp_path, magic, fmt):
    n, sample = 2048, (3, 32, 32)
    p = tmp_path / "big.bin"
    with cs.BinWriter(p, magic=magic, sample_shape=sample) as w:
        for s in range(0, n, 256):
            w.append(np.full((256,) + sample, s, np.float32))
    shape = (1, 32, 32, 3) if fmt == "NHWC" else (1,) + sample
    bs = 16
    batch_bytes = bs * 4 * int(np.prod(sample))
    with _open(_bin(p), shape, fmt) as r:
        tracemalloc.start()
        try:
            total = 0
            for b in r.batches(bs):
                total += b.shape[0]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert total == n
    file_bytes = os.path.getsize(p)
    assert file_bytes > 100 * batch_bytes
    assert peak < 4 * batch_bytes + 256 * 1024, (peak, batch_bytes)


# ------------------------------------------------------------------ several inputs

def _two_input_config(tmp_path, n_a=4, n_b=4):
    cs.write_bin610(tmp_path / "a.bin", _rng_data((n_a, 2), 1))
    cs.write_bin510(tmp_path / "b.bin", _rng_data((n_b, 3, 2, 2), 2))
    return parse_so_config_text(
        f'preprocess_parameter {{ input_type: BINARY input_file_path: "{tmp_path / "a.bin"}" }}\n'
        f'preprocess_parameter {{ input_type: BINARY input_file_path: "{tmp_path / "b.bin"}" }}\n',
        file=str(tmp_path / "config.prototxt"))


def test_open_all_and_iter_feeds(tmp_path):
    cfg = _two_input_config(tmp_path)
    readers = cs.open_all(cfg, {"a": (1, 2), "b": (1, 2, 2, 3)}, "NHWC")
    try:
        assert [r.kind for r in readers] == ["bin610", "bin510"]
        feeds = list(cs.iter_feeds(readers, ["a", "b"], batch_size=3))
        assert [sorted(f) for f in feeds] == [["a", "b"], ["a", "b"]]
        assert [f["b"].shape for f in feeds] == [(3, 2, 2, 3), (1, 2, 2, 3)]
        np.testing.assert_array_equal(np.concatenate([f["a"] for f in feeds]), _rng_data((4, 2), 1))
        assert len(list(cs.iter_feeds(readers, batch_size=1, limit=2))) == 2
    finally:
        for r in readers:
            r.close()


def test_open_all_errors(tmp_path):
    cfg = _two_input_config(tmp_path, n_b=5)
    _raises(lambda: cs.open_all(cfg, {"a": (1, 2)}), "2 block(s)", "1 block(s)",
            "preprocess_parameter", "config.prototxt")
    _raises(lambda: cs.open_all(cfg, {"a": (1, 2), "b": (1, 3, 2, 2)}),
            "different numbers of samples", "'a': 4", "'b': 5")
    msg = _raises(lambda: cs.open_all(cfg, {"a": (1, 3), "b": (1, 3, 2, 2)}), "input 'a'",
                  "preprocess_parameter #1 of")
    assert "config.prototxt" in msg


# ------------------------------------------------------------------ writers

def test_bin_writer_streaming_and_atomic(tmp_path):
    p = tmp_path / "s.bin"
    with cs.BinWriter(p) as w:
        w.append(np.ones((2, 3), np.float64))
        w.append(np.zeros((5, 3), np.int32))
        assert not p.exists()
    assert struct.unpack("<4i", p.read_bytes()[:16]) == (610, 2, 7, 3)
    assert w.num_samples == 7 and w.sample_shape == (3,)
    before = p.read_bytes()
    with pytest.raises(RuntimeError):
        with cs.BinWriter(p) as w:
            w.append(np.ones((4, 3)))
            raise RuntimeError("boom")
    assert p.read_bytes() == before
    _raises(lambda: cs.BinWriter(p).close(), "no samples")
    w = cs.BinWriter(p, sample_shape=(3,))
    _raises(lambda: w.append(np.ones((1, 4))), "sample shape differs")
    _raises(lambda: cs.write_bin610(p, np.array([[1.0, np.nan]])), "NaN", "sample 0")
    _raises(lambda: cs.write_bin610(p, np.float32(3)), "leading sample axis")
    _raises(lambda: cs.write_bin610(p, np.zeros((1,) * 9)), "rank 1 to 8")
    _raises(lambda: cs.write_bin510(p, np.zeros((1, 2, 3))), "4-D NCHW")
    _raises(lambda: cs.BinWriter(p, magic=511), "610 or 510")
    _raises(lambda: cs.write_bin610(tmp_path / "missing" / "x.bin", np.ones((1, 1))),
            "does not exist")
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["s.bin"]     # no temporary files left behind


def test_images_to_bin_matches_reader(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(5):
        _png(imgs / f"{i}.png", (10 * i, 20, 200 - i), size=(7, 5))
    kw = dict(image_format="RGB", mean=(1, 2, 3), std=2.0)
    with _open(_img(imgs, "RGB", (1, 2, 3), 2.0), (1, 3, 4, 6)) as r:
        ref = _read_all(r)
    n = cs.images_to_bin(imgs, tmp_path / "a.bin", shape=(1, 3, 4, 6), batch_size=2, **kw)
    assert n == 5
    with _open(_bin(tmp_path / "a.bin"), (1, 3, 4, 6)) as r:
        np.testing.assert_array_equal(_read_all(r), ref)
    # 510 from an NHWC shape is stored NCHW and reordered back by an NHWC reader
    cs.images_to_bin(imgs, tmp_path / "b.bin", shape=(1, 4, 6, 3), magic=510, input_format="NHWC",
                     **kw)
    assert struct.unpack("<5i", (tmp_path / "b.bin").read_bytes()[:20]) == (510, 5, 3, 4, 6)
    with _open(_bin(tmp_path / "b.bin"), (1, 4, 6, 3), "NHWC") as r:
        np.testing.assert_array_equal(_read_all(r), ref.transpose(0, 2, 3, 1))


def test_cli_images_npy_and_errors(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _png(imgs / "a.png", (10, 20, 30))
    out = tmp_path / "o.bin"
    assert bdp.main(["--images", str(imgs), "--output", str(out), "--shape", "1,3,2,2",
                     "--mean", "1,2", "3", "--std", "0.5", "--rgb", "--magic", "510"]) == 0
    assert "wrote 1 sample(s) of shape (3, 2, 2)" in capsys.readouterr().out
    with _open(_bin(out), (1, 3, 2, 2)) as r:
        assert _read_all(r)[0, :, 0, 0].tolist() == [18, 36, 54]
    arr = _rng_data((6, 4, 5))
    np.save(tmp_path / "a.npy", arr)
    assert bdp.main(["--npy", str(tmp_path / "a.npy"), "--output", str(out), "--shape", "1,4,5"]) == 0
    with _open(_bin(out), (1, 4, 5)) as r:
        np.testing.assert_array_equal(_read_all(r), arr)
    capsys.readouterr()
    for argv, needle in [
        (["--images", str(imgs), "--output", str(out)], "needs --shape"),
        (["--images", str(imgs), "--output", str(out), "--shape", "1,3,x"], "malformed --shape"),
        (["--images", str(imgs), "--output", str(out), "--shape", "1,3,2,2", "--mean", "1,2"],
         "one value per input channel"),
        (["--npy", str(tmp_path / "a.npy"), "--output", str(out), "--magic", "510"], "4-D NCHW"),
        (["--npy", str(tmp_path / "a.npy"), "--output", str(out), "--shape", "1,5,4"],
         "does not match --shape"),
        (["--npy", str(tmp_path / "nope.npy"), "--output", str(out)], "does not exist"),
        (["--npy", str(imgs / "a.png"), "--output", str(out)], "NumPy .npy"),
    ]:
        assert bdp.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, (argv, err)
    with pytest.raises(SystemExit) as ei:
        bdp.main(["--output", str(out)])
    assert ei.value.code == 2


def test_cli_runs_as_module(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    np.save(tmp_path / "a.npy", np.ones((2, 3), np.float32))
    r = subprocess.run([sys.executable, "-m", "dopt.bin_data_preprocessing", "--npy",
                        str(tmp_path / "a.npy"), "--output", str(tmp_path / "a.bin")],
                       cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a.bin").stat().st_size == 8 + 8 + 24


# ------------------------------------------------------------------ fuzz

def test_fuzz_bin_reader(tmp_path):
    rng = random.Random(7)
    good610 = tmp_path / "g610.bin"
    good510 = tmp_path / "g510.bin"
    cs.write_bin610(good610, _rng_data((3, 2, 2, 2)))
    cs.write_bin510(good510, _rng_data((3, 2, 2, 2)))
    p = tmp_path / "f.bin"
    outcomes = {"ok": 0, "err": 0}
    for i in range(600):
        raw = bytearray((good610 if i % 2 else good510).read_bytes())
        op = rng.random()
        if op < 0.5:
            for _ in range(rng.randint(1, 3)):
                j = rng.randrange(min(len(raw), 40)) if rng.random() < 0.8 else rng.randrange(len(raw))
                raw[j] = rng.randrange(256)
        elif op < 0.8:
            raw = raw[:rng.randrange(len(raw))]
        else:
            raw += bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        p.write_bytes(bytes(raw))
        try:
            with _open(_bin(p), (1, 2, 2, 2)) as r:
                x = _read_all(r, 2)
                assert x.shape == (r.num_samples, 2, 2, 2) and x.dtype == np.float32
            outcomes["ok"] += 1
        except DoptError as e:
            assert str(e)
            outcomes["err"] += 1
    assert outcomes["ok"] > 0 and outcomes["err"] > 0


def test_preprocess_defaults_resolve_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pp = Preprocess(input_file_path="rel/x.bin")
    assert pp.path == tmp_path / "rel" / "x.bin" and pp.input_type == "IMAGE"
    assert SoConfig(path="c").calibration_algorithm == "auto"
