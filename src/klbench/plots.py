"""Figures. They take arrays or files, never models."""

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return plt


def image_grid(images: np.ndarray, shape: tuple[int, int], n: int = 64) -> np.ndarray:
    """Up to n flattened images tiled in a square grid with 1-pixel white gutters."""
    n = min(n, len(images))
    side = int(np.ceil(np.sqrt(n)))
    height, width = shape[0] + 1, shape[1] + 1
    grid = np.full((side * height, side * width), np.nan)
    for i in range(n):
        r, c = divmod(i, side)
        grid[r * height : r * height + shape[0], c * width : c * width + shape[1]] = images[i].reshape(shape)
    return grid


def samples_figure(
    samples: np.ndarray, data: np.ndarray, shape: tuple[int, ...], title: str, path: Path
) -> None:
    """Model samples beside held-out data: a scatter for 2-D data, image grids for images,
    overlaid curves for 1-D signals."""
    plt = _pyplot()
    if len(shape) == 1 and shape[0] == 2:
        fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
        for ax, points, label in ((axes[0], data, "held-out data"), (axes[1], samples, "model samples")):
            ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.4, color="C0" if ax is axes[0] else "C1")
            ax.set_title(label)
            ax.set_aspect("equal")
    elif len(shape) == 2:
        fig, axes = plt.subplots(1, 2, figsize=(9, 4.8))
        for ax, images, label in ((axes[0], data, "held-out data"), (axes[1], samples, "model samples (decoder means)")):
            ax.imshow(image_grid(images, shape), cmap="gray_r", interpolation="nearest", vmin=0, vmax=data.max())
            ax.set_axis_off()
            ax.set_title(label)
    else:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
        for ax, rows, label in ((axes[0], data, "held-out data"), (axes[1], samples, "model samples")):
            ax.plot(rows[:16].T, lw=1, alpha=0.7)
            ax.set_title(label)
            ax.set_xlabel("dimension")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
