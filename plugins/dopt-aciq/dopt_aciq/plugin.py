"""Hook implementations registered under the ``dopt`` entry-point group."""
import pluggy

from .observer import ALGORITHMS

hookimpl = pluggy.HookimplMarker("dopt")


@hookimpl
def dopt_range_algorithms():
    return dict(ALGORITHMS)
