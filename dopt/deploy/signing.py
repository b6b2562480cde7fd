"""Signing a deployment folder: OpenSSF model-signing, key mode, ECDSA P-256, offline.

The signature (``dopt.sig``, a Sigstore bundle holding a DSSE envelope around an in-toto
statement) covers every file of the folder by SHA-256, so a flipped byte, an added file
or a removed one all fail verification; ``deploy_manifest.json``, itself signed, records
the explicit file list, the dopt version and the hardware profile the ``.om`` files were
compiled for. No cryptography is written here: hashing, the envelope and ECDSA are the
library's (``model-signing`` on ``cryptography``).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import DoptError

SIGNATURE = "dopt.sig"
MANIFEST = "deploy_manifest.json"
MAX_MANIFEST_BYTES = 1 << 20


def _lib():
    try:
        import model_signing
    except ImportError:
        raise DoptError("signing needs the Python package 'model-signing', which is not "
                        "installed", hint="pip install 'dopt[deploy]'") from None
    return model_signing


def _hashing(ms):
    # the signature itself is the one file not covered; git paths are not ignored
    return ms.hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False)


def generate_key(prefix) -> tuple[Path, Path]:
    """Write ``PREFIX.key`` (PKCS#8 PEM, mode 0600) and ``PREFIX.pub`` (ECDSA P-256)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from ..formats.fileio import atomic_paths
    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    with atomic_paths(priv, pub) as (tp, tq):
        tp.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        os.chmod(tp, 0o600)
        tq.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    os.chmod(priv, 0o600)
    return priv, pub


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _listing(folder: Path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            rel = os.path.relpath(os.path.join(root, f), folder)
            if rel != SIGNATURE:
                out.append(rel.replace(os.sep, "/"))
    return out


def _profile_of(folder: Path, files: list[str]) -> dict | None:
    from ..npu.omfile import read_om
    for f in files:
        if f.endswith(".om"):
            try:
                return read_om(folder / f).profile
            except DoptError:
                return None
    return None


def sign_folder(folder, key, *, files: list[str] | None = None, password: str | None = None,
                extra: dict | None = None) -> Path:
    """Write ``deploy_manifest.json`` and sign the folder; returns the signature path.

    ``files``: the explicit list that must make up the folder (besides the manifest and
    the signature); a folder holding anything else is refused, nothing written."""
    import dopt
    ms = _lib()
    folder = Path(folder)
    if not folder.is_dir():
        raise DoptError("the deployment folder does not exist", file=str(folder))
    present = [f for f in _listing(folder) if f != MANIFEST]
    if files is not None:
        want = sorted(set(files) - {MANIFEST})
        missing = sorted(set(want) - set(present))
        extra_files = sorted(set(present) - set(want))
        if missing:
            raise DoptError(f"file(s) to sign are missing: {', '.join(missing)}",
                            file=str(folder), field="--files")
        if extra_files:
            raise DoptError(f"the folder holds file(s) not in the list to sign: "
                            f"{', '.join(extra_files)}", file=str(folder), field="--files",
                            hint="move them out of the deployment folder: a signed folder "
                                 "holds exactly the signed files")
        present = want
    if not present:
        raise DoptError("the deployment folder holds no file to sign", file=str(folder))
    manifest = {"format": "dopt.deploy_manifest", "version": 1,
                "dopt_version": dopt.__version__, "profile": _profile_of(folder, present),
                "signing": {"library": "model-signing", "library_version":
                            getattr(ms, "__version__", "?"), "method": "key",
                            "algorithm": "ECDSA P-256 / SHA-256"},
                "files": {f: _sha256(folder / f) for f in present}}
    if extra:
        manifest.update(extra)
    from ..formats.fileio import write_json_atomic
    write_json_atomic(folder / MANIFEST, manifest)
    sig = folder / SIGNATURE
    try:
        ms.signing.Config().use_elliptic_key_signer(private_key=str(key), password=password) \
            .set_hashing_config(_hashing(ms)).sign(str(folder), str(sig))
    except DoptError:
        raise
    except Exception as e:  # noqa: BLE001 - a key the library cannot use is the user's file
        (folder / MANIFEST).unlink(missing_ok=True)
        raise DoptError(f"cannot sign with this key ({e.__class__.__name__}: {e})"[:400],
                        file=str(key), field="--key",
                        expected="an ECDSA P-256 private key in PEM (dopt sign "
                                 "--generate-key PREFIX makes one)") from None
    return sig


def _diagnose(folder: Path, sig: Path, err: Exception) -> str:
    """Which file does not match: the signed statement's digests against the folder.

    Read only after verification failed, to name the culprit; nothing read here is
    trusted (the refusal stands whatever it says)."""
    import base64
    try:
        bundle = json.loads(sig.read_text("utf-8"))
        stmt = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        signed = {r["name"]: r["digest"] for r in stmt["predicate"]["resources"]}
    except Exception:  # noqa: BLE001 - a damaged signature file says so
        return f"the signature file {SIGNATURE} is damaged or not a model-signing bundle"
    present = set(_listing(folder))
    parts = [f"file '{f}' does not match its signed digest (tampered)"
             for f in sorted(set(signed) & present) if _sha256(folder / f) != signed[f]]
    added = sorted(present - set(signed))
    missing = sorted(set(signed) - present)
    if added:
        parts.append(f"file(s) {', '.join(added)} were added after signing")
    if missing:
        parts.append(f"signed file(s) {', '.join(missing)} are missing")
    if not parts:
        msg = str(err)
        parts.append("the signature was not made with the private key of this public key"
                     if "key" in msg.lower() else f"the signature does not verify "
                     f"({msg[:200]})")
    return "; ".join(parts)


def verify_folder(folder, public_key) -> dict:
    """Verify a signed deployment folder; returns its manifest. Any mismatch is a
    ``DoptError`` naming the file."""
    ms = _lib()
    folder = Path(folder)
    if not folder.is_dir():
        raise DoptError("the deployment folder does not exist", file=str(folder))
    sig = folder / SIGNATURE
    if not sig.is_file():
        raise DoptError(f"the build is not signed: there is no {SIGNATURE} in the folder",
                        file=str(folder), hint="sign it with dopt sign --key KEY FOLDER, or "
                        "load it without verify_with")
    pub = Path(public_key)
    if not pub.is_file():
        raise DoptError("the public key file does not exist", file=str(public_key),
                        field="--key")
    try:
        ms.verifying.Config().use_elliptic_key_verifier(public_key=str(pub)) \
            .set_hashing_config(_hashing(ms)).verify(str(folder), str(sig))
    except Exception as e:  # noqa: BLE001 - every failure is a refusal, in one paragraph
        raise DoptError(f"signature verification failed: {_diagnose(folder, sig, e)}",
                        file=str(folder), field=SIGNATURE,
                        hint="rebuild or re-sign the folder; never run a build that fails "
                             "verification") from None
    man_path = folder / MANIFEST
    if not man_path.is_file() or man_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise DoptError(f"the signed folder has no readable {MANIFEST}", file=str(folder),
                        hint="sign it with dopt sign, which writes the manifest")
    try:
        man = json.loads(man_path.read_text("utf-8"))
        listed = set(man["files"])
    except (ValueError, KeyError, TypeError):
        raise DoptError(f"{MANIFEST} is not a dopt deployment manifest",
                        file=str(man_path)) from None
    present = set(_listing(folder)) - {MANIFEST}
    if listed != present:
        raise DoptError("the folder does not hold exactly the files of the manifest",
                        file=str(folder), found=", ".join(sorted(listed ^ present)))
    return man
