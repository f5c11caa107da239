"""Plots for inspection: layers x heads score maps and the sink overview.

Figures are built on matplotlib's object API with the Agg canvas, so nothing here touches pyplot's
global backend (a notebook keeps its own). Every function returns the ``Figure``; a notebook
shows it, and ``path`` (when given) gets a PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from attnkit.files import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "artifact_map",
    "draw_head_map",
    "draw_token_map",
    "head_map",
    "needle_heatmap",
    "score_heatmap",
    "new_figure",
    "save_figure",
    "ticks",
]

#: Cells up to which a head map writes its ``annotate`` values into the cells.
MAX_ANNOTATED_CELLS = 600
#: Tokens up to which a token map labels every token on the x axis.
MAX_LABELLED_TOKENS = 64


def ticks(n: int, most: int = 40) -> np.ndarray:
    """Tick positions 0..n-1, thinned to at most about ``most``."""
    return np.arange(0, n, max(1, int(np.ceil(n / most))))


def draw_head_map(
    ax: Axes,
    scores: Any,
    title: str,
    *,
    cbar_label: str = "score",
    annotate: Any = None,
    norm: Normalize | None = None,
    cmap: str = "viridis",
    mark: float | None = None,
) -> Any:
    """Draw a layers x heads map of ``scores`` on ``ax`` with a colorbar; return the image.

    ``annotate``: an int array of the same shape written into the cells (zeros left blank), when
    the map has at most :data:`MAX_ANNOTATED_CELLS` cells. ``mark``: a value drawn as a line on
    the colorbar (a threshold).
    """
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [layers, heads], got shape {scores.shape}")
    layers, heads = scores.shape
    image = ax.imshow(scores, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(ticks(heads, 32))
    ax.set_yticks(ticks(layers))
    ax.tick_params(labelsize=7)
    cbar = ax.figure.colorbar(image, ax=ax, pad=0.03, aspect=40)
    cbar.set_label(cbar_label, fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    if mark is not None:
        cbar.ax.axhline(mark, color="red", linewidth=1.2)
    if annotate is not None and scores.size <= MAX_ANNOTATED_CELLS:
        annotate = np.asarray(annotate)
        low, high = image.norm.vmin, image.norm.vmax
        for (layer, head), value in np.ndenumerate(annotate):
            if value:
                bright = image.norm(scores[layer, head]) > 0.6 if high > low else False
                ax.text(
                    head, layer, str(value), ha="center", va="center", fontsize=6, color="black" if bright else "white"
                )
    return image


def draw_token_map(
    ax: Axes,
    values: Any,
    tokens: list[str],
    title: str,
    *,
    cbar_label: str = "score",
    norm: Normalize | None = None,
    cmap: str = "magma",
) -> Any:
    """Draw a layers x tokens map on ``ax``; tokens label the x axis when there are at most
    :data:`MAX_LABELLED_TOKENS`, positions otherwise."""
    values = np.asarray(values, dtype=float)
    layers, count = values.shape
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("layer")
    ax.set_yticks(ticks(layers))
    if count <= MAX_LABELLED_TOKENS:
        ax.set_xticks(np.arange(count))
        ax.set_xticklabels([f"{j} {tok!r}" for j, tok in enumerate(tokens)], rotation=90, fontsize=7)
        ax.set_xlabel("token (position, text)")
    else:
        ax.set_xticks(ticks(count))
        ax.set_xlabel("token position")
    ax.tick_params(labelsize=7)
    cbar = ax.figure.colorbar(image, ax=ax, pad=0.02, aspect=40)
    cbar.set_label(cbar_label, fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    return image


def save_figure(fig: Figure, path: str | Path | None) -> Figure:
    """Save ``fig`` to ``path`` (when given) atomically; returns it."""
    if path is not None:
        with atomic_path(path) as temporary:
            fig.savefig(temporary, dpi=130)
    return fig


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def head_map(
    scores: Any,
    path: str | Path | None = None,
    title: str = "",
    *,
    cbar_label: str = "score",
    annotate: Any = None,
    norm: Normalize | None = None,
    cmap: str = "viridis",
) -> Figure:
    """A layers x heads score map (one head score per cell) as a figure; a PNG at ``path``."""
    layers, heads = np.shape(scores)
    fig = new_figure(max(4.0, 0.32 * heads + 2.2), max(3.5, 0.22 * layers + 1.4))
    draw_head_map(fig.add_subplot(), scores, title, cbar_label=cbar_label, annotate=annotate, norm=norm, cmap=cmap)
    return save_figure(fig, path)


def needle_heatmap(
    rows: list[dict[str, Any]], path: str | Path | None = None, *, metric: str = "recall", title: str = ""
) -> Figure:
    """The needle-in-a-haystack plot: depth (rows, 0 at the top) x context length (columns), one
    cell per prompt coloured by ``metric`` (0 red to 1 green) with its value written in.

    ``rows`` are the task's rows (``length``, ``depth`` and ``metric`` each); cells that were not
    run (``limit``) stay blank.
    """
    lengths = sorted({int(r["length"]) for r in rows})
    depths = sorted({float(r["depth"]) for r in rows})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for r in rows:
        grid[depths.index(float(r["depth"])), lengths.index(int(r["length"]))] = float(r[metric])
    return score_heatmap(
        grid, [f"{d:.0%}" for d in depths], [str(n) for n in lengths], path,
        top=1.0, title=title, ylabel="needle depth", label=metric, value_format=".2f",
    )  # fmt: skip


def score_heatmap(
    grid: Any,
    rows: list[str],
    columns: list[str],
    path: str | Path | None = None,
    *,
    top: float = 100.0,
    title: str = "",
    xlabel: str = "context length (tokens)",
    ylabel: str = "",
    label: str = "score",
    value_format: str = ".3g",
) -> Figure:
    """A rows x columns table of scores in [0, ``top``] as a heatmap (0 red to ``top`` green), each
    cell's value written in (``value_format``); NaN cells (not run) stay blank. The ``ruler`` task's
    per-task and depth maps, and the needle maps."""
    grid = np.asarray(grid, dtype=float)
    fig = new_figure(max(4.0, 0.9 * len(columns) + 2.6), max(3.0, 0.4 * len(rows) + 1.6))
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="RdYlGn", norm=Normalize(0.0, top))
    ax.set_xticks(np.arange(len(columns)), columns)
    ax.set_yticks(np.arange(len(rows)), rows)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.tick_params(labelsize=8)
    ax.set_title(title, fontsize=10)
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            ax.text(j, i, format(value, value_format), ha="center", va="center", fontsize=7)
    cbar = fig.colorbar(image, ax=ax, pad=0.03)
    cbar.set_label(label, fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    return save_figure(fig, path)


def artifact_map(artifact: Any, path: str | Path | None = None, title: str | None = None) -> Figure:
    """A head-list artifact (:class:`attnkit.heads.HeadArtifact`) as a layers x heads map of its
    scores, with the selected heads outlined in red."""
    from matplotlib.patches import Rectangle

    scores = np.asarray(artifact.scores, dtype=float)
    layers, heads = scores.shape
    level = "KV heads" if artifact.level == "kv" else "query heads"
    count = sum(len(h) for h in artifact.selected.values())
    if title is None:
        title = f"{artifact.method} heads, {artifact.model_id}\n{count} of {scores.size} {level} selected (outlined)"
    fig = new_figure(max(4.0, 0.32 * heads + 2.4), max(3.5, 0.22 * layers + 1.6))
    ax = fig.add_subplot()
    finite = scores[np.isfinite(scores)]
    norm: Normalize | None = None
    label = "score"
    positive = finite[finite > 0]
    if finite.size and finite.min() >= 0 and positive.size and positive.max() > 1e3 * positive.min():
        # scores spanning decades (razor's cut-normalised map): log colours, zeros blank
        norm, label = (
            LogNorm(max(float(positive.min()), float(positive.max()) * 1e-4), float(positive.max())),
            "score (log scale)",
        )
        scores = np.where(scores > 0, scores, np.nan)
    elif finite.size and finite.max() > finite.min():
        norm = Normalize(float(finite.min()), float(finite.max()))
    draw_head_map(ax, scores, title, cbar_label=label, norm=norm)
    ax.set_xlabel("KV head" if artifact.level == "kv" else "head")
    for layer, chosen in artifact.selected.items():
        for head in chosen:
            ax.add_patch(Rectangle((head - 0.5, int(layer) - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.4))
    return save_figure(fig, path)
