"""The .om container: exact round trips, and every corruption is a clear DoptError."""
import hashlib
import json
import struct

import numpy as np
import pytest

from dopt import DoptError
from dopt.npu import omfile as om


def sample():
    rng = np.random.default_rng(0)
    return om.OmModel(
        graph={"nodes": [{"name": "conv", "op": "QuantizedConvolution"}]},
        tensors={"w": rng.integers(-127, 128, (8, 3, 3, 3)).astype(np.int8),
                 "b": rng.integers(-1000, 1000, 8).astype(np.int32),
                 "s": rng.random(8).astype(np.float32),
                 "h": rng.random((2, 5)).astype(np.float16),
                 "empty": np.zeros((0, 4), np.float32)},
        profile={"name": "kirin9000", "version": "1.0.0"}, quant={"conv": {"scale": 0.1}},
        meta={"source": "unit test"})


def _eq(a, b):
    assert a.graph == b.graph and a.profile == b.profile and a.quant == b.quant
    assert a.meta == b.meta and list(a.tensors) == list(b.tensors)
    for k in a.tensors:
        assert a.tensors[k].dtype == b.tensors[k].dtype
        assert np.array_equal(a.tensors[k], b.tensors[k])


def test_round_trip(tmp_path):
    m = sample()
    om.write_om(tmp_path / "m.om", m)
    _eq(m, om.read_om(tmp_path / "m.om"))
    doc = json.loads(json.dumps(om.to_json(m)))
    _eq(m, om.from_json(doc))
    om.write_om(tmp_path / "again.om", om.from_json(doc))
    assert (tmp_path / "again.om").read_bytes() == (tmp_path / "m.om").read_bytes()


def _read_expect_error(path):
    with pytest.raises(DoptError) as e:
        om.read_om(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_fuzz_bit_flips_and_truncations(tmp_path):
    om.write_om(tmp_path / "m.om", sample())
    good = (tmp_path / "m.om").read_bytes()
    rng = np.random.default_rng(1)
    bad = tmp_path / "bad.om"
    for i in range(300):
        data = bytearray(good)
        kind = i % 3
        if kind == 0:
            pos = int(rng.integers(0, len(data)))
            data[pos] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            data = data[:int(rng.integers(0, len(data)))]
        else:
            data += bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8))
        bad.write_bytes(bytes(data))
        _read_expect_error(bad)


def _resign(header_fields, manifest: bytes, payload: bytes) -> bytes:
    magic, ver, flags = header_fields
    digest = hashlib.sha256(manifest + payload).digest()
    return om.HEADER.pack(magic, ver, flags, len(manifest), len(payload), digest) + manifest + \
        payload


def _parts(path):
    raw = path.read_bytes()
    magic, ver, flags, mlen, plen, _ = om.HEADER.unpack(raw[:64])
    return (magic, ver, flags), json.loads(raw[64:64 + mlen]), raw[64 + mlen:]


@pytest.mark.parametrize("mutate,needle", [
    (lambda h, m, p: ((b"NOTANOM!", h[1], h[2]), m, p), "bad magic"),
    (lambda h, m, p: ((h[0], 9, h[2]), m, p), "format version"),
    (lambda h, m, p: ((h[0], h[1], 4), m, p), "unknown flags"),
    (lambda h, m, p: (h, dict(m, tensors=[dict(m["tensors"][0], dtype="object")]), p),
     "unknown dtype"),
    (lambda h, m, p: (h, dict(m, tensors=[dict(m["tensors"][0], shape=[8, -3])]), p),
     "malformed shape"),
    (lambda h, m, p: (h, dict(m, tensors=[dict(m["tensors"][0], offset=10 ** 12)]), p),
     "does not fit"),
    (lambda h, m, p: (h, dict(m, tensors=[dict(m["tensors"][0], shape=[1 << 40, 1 << 40])]), p),
     "does not fit"),  # Python ints: no overflow wraps the size check
    (lambda h, m, p: (h, dict(m, tensors=m["tensors"] + m["tensors"][:1]), p), "repeated"),
    (lambda h, m, p: (h, dict(m, graph=[]), p), "'graph'"),
    (lambda h, m, p: (h, dict(m, format_version=2), p), "format_version"),
])
def test_resigned_corruptions(tmp_path, mutate, needle):
    om.write_om(tmp_path / "m.om", sample())
    h, man, payload = _parts(tmp_path / "m.om")
    h2, man2, p2 = mutate(h, man, payload)
    bad = tmp_path / "bad.om"
    bad.write_bytes(_resign(h2, json.dumps(man2).encode(), p2))
    assert needle in _read_expect_error(bad)


def test_length_fields_bounded(tmp_path):
    om.write_om(tmp_path / "m.om", sample())
    raw = bytearray((tmp_path / "m.om").read_bytes())
    bad = tmp_path / "bad.om"
    for off, val, needle in ((16, 2 ** 63, "manifest length"), (24, 2 ** 40, "payload length")):
        data = bytearray(raw)
        data[off:off + 8] = struct.pack("<Q", val)
        bad.write_bytes(bytes(data))
        assert needle in _read_expect_error(bad)
    bad.write_bytes(b"")
    assert "shorter than the 64-byte header" in _read_expect_error(bad)


def test_json_dump_errors():
    with pytest.raises(DoptError, match="not a dopt .om JSON dump"):
        om.from_json({"format": "x"}, file="d.json")
    doc = om.to_json(sample())
    doc["tensors"]["w"]["data"] = "!!notbase64"
    with pytest.raises(DoptError, match="tensors.w"):
        om.from_json(doc, file="d.json")
    doc = om.to_json(sample())
    doc["tensors"]["w"]["shape"] = [7]
    with pytest.raises(DoptError, match="cannot be decoded"):
        om.from_json(doc, file="d.json")
