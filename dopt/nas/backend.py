"""What a framework supplies to the architecture search (``NasBackend``), and how the core
finds it: the adapter's ``dopt_nas_backend`` hook (``docs/plugins.md``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from ..errors import DoptError

#: scen.yaml ``framework`` -> adapter name
ADAPTERS = {"pytorch": "torch", "tensorflow": "tensorflow"}


class NasBackend(Protocol):
    """One instance per process, built as ``cls(cfg, user_module, log=...)``.

    Architectures are ``dopt.nas.space.SearchSpace.decode`` tuples. Every user-code failure
    is a ``DoptError`` naming the class and method of ``user_module.py``.
    """

    framework: str
    device_note: str     # "running on GPU 0" / "no GPU on this machine: running on the CPU"
    rank: int            # process index under a launcher such as torchrun (else 0)
    world: int
    checkpoint_name: str  # the supernet checkpoint's file name in nas_state/

    def in_channels(self) -> int:
        """Channels of PreNet's output for the scenario's ``input_shape``."""

    def bind_space(self, space) -> None:
        """Build the weight-sharing supernet of ``space`` and check PostNet accepts it."""

    def check_data(self) -> None:
        """Read the user's training and validation data once: a bad dataset is an error
        before the search writes anything."""

    def train_supernet(self, ckpt: Path, *, scalar: Callable[[str, float, int], None] | None,
                       progress: bool) -> None:
        """Train the supernet for ``epochs``, resuming from and saving to ``ckpt``."""

    def supernet_done(self, ckpt: Path) -> bool:
        """Whether ``ckpt`` holds a supernet trained for all ``epochs``."""

    def load_supernet(self, ckpt: Path) -> None:
        """Load trained supernet weights (search workers)."""

    def measure(self, arch) -> dict:
        """``{"params": whole-network parameters, "macs": multiply-accumulates}``."""

    def export_onnx(self, arch, path: Path) -> None:
        """Write the candidate (PreNet + backbone + PostNet, batch 1) as ONNX."""

    def evaluate(self, arch) -> float:
        """The user's metric of the sub-net (inherited weights, BatchNorm recalibrated)."""

    def write_result(self, arch, py_path: Path, header: dict) -> list[Path]:
        """Write ``model_arch_result_N.py`` (runnable alone) and its weights beside it."""

    def barrier(self) -> None:
        """Wait for every process of a launcher run (no-op for one process)."""

    def close(self) -> None:
        """Release distributed resources."""


def backend_class(framework: str) -> Any:
    """The adapter's backend class for ``framework`` (``pytorch`` / ``tensorflow``)."""
    from .. import plugin_manager
    adapter = ADAPTERS[framework]
    try:
        return plugin_manager.call_adapter(adapter, "nas_backend")
    except DoptError as e:
        raise DoptError(f"architecture search with framework {framework} is not available: "
                        f"{e.what}", hint=e.hint) from None
