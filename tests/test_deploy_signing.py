"""Signed deployments: ``dopt deploy`` signs its build; ``dopt verify``, ``dopt run
--verify-signature`` and ``runtime.load(verify_with=)`` refuse any change to it."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("model_signing")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_deploy import make_project  # noqa: E402

from dopt import runtime  # noqa: E402
from dopt.cli.main import main as dopt_main  # noqa: E402
from dopt.deploy.signing import MANIFEST, SIGNATURE, generate_key  # noqa: E402
from dopt.errors import DoptError  # noqa: E402

SIGNED = ["model.om", "model_fp16.om", "quant_param.json", "report.json", MANIFEST]


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    d = tmp_path_factory.mktemp("deploy_signed")
    priv, pub = generate_key(d / "k")
    cfg = make_project(d, gates="  size: {max_mb: 5}\n",
                       extra=f"signing: {{key: {priv.name}}}\n", n_eval=64)
    assert dopt_main(["deploy", "-c", str(cfg)]) == 0
    return d / "out" / "build", pub, d


@pytest.fixture
def build(signed, tmp_path):
    """A fresh copy of the signed build (under another folder name) to tamper with."""
    src, pub, _ = signed
    dst = tmp_path / "shipped"
    shutil.copytree(src, dst)
    return dst, pub


def _refused(folder: Path, pub: Path, capsys) -> str:
    with pytest.raises(DoptError) as e:
        runtime.load(str(folder / "model.om"), verify_with=str(pub))
    assert dopt_main(["verify", str(folder), "--key", str(pub)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return str(e.value)


def test_signed_build_verifies_and_loads(build, capsys):
    folder, pub = build
    assert dopt_main(["verify", str(folder), "--key", str(pub)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verified"] and set(out["files"]) == set(SIGNED) - {MANIFEST}
    assert out["profile"] == "kirin9000" and out["dopt_version"]
    sess = runtime.load(str(folder / "model.om"), verify_with=str(pub))
    assert sess.outputs
    assert dopt_main(["run", "--om", str(folder / "model.om"), "--verify-signature",
                      str(pub)]) == 0
    man = json.loads((folder / MANIFEST).read_text())
    assert man["profile"]["name"] == "kirin9000" and len(man["files"]) == 4


@pytest.mark.parametrize("name", SIGNED)
def test_flipped_byte_in_each_signed_file_is_refused(build, capsys, name):
    folder, pub = build
    p = folder / name
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    msg = _refused(folder, pub, capsys)
    assert f"'{name}'" in msg and "tampered" in msg
    assert dopt_main(["run", "--om", str(folder / "model.om"), "--verify-signature",
                      str(pub)]) == 2


def test_truncated_file_is_refused(build, capsys):
    folder, pub = build
    p = folder / "model.om"
    p.write_bytes(p.read_bytes()[:-100])
    assert "'model.om'" in _refused(folder, pub, capsys)


def test_added_file_is_refused(build, capsys):
    folder, pub = build
    (folder / "extra_layer.bin").write_bytes(b"\x00" * 16)
    msg = _refused(folder, pub, capsys)
    assert "extra_layer.bin" in msg and "added" in msg


def test_removed_file_is_refused(build, capsys):
    folder, pub = build
    (folder / "quant_param.json").unlink()
    msg = _refused(folder, pub, capsys)
    assert "quant_param.json" in msg and "missing" in msg


def test_removed_signature_is_refused(build, capsys):
    folder, pub = build
    (folder / SIGNATURE).unlink()
    msg = _refused(folder, pub, capsys)
    assert "not signed" in msg


def test_wrong_key_is_refused(build, tmp_path, capsys):
    folder, _ = build
    _, other = generate_key(tmp_path / "other")
    msg = _refused(folder, other, capsys)
    assert "key" in msg


def test_sign_cli_with_an_explicit_file_list(build, tmp_path, capsys):
    folder, _ = build
    priv, pub = generate_key(tmp_path / "mine")
    (folder / SIGNATURE).unlink()
    (folder / "notes.txt").write_text("not part of the build")
    files = ["model.om", "model_fp16.om", "quant_param.json", "report.json"]
    assert dopt_main(["sign", str(folder), "--key", str(priv), "--files", *files]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert not (folder / SIGNATURE).exists()
    (folder / "notes.txt").unlink()
    assert dopt_main(["sign", str(folder), "--key", str(priv), "--files", *files]) == 0
    assert dopt_main(["verify", str(folder), "--key", str(pub)]) == 0
