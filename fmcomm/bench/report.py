"""What long measurements show while they run and after: a progress line with the time
left (tqdm where installed), and line plots (matplotlib, optional: without it a plot is
skipped with a message saying how to get it)."""
from __future__ import annotations

import sys
import time
from typing import Optional, Sequence


class Progress:
    """Steps done out of ``total`` on stderr, with the time left; silent where ``show`` is false."""

    def __init__(self, total: int, show: bool, unit: str = "size"):
        self.bar = None
        self.show, self.total, self.done, self.t0 = show, total, 0, time.monotonic()
        if show:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)
            except ImportError:
                pass

    def step(self, what: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_description(what)
            self.bar.update(1)
        elif self.show:
            left = (time.monotonic() - self.t0) / self.done * (self.total - self.done)
            print(f"[{self.done}/{self.total}] {what}, about {left:.0f} s left", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def line_plot(series: dict[str, Sequence[tuple[float, float]]], path: str, title: str, ylabel: str,
              marked: Optional[Sequence[tuple[float, float]]] = None, marked_label: str = "",
              log_y: bool = False) -> bool:
    """One line per series (x: bytes, log scale) to a PNG; ``marked`` points drawn as rings.
    False, with a message on stderr, where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed (pip install matplotlib); no plot written",
              file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in sorted(series):
        points = sorted(series[name])
        if points:
            ax.plot([x for x, _ in points], [y for _, y in points], marker=".", label=name)
    if marked:
        ax.scatter([x for x, _ in marked], [y for _, y in marked], s=90, facecolors="none", edgecolors="black",
                   label=marked_label, zorder=5)
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("size (bytes)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
