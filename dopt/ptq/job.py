"""What a no-training quantization run is asked to do.

``PtqOptions`` holds the algorithm's choices (the core ``run_ptq`` reads only these);
``PtqJob`` adds what ``dopt_so`` parsed from the reference's command line and
``config.prototxt`` - files, shapes and the calibration feeds - so no adapter re-reads the
command line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..calib.loop import DEFAULT_ALGORITHM

DEFAULT_EQUALIZATION = False   # measured: docs/benchmarks.md, "No-training quantization"
DEFAULT_BIAS_CORRECTION = True


@dataclass(kw_only=True)
class PtqOptions:
    """The PTQ algorithm's settings (``dopt.ptq.run_ptq``)."""

    algorithm: str = DEFAULT_ALGORITHM
    exclude: list[str] = field(default_factory=list)  # exclude_op: weight or layer names
    equalization: bool = DEFAULT_EQUALIZATION
    bias_correction: bool = DEFAULT_BIAS_CORRECTION
    npu_placement: bool = True              # leave float what the NPU runs in FP16 anyway
    num_samples: int | None = None          # what the feeds will give (progress bar)
    progress: bool = True
    config_file: str | None = None          # named in errors about exclude_op & co
    log: Callable[[str], None] = print


@dataclass(kw_only=True)
class PtqJob(PtqOptions):
    """One ``dopt_so`` request, as handed to the adapter that claims the model file."""

    framework: int
    model: str
    output: str
    compress_conf: str
    input_shapes: dict[str, tuple[int, ...]]
    feeds: Callable[[], Iterator[dict]]     # fresh iterator of {input name: float32 batch}
    weight: str | None = None
    input_format: str = "NCHW"
    out_nodes: str | None = None
    use_gpu: bool = False
    device_idx: int = 0
