"""The figures a person looks at (training curves, evaluation plots): one size, one style, PNGs
written atomically. matplotlib is imported on first use, with the Agg backend (no display)."""

from __future__ import annotations

import io
from pathlib import Path

from retro_ray.project import atomic_write_bytes


def figure():
    """(figure, axes) of one plot, 7 × 4.2 inches at 110 dpi."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110)
    return fig, fig.add_subplot(1, 1, 1)


def save_figure(fig, ax, path: Path, *, xlabel: str, ylabel: str, title: str) -> Path:
    """Label, grid and legend ``ax``; write ``fig`` to ``path`` as a PNG, atomically."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path
