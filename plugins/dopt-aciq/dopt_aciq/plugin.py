"""Hook implementations registered under the ``dopt`` entry-point group.

Only ``dopt_range_algorithms``: the plugin adds algorithms, not an adapter, so it implements
no ``dopt_adapter_info`` and no operation (``docs/plugins.md``). dopt checks the names of
these implementations when it registers the plugin.
"""
from __future__ import annotations

from typing import Callable, Mapping

import pluggy

from .observer import ALGORITHMS

hookimpl = pluggy.HookimplMarker("dopt")


@hookimpl
def dopt_range_algorithms() -> Mapping[str, Callable[[], object]]:
    """``{name: factory}``: ``aciq`` (Laplace fit) and ``aciq_gauss`` (Gaussian fit)."""
    return dict(ALGORITHMS)
