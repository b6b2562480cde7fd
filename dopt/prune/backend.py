"""What a framework supplies to the pruning search (``PruneBackend``) and how the core finds
it: the adapter's ``dopt_prune_backend`` hook (``docs/plugins.md``).

The framework tracks which channels are coupled (a dependency graph: a residual add ties
the output channels of every convolution that feeds it) and ranks channels inside a group;
the core decides how many channels each group keeps, against the NPU cost model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

from ..errors import DoptError


@dataclass(frozen=True)
class Group:
    """Channels that must be removed together: ``channels`` is their current count,
    ``members`` the layers whose input or output dimension they are (for reports).

    ``kind="block"``: a whole residual block ``y = x + f(x)`` that can be removed (depth
    pruning); ``channels`` is 1 and a width of 0 removes it. Its importance is one value,
    the share of the block's output that ``f`` contributes on sample data."""

    name: str
    channels: int
    members: tuple[str, ...] = field(default=())
    kind: str = "channels"


#: ``{group name: channels kept}``; a group left out keeps all its channels.
Widths = Mapping[str, int]


class PruneBackend(Protocol):
    """One model being pruned. Every failure in user code is a ``DoptError``."""

    framework: str

    def groups(self) -> list[Group]:
        """The prunable channel groups of the model as it is now (its output layers and the
        layers the user excluded are not prunable), then, when the backend was asked for
        depth pruning, its removable residual blocks (``kind="block"``)."""

    def importance(self, name: str) -> Any:
        """Per-channel importance of group ``name`` (a 1-D array of ``channels`` floats
        >= 0): the library's criterion (magnitude, Taylor or BatchNorm scale)."""

    def measure(self, widths: Widths) -> dict:
        """``{"params", "macs"}`` of the model pruned to ``widths``."""

    def export_onnx(self, widths: Widths, path: Path) -> None:
        """Write the model pruned to ``widths`` (batch 1) as ONNX, for the cost model."""

    def evaluate(self, widths: Widths) -> float:
        """The user's metric (higher is better) of the model pruned to ``widths`` with its
        BatchNorm statistics recalibrated; a ``DoptError`` if no evaluation data was given."""

    def apply(self, widths: Widths) -> None:
        """Prune the model itself to ``widths`` (least important channels first) and
        recalibrate its BatchNorm statistics."""


def backend_class(adapter: str) -> Any:
    """The adapter's backend class (``torch``)."""
    from .. import plugin_manager
    try:
        return plugin_manager.call_adapter(adapter, "prune_backend")
    except DoptError as e:
        raise DoptError(f"structured pruning for this framework is not available: {e.what}",
                        hint=e.hint) from None
