"""The calibration loop every adapter shares: feed batches, observe tensors, keep going on ^C.

An adapter supplies ``run(feed) -> {tensor name: array}`` (its framework's forward pass
with the observed tensors exposed); this module owns the observers, the progress bar and
interruption. Observers stream (``dopt.quant.observers``), so memory does not depend on the
number of samples. A first Ctrl-C stops calibrating and keeps the statistics gathered so
far (the caller says so in its log); a second one aborts.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from .. import plugin_manager
from ..quant.bias_correction import ChannelMeanObserver
from ..errors import DoptError

# Chosen by measurement: see docs/benchmarks.md, "No-training quantization".
DEFAULT_ALGORITHM = "mse"


def resolve_algorithm(name: str | None, *, file: str | None = None,
                      field: str | None = "calibration_algorithm", layer: str | None = None,
                      default: str | None = DEFAULT_ALGORITHM) -> str:
    """The installed activation-range algorithm ``name``; the ONE check of such a name.

    ``None``, ``""`` and ``"auto"`` give ``default`` (the measured default; pass
    ``default=None`` where "auto" has no meaning, e.g. a QAT config that names its
    algorithm). Any other name must be a key of ``plugin_manager.range_algorithms()``
    (the core's and the plugins'); otherwise a ``DoptError`` in the file / field / layer
    given, listing the installed names, the closest one and plugins that failed to load.
    """
    if default is not None and (not name or name == "auto"):
        return default
    algs = plugin_manager.range_algorithms()
    if isinstance(name, str) and name in algs:
        return name
    close = difflib.get_close_matches(str(name), list(algs), n=1)
    raise DoptError(
        f"unknown activation range algorithm {name!r}"
        + (f" for layer '{layer}'" if layer else ""), file=file, field=field,
        expected=("auto or one of " if default is not None else "one of ")
        + ", ".join(sorted(algs)) + (f" (did you mean '{close[0]}'?)" if close else ""),
        hint="`dopt adapters` lists the installed algorithms; one a plugin provides needs "
             "that plugin installed" + plugin_manager.broken_note())


def range_observer(name: str | None, **where) -> Callable[[], object]:
    """The observer factory of algorithm ``name`` (checked by ``resolve_algorithm``, which
    gets ``where``: ``file``, ``field``, ``layer``, ``default``)."""
    return plugin_manager.range_algorithms()[resolve_algorithm(name, **where)]


@dataclass
class Statistics:
    ranges: dict[str, tuple[float, float]]
    channel_means: dict[str, np.ndarray]
    samples: int
    batches: int
    interrupted: bool = False
    empty: list[str] = field(default_factory=list)


def _batch_len(feed: dict) -> int:
    return int(next(iter(feed.values())).shape[0]) if feed else 0


def calibrate(run: Callable[[dict], dict], feeds: Iterable[dict], *, tensors: list[str],
              algorithm: str, channel_axes: dict[str, int] | None = None,
              total: int | None = None, desc: str = "calibrating", progress: bool = True,
              log: Callable[[str], None] = print) -> Statistics:
    """Run every feed, update one observer per tensor; return ranges and channel means."""
    from tqdm import tqdm

    factory = range_observer(algorithm, field=None)
    observers = {t: factory() for t in tensors}
    means = {t: ChannelMeanObserver(ax) for t, ax in (channel_axes or {}).items()}
    samples = batches = 0
    interrupted = False
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress, leave=False)
    it = iter(feeds)
    try:
        while True:
            try:
                feed = next(it)
            except StopIteration:
                break
            outs = run(feed)
            for t, obs in observers.items():
                obs.update(outs[t])
            for t, m in means.items():
                m.update(outs[t])
            n = _batch_len(feed)
            samples += n
            batches += 1
            bar.update(n)
    except KeyboardInterrupt:
        if samples == 0:
            raise
        interrupted = True
        log(f"interrupted: calibrating with the {samples} sample(s) seen so far "
            f"(press Ctrl-C again to abort)")
    finally:
        bar.close()
    if samples == 0:
        raise DoptError("the calibration set gave no sample",
                        hint="check input_file_path in the config and calibration_samples")
    empty = [t for t, o in observers.items() if o.empty]
    ranges = {t: o.range() for t, o in observers.items() if not o.empty}
    return Statistics(ranges, {t: m.mean() for t, m in means.items()}, samples, batches,
                      interrupted, empty)
