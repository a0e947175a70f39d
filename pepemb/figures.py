"""What the explanation figures share: headless matplotlib, one resolution, saving into the list
of files written, and tick positions that keep long axes readable."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed, and none may exist
import matplotlib.pyplot as plt  # noqa: E402

DPI = 130


def tick_indices(count: int, max_labels: int) -> list[int]:
    """Every index when count <= max_labels, else every k-th one; the last index always."""
    step = math.ceil(count / max_labels)
    ticks = list(range(0, count, step))
    last = count - 1
    if ticks[-1] != last:
        ticks[-1:] = [last] if last - ticks[-1] < step / 2 else [ticks[-1], last]
    return ticks


def save(fig, path: Path, written: list[Path]) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
