"""``dopt.log.Logger``: the reference scripts' logger (``Logger.info(...)``), on ``logging``."""
from __future__ import annotations

import logging
import sys

_log = logging.getLogger("dopt")


def _ensure_handler() -> None:
    # scripts like the reference demo.py never configure logging; give them visible output
    if not _log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[dopt %(levelname)s] %(message)s"))
        _log.addHandler(handler)
        _log.setLevel(logging.INFO)
        _log.propagate = False


class Logger:
    @staticmethod
    def info(msg, *args):
        _ensure_handler()
        _log.info(msg, *args)

    @staticmethod
    def warning(msg, *args):
        _ensure_handler()
        _log.warning(msg, *args)

    warn = warning

    @staticmethod
    def error(msg, *args):
        _ensure_handler()
        _log.error(msg, *args)

    @staticmethod
    def debug(msg, *args):
        _ensure_handler()
        _log.debug(msg, *args)
