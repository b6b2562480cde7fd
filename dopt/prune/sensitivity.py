"""Per-group pruning sensitivity: the metric with one group pruned alone to each aligned width.

Only the widths the search can choose are measured (multiples of the profile's channel
block), so the table is exactly the evidence the search weighs. Each point is the user's
metric after BatchNorm recalibration and before any fine-tuning: it ranks groups, it does
not predict the fine-tuned accuracy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..formats.fileio import atomic_path, write_json_atomic
from .backend import PruneBackend
from .search import DEFAULT_MAX_RATIO, group_widths


def sensitivity_table(backend: PruneBackend, block: int, *,
                      max_ratio: float = DEFAULT_MAX_RATIO,
                      log: Callable[[str], None] | None = None) -> dict:
    """``{"base_metric", "channel_block", "groups": {name: [{"width", "ratio", "metric",
    "drop"}]}}``, widths largest first (the unpruned point included)."""
    log = log or (lambda _m: None)
    base = float(backend.evaluate({}))
    out: dict = {"base_metric": base, "channel_block": block, "groups": {}}
    groups = backend.groups()
    for i, g in enumerate(groups, 1):
        rows = [{"width": g.channels, "ratio": 0.0, "metric": base, "drop": 0.0}]
        for w in group_widths(g, block, max_ratio)[1:]:
            m = float(backend.evaluate({g.name: w}))
            rows.append({"width": w, "ratio": round(1 - w / g.channels, 4), "metric": m,
                         "drop": base - m})
        out["groups"][g.name] = rows
        pts = ", ".join(f"{r['width']}: {r['metric']:.4g}" for r in rows[1:])
        log(f"sensitivity {i}/{len(groups)}: {g.name} ({g.channels} channels): "
            f"{pts or 'no smaller aligned width'}")
    return out


def render_text(table: dict) -> str:
    lines = [f"pruning sensitivity (metric with one group pruned alone; unpruned "
             f"{table['base_metric']:.4f}; widths in {table['channel_block']}-channel blocks)"]
    for name, rows in table["groups"].items():
        pts = ", ".join(f"{r['width']}ch {r['metric']:.4f}" for r in rows[1:]) or "-"
        lines.append(f"  {name} ({rows[0]['width']}ch): {pts}")
    return "\n".join(lines)


def write_sensitivity(table: dict, out_dir: Path) -> list[Path]:
    """``sensitivity.json`` and, when matplotlib is installed, ``sensitivity.png``."""
    out_dir = Path(out_dir)
    files = [out_dir / "sensitivity.json"]
    write_json_atomic(files[0], table)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return files
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in table["groups"].items():
        if len(rows) > 1:
            ax.plot([r["ratio"] * 100 for r in rows], [r["metric"] for r in rows], "o-",
                    label=f"{name} ({rows[0]['width']}ch)", markersize=3)
    ax.set_xlabel("channels removed from the group (%)")
    ax.set_ylabel("metric, this group pruned alone")
    ax.set_title(f"pruning sensitivity ({table['channel_block']}-channel blocks)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower left")
    files.append(out_dir / "sensitivity.png")
    with atomic_path(files[1]) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return files
