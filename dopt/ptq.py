"""One no-training quantization request, as ``dopt_so`` hands it to an adapter.

The CLI parses the reference's flags and ``config.prototxt`` and opens the calibration
set; the adapter that claims the model file (``dopt_claim_file``) does the framework
work. Everything an adapter needs travels in ``PtqJob`` so no adapter re-reads the
command line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

from .calibrate import DEFAULT_ALGORITHM

DEFAULT_EQUALIZATION = False   # measured: docs/benchmarks.md, "No-training quantization"
DEFAULT_BIAS_CORRECTION = True


@dataclass
class PtqJob:
    framework: int
    model: str
    output: str
    compress_conf: str
    input_shapes: dict[str, tuple[int, ...]]
    feeds: Callable[[], Iterator[dict]]     # fresh iterator of {input name: float32 batch}
    num_samples: int                        # what ``feeds`` will give (progress bar)
    algorithm: str = DEFAULT_ALGORITHM
    weight: str | None = None
    input_format: str = "NCHW"
    out_nodes: str | None = None
    exclude: list[str] = field(default_factory=list)
    equalization: bool = DEFAULT_EQUALIZATION
    bias_correction: bool = DEFAULT_BIAS_CORRECTION
    npu_placement: bool = True              # leave float what the NPU runs in FP16 anyway
    use_gpu: bool = False
    device_idx: int = 0
    config_file: str | None = None
    progress: bool = True
    log: Callable[[str], None] = print
