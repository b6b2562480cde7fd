"""Command lines of the deploy step: ``dopt deploy``, ``dopt sensitivity``, ``dopt sign``,
``dopt verify``. Exit codes: 0 passed / verified, 1 a gate failed, 2 bad input (one
paragraph on stderr, nothing written), 130 interrupted (the search state is kept)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import DoptError, run_cli


def _deploy_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dopt deploy", description="Convert, quantize, choose "
                                 "mixed precision, compile, evaluate, gate, sign and report "
                                 "in one run (docs/deploy.md).")
    ap.add_argument("-c", "--config", required=True, help="deploy.yaml")
    ap.add_argument("--output", help="output folder (default: output: in deploy.yaml)")
    ap.add_argument("--no-resume", action="store_true",
                    help="ignore the search state of an interrupted earlier run")
    return ap


def deploy_main(argv=None) -> int:
    a = _deploy_parser().parse_args(argv)

    def body():
        from .pipeline import run
        report = run(a.config, output=a.output, resume=not a.no_resume)
        return 0 if report["status"] == "passed" else 1
    return run_cli("dopt deploy", body, interrupted="interrupted; the mixed-precision search "
                   "state is kept in the output's work/ folder and the next run resumes it")


def _sens_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dopt sensitivity", description="Per-layer quantization "
                                 "sensitivity: a ranked table, JSON and a bar chart.")
    ap.add_argument("-c", "--config", required=True, help="deploy.yaml (model, calibration, "
                    "evaluation)")
    ap.add_argument("--output", required=True, help="folder for sensitivity.json/.md/.png")
    ap.add_argument("--full", action="store_true", help="also the metric with only each layer "
                    "INT8 and only each layer float (two full evaluations per layer)")
    return ap


def sensitivity_main(argv=None) -> int:
    a = _sens_parser().parse_args(argv)

    def body():
        from .sensitivity_run import run_sensitivity
        rows = run_sensitivity(a.config, a.output, full=a.full)
        print(f"{len(rows)} layers; most sensitive: " + ", ".join(r["layer"] for r in rows[:5]))
        return 0
    return run_cli("dopt sensitivity", body)


def _sign_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dopt sign", description="Sign a deployment folder "
                                 "(model-signing, ECDSA P-256 key, offline).")
    ap.add_argument("folder", nargs="?", help="the deployment folder")
    ap.add_argument("--key", help="private key (PEM)")
    ap.add_argument("--files", nargs="+", help="the explicit list of files the folder must "
                    "hold (default: every file in it)")
    ap.add_argument("--password-env", help="environment variable holding the key's password")
    ap.add_argument("--generate-key", metavar="PREFIX",
                    help="write a new key pair PREFIX.key / PREFIX.pub and exit")
    return ap


def sign_main(argv=None) -> int:
    a = _sign_parser().parse_args(argv)

    def body():
        from .signing import generate_key, sign_folder
        if a.generate_key:
            priv, pub = generate_key(a.generate_key)
            print(f"wrote {priv} (private, keep it secret) and {pub} (public)")
            return 0
        if not a.folder or not a.key:
            raise DoptError("give the folder and --key", field="--key",
                            expected="dopt sign --key private.pem FOLDER")
        if not Path(a.key).is_file():
            raise DoptError("the private key file does not exist", file=a.key, field="--key")
        pw = None
        if a.password_env:
            pw = os.environ.get(a.password_env)
            if pw is None:
                raise DoptError(f"the environment variable {a.password_env} is not set",
                                field="--password-env")
        sig = sign_folder(a.folder, a.key, files=a.files, password=pw)
        print(f"signed {a.folder}: {sig}")
        return 0
    return run_cli("dopt sign", body)


def verify_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dopt verify", description="Verify a signed deployment "
                                 "folder; exit 0 when every file matches its signed digest.")
    ap.add_argument("folder")
    ap.add_argument("--key", required=True, help="public key (PEM)")
    a = ap.parse_args(argv)

    def body():
        from .signing import verify_folder
        man = verify_folder(a.folder, a.key)
        prof = man.get("profile") or {}
        print(json.dumps({"folder": a.folder, "verified": True, "files": sorted(man["files"]),
                          "dopt_version": man.get("dopt_version"),
                          "profile": prof.get("name"), "profile_version": prof.get("version")}))
        return 0
    return run_cli("dopt verify", body)


if __name__ == "__main__":
    sys.exit(deploy_main())
