"""``dopt deploy``: one command from a trained model to a signed, gated NPU build.

``run(config)`` takes a ``deploy.yaml`` path (or a loaded ``DeployConfig``) and returns
the report; ``report["status"]`` is ``"passed"`` or ``"failed"``. See docs/deploy.md.
"""
from __future__ import annotations

from .config import DeployConfig, load_config

__all__ = ["run", "load_config", "DeployConfig"]


def run(config, *, output=None, log=None, resume: bool = True) -> dict:
    """Convert, quantize, choose mixed precision, compile, evaluate, gate, sign, report."""
    from .pipeline import run as _run
    return _run(config, output=output, log=log, resume=resume)
