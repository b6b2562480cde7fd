"""The dopt command line: ``dopt omg``, ``dopt run``, ``dopt adapters``, ... (``main.py``),
and the reference tool's own commands ``dopt_so`` and ``bin_data_preprocessing``."""
from .main import main

__all__ = ["main"]
