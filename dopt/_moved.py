"""Old module paths of the core, kept importable after the layered layout (0.2).

``import dopt.numerics`` and ``from dopt import params`` still work for scripts written
against earlier releases: a meta-path finder hands out the moved module itself (one module
object under both names, so monkeypatching either affects both). ``python -m dopt.dopt_so``
and ``python -m dopt.bin_data_preprocessing`` are real modules, as the reference names them.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "dopt.numerics": "dopt.quant.numerics",
    "dopt.lowbit": "dopt.quant.lowbit",
    "dopt.observers": "dopt.quant.observers",
    "dopt.histogram": "dopt.quant.histogram",
    "dopt.equalize": "dopt.quant.equalize",
    "dopt.bias_correction": "dopt.quant.bias_correction",
    "dopt.calibrate": "dopt.calib.loop",
    "dopt.calibset": "dopt.calib.sets",
    "dopt.so_config": "dopt.calib.prototxt",
    "dopt.config": "dopt.formats.strategy_config",
    "dopt.params": "dopt.formats.param_file",
    "dopt.onnx_qdq": "dopt.formats.qdq",
    "dopt.fileio": "dopt.formats.fileio",
    "dopt.export_checks": "dopt.formats.export_checks",
    "dopt.dopt_llm.params": "dopt.formats.llm_param_file",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self._spec   # the import system set the old name's spec on it


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        return None if new is None else importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())


def moved_attribute(name: str):
    """``dopt.<old module>`` as an attribute (``from dopt import params``)."""
    new = MOVED.get(f"dopt.{name}")
    if new is None:
        raise AttributeError(f"module 'dopt' has no attribute '{name}'")
    return importlib.import_module(new)
