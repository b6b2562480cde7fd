"""config.prototxt of no-training quantization: schema, parsing, validation, errors."""
import random
import re
from pathlib import Path

import pytest

from dopt.calib import prototxt as sc
from dopt.errors import DoptError

ROOT = Path(__file__).resolve().parents[1]

# The reference's two examples, verbatim (including its '//' comments and the
# "preprocess_parameter:" / "{" on separate lines).
REF_BINARY = """strategy: "Quant_INT8-8"
device: USE_GPU
// 多输入场景提供不同的bin文件
preprocess_parameter:
{  
    input_type: BINARY
    input_file_path: "path/to/user/bin/caffe_inception_calibrationset1.bin"
}
preprocess_parameter:
{  
    input_type: BINARY
    input_file_path: "path/to/user/bin/caffe_inception_calibrationset2.bin"
}
// ...
exclude_op:  "conv1"
exclude_op:  "conv2;conv3"
"""

REF_IMAGE = """strategy: "Quant_INT8-8"
device: USE_GPU
// 多输入场景提供不同的图片路径
preprocess_parameter:
{
    input_type: IMAGE
    image_format: BGR
    mean_value: 104.0
    mean_value: 113.0
    mean_value: 123.0
    standard_deviation: 0.5
    input_file_path: "path/to/user/images1/"
}
preprocess_parameter:
{
    input_type: IMAGE
    image_format: BGR
    mean_value: 104.0
    mean_value: 113.0
    mean_value: 123.0
    standard_deviation: 0.5
    input_file_path: "path/to/user/images2/"
}
// ...
exclude_op:  "conv1"
exclude_op:  "conv2;conv3"
"""


@pytest.fixture
def ref_tree(tmp_path, monkeypatch):
    """The reference examples' relative paths, under a temporary cwd."""
    b = tmp_path / "path/to/user/bin"
    b.mkdir(parents=True)
    for i in (1, 2):
        (b / f"caffe_inception_calibrationset{i}.bin").write_bytes(b"\0" * 4)
        (tmp_path / f"path/to/user/images{i}").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _cfg(tmp_path, text, name="config.prototxt"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _err(text, **kw):
    with pytest.raises(DoptError) as ei:
        sc.parse_so_config_text(text, **kw)
    return str(ei.value)


def test_reference_binary_example(ref_tree):
    c = sc.load_so_config(_cfg(ref_tree, REF_BINARY))
    assert c.strategy == "Quant_INT8-8" and c.device == "USE_GPU"
    assert c.exclude_op == ["conv1", "conv2", "conv3"]
    assert [p.input_type for p in c.preprocess] == ["BINARY", "BINARY"]
    assert c.preprocess[1].path == ref_tree / "path/to/user/bin/caffe_inception_calibrationset2.bin"
    assert c.preprocess[1].input_file_path == "path/to/user/bin/caffe_inception_calibrationset2.bin"
    assert [p.index for p in c.preprocess] == [0, 1]
    assert c.path.endswith("config.prototxt")


def test_reference_image_example(ref_tree):
    c = sc.load_so_config(_cfg(ref_tree, REF_IMAGE))
    p = c.preprocess[0]
    assert (p.input_type, p.image_format) == ("IMAGE", "BGR")
    assert p.mean_value == (104.0, 113.0, 123.0) and p.standard_deviation == 0.5
    assert p.path == ref_tree / "path/to/user/images1"
    assert len(c.preprocess) == 2


def test_defaults_and_additions_absent(tmp_path):
    (tmp_path / "imgs").mkdir()
    c = sc.parse_so_config_text(f'preprocess_parameter {{ input_file_path: "{tmp_path / "imgs"}" }}')
    assert (c.strategy, c.device, c.exclude_op) == ("Quant_INT8-8", "USE_CPU", [])
    p = c.preprocess[0]
    assert (p.input_type, p.image_format, p.mean_value, p.standard_deviation) == \
        ("IMAGE", "BGR", (), 0.0)
    assert c.calibration_algorithm == "auto"
    assert (c.calibration_samples, c.batch_size, c.seed, c.bias_correction, c.equalization) == \
        (None, None, None, None, None)


def test_additions_parsed(tmp_path):
    (tmp_path / "imgs").mkdir()
    c = sc.parse_so_config_text(
        f'preprocess_parameter {{ input_file_path: "{tmp_path / "imgs"}" }}\n'
        'calibration_algorithm: " percentile "\ncalibration_samples: 64\nbatch_size: 8\n'
        'seed: -3\nbias_correction: true\nequalization: false\n')
    assert (c.calibration_algorithm, c.calibration_samples, c.batch_size, c.seed) == \
        ("percentile", 64, 8, -3)
    assert c.bias_correction is True and c.equalization is False
    c = sc.parse_so_config_text(f'preprocess_parameter {{ input_file_path: "{tmp_path / "imgs"}" }}\n'
                                'calibration_samples: 0 calibration_algorithm: ""')
    assert c.calibration_samples is None and c.calibration_algorithm == "auto"


def test_exclude_op_forms_mixed():
    c = sc.parse_so_config_text('exclude_op: "a; b ;;c"\nexclude_op: "d"\nexclude_op: "b"\n'
                                'exclude_op: ""\npreprocess_parameter { input_file_path: "x" }',
                                check_paths=False)
    assert c.exclude_op == ["a", "b", "c", "d"]


def test_float32_values_read_as_short_decimals():
    c = sc.parse_so_config_text('preprocess_parameter { input_file_path: "x" mean_value: 123.675 '
                                'standard_deviation: 0.017 }', check_paths=False)
    assert c.preprocess[0].standard_deviation == 0.017
    assert c.preprocess[0].mean_value == (123.675,)


def test_slash_comments_keep_positions_and_strings():
    text = 'exclude_op: "a//b" // trailing comment\n// whole line\n  bogus: 1\n'
    assert sc._slash_comments_to_hash(text) == \
        'exclude_op: "a//b" #/ trailing comment\n#/ whole line\n  bogus: 1\n'
    msg = _err(text)
    assert "line 3, column 3" in msg and "'bogus'" in msg
    c = sc.parse_so_config_text('exclude_op: "a//b" // c\nexclude_op: \'x\\\'//y\' // d\n'
                                '# hash comment\npreprocess_parameter { input_file_path: "p" }',
                                check_paths=False)
    assert c.exclude_op == ["a//b", "x'//y"]


def test_crlf_and_bom(tmp_path):
    (tmp_path / "imgs").mkdir()
    text = (f'\ufeffdevice: USE_GPU\r\npreprocess_parameter {{\r\n'
            f' input_file_path: "{tmp_path / "imgs"}"\r\n}}\r\n')
    p = tmp_path / "c.prototxt"
    p.write_bytes(text.encode("utf-8"))
    assert sc.load_so_config(p).device == "USE_GPU"


def test_malformed_text_has_line_and_column():
    msg = _err('strategy: "Quant_INT8-8"\ndevice USE_GPU\n')
    assert "line 2, column" in msg and "device" in msg and "Fix:" in msg
    msg = _err('preprocess_parameter {\n  input_file_path: "x"\n')
    assert re.search(r"line \d+, column \d+", msg)
    msg = _err('exclude_op: "unterminated\n')
    assert "line 1, column" in msg and "exclude_op" in msg


def test_unknown_field_suggests():
    msg = _err('preprocess_parameter { input_tipe: BINARY input_file_path: "x" }')
    assert "unknown field 'input_tipe'" in msg and "did you mean 'input_type'" in msg
    assert "line 1, column 24" in msg
    msg = _err('stratgy: "Quant_INT8-8"')
    assert "'stratgy'" in msg and "did you mean 'strategy'" in msg


def test_unknown_enum_value_and_duplicate_singular():
    assert "USE_CPU, USE_GPU" in _err("device: 5")
    msg = _err("device: USE_NPU")
    assert "USE_NPU" in msg and "USE_CPU, USE_GPU" in msg
    msg = _err('preprocess_parameter { input_type: BIN input_file_path: "x" }')
    assert "BINARY, IMAGE" in msg
    msg = _err('device: USE_GPU\ndevice: USE_CPU\n')
    assert "given twice" in msg and "line 2" in msg


def test_strategy_other_than_int8():
    msg = _err('strategy: "Quant_INT4-4"\npreprocess_parameter { input_file_path: "x" }',
               check_paths=False)
    assert "supports only" in msg and "Quant_INT4-4" in msg


@pytest.mark.parametrize("text, needle", [
    ("device: USE_GPU", "no preprocess_parameter"),
    ("preprocess_parameter { input_type: BINARY }", "no input_file_path"),
    ('preprocess_parameter { input_file_path: "  " }', "no input_file_path"),
    ('preprocess_parameter { input_file_path: "x" standard_deviation: -0.5 }', "standard_deviation"),
    ('preprocess_parameter { input_file_path: "x" standard_deviation: nan }', "standard_deviation"),
    ('preprocess_parameter { input_file_path: "x" mean_value: 10 mean_value: 255.5 }',
     "mean_value #2"),
    ('preprocess_parameter { input_file_path: "x" mean_value: -1 }', "mean_value #1"),
    ('preprocess_parameter { input_file_path: "x" mean_value: inf }', "mean_value #1"),
    ('preprocess_parameter { input_file_path: "x" } batch_size: 0', "batch_size"),
    ('preprocess_parameter { input_file_path: "x" } calibration_samples: -1', "calibration_samples"),
])
def test_validation_errors(text, needle):
    msg = _err(text, check_paths=False)
    assert needle in msg and "Fix:" in msg


def test_input_file_path_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "f.bin").write_bytes(b"")
    msg = _err('preprocess_parameter { input_type: BINARY input_file_path: "nope.bin" }')
    assert "does not exist" in msg and "current working directory" in msg and "nope.bin" in msg
    msg = _err(f'preprocess_parameter {{ input_file_path: "{tmp_path / "nope"}" }}')
    assert "does not exist" in msg and "current working directory" not in msg
    assert "not a file" in _err('preprocess_parameter { input_type: BINARY input_file_path: "d" }')
    assert "not a folder" in _err('preprocess_parameter { input_file_path: "f.bin" }')
    c = sc.parse_so_config_text('preprocess_parameter { input_type: BINARY input_file_path: "f.bin" }')
    assert c.preprocess[0].path == tmp_path / "f.bin"


def test_config_file_errors(tmp_path):
    with pytest.raises(DoptError, match="does not exist"):
        sc.load_so_config(tmp_path / "missing.prototxt")
    big = tmp_path / "big.prototxt"
    big.write_bytes(b"#" * (sc.MAX_CONFIG_BYTES + 1))
    with pytest.raises(DoptError, match="too large"):
        sc.load_so_config(big)
    bad = tmp_path / "bad.prototxt"
    bad.write_bytes(b'device: USE_GPU\nexclude_op: "\xff"\n')
    with pytest.raises(DoptError, match=r"not UTF-8.*byte offset 29, line 2"):
        sc.load_so_config(bad)


def _normalize_proto(text: str) -> str:
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"\s+", " ", text)
    return re.sub(r"\s*([{};=\[\]])\s*", r"\1", text).strip()


def test_proto_file_matches_descriptor():
    doc = (ROOT / "dopt" / "calib" / "so_config.proto").read_text(encoding="utf-8")
    assert _normalize_proto(doc) == _normalize_proto(sc.schema_proto_text())
    for f in [*sc.ConfigMessage.DESCRIPTOR.fields, *sc.PreprocessParameterMessage.DESCRIPTOR.fields]:
        assert re.search(rf"\b{f.name} = {f.number}\b", doc), f.name
    d = sc.ConfigMessage.DESCRIPTOR
    assert d.full_name == "dopt.so.Config"
    assert d.fields_by_name["strategy"].default_value == "Quant_INT8-8"
    assert d.fields_by_name["device"].default_value == 0
    assert sc.ConfigMessage().HasField("device") is False


def test_fuzz_prototxt(ref_tree):
    rng = random.Random(1234)
    alphabet = list('{}:;"\'/#\n \\0123456789.-abcxyz_') + ["BINARY", "IMAGE", "device",
                                                               "mean_value", "\xff", "\x00"]
    base = REF_IMAGE.replace("images1/", "images1").replace("images2/", "images2")
    ok = 0
    for _ in range(400):
        t = list(base)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(t) + 1)
            op = rng.random()
            if op < 0.4 and t:
                del t[min(i, len(t) - 1)]
            elif op < 0.7:
                t.insert(i, rng.choice(alphabet))
            elif t:
                t[min(i, len(t) - 1)] = rng.choice(alphabet)
        try:
            c = sc.parse_so_config_text("".join(t))
            assert isinstance(c, sc.SoConfig)
            ok += 1
        except DoptError as e:
            assert str(e)
    assert ok > 0
