"""Per-run figures (samples, loss curves, predictive plots). They take arrays or files,
never models. Comparison figures across runs are in figures.py."""

from pathlib import Path

import numpy as np


def _pyplot():
    """pyplot on the Agg backend with seaborn's whitegrid look. Matplotlib's copy of that
    style, not seaborn itself: importing seaborn costs every training job ~1.5 s of CPU
    for one figure (figures.py, which draws many, uses seaborn proper)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.style.use("seaborn-v0_8-whitegrid")
    plt.rcParams.update({"font.size": 12, "axes.titlesize": 13, "axes.labelsize": 12})
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


# The drawn samples and the held-out data beside them, so that comparison figures redraw
# them on common axes (figures.sample_grids) rather than re-using each run's picture.
SAMPLES_FILE = "samples.npz"


def save_samples(path: Path, samples: np.ndarray, data: np.ndarray, shape: tuple[int, ...]) -> None:
    """samples (n, D) and held-out data (m, D) in data units, and the data shape."""
    np.savez_compressed(path, samples=samples.astype(np.float32), data=data.astype(np.float32),
                        shape=np.asarray(shape))


def load_samples(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    with np.load(path) as stored:
        return stored["samples"], stored["data"], tuple(int(n) for n in stored["shape"])


def is_scatter(shape: tuple[int, ...]) -> bool:
    return shape == (2,)


def draw_samples(ax, points: np.ndarray, shape: tuple[int, ...], colour, vmax: float) -> None:
    """One panel of points in data units: a scatter for 2-D data, an image grid for images
    (grey levels 0..vmax), overlaid curves of the first 16 rows for 1-D signals."""
    if is_scatter(shape):
        ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.4, color=colour)
        ax.set_aspect("equal")
    elif len(shape) == 2:
        ax.imshow(image_grid(points, shape), cmap="gray_r", interpolation="nearest", vmin=0, vmax=vmax)
        ax.set_axis_off()
    else:
        ax.plot(points[:16].T, lw=1, alpha=0.7)
        ax.set_xlabel("dimension")


def samples_figure(
    samples: np.ndarray, data: np.ndarray, shape: tuple[int, ...], title: str, path: Path
) -> None:
    """Model samples beside held-out data, on shared axes."""
    plt = _pyplot()
    size = (8, 4) if is_scatter(shape) else (9, 4.8) if len(shape) == 2 else (9, 3.5)
    fig, axes = plt.subplots(1, 2, figsize=size, sharex=len(shape) == 1, sharey=len(shape) == 1)
    label = "model samples (decoder means)" if len(shape) == 2 else "model samples"
    for ax, points, name, colour in ((axes[0], data, "held-out data", "C0"), (axes[1], samples, label, "C1")):
        draw_samples(ax, points, shape, colour, vmax=float(data.max()))
        ax.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _save(fig, plt, title: str, path: Path) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def predictive_band_figure(
    grid: np.ndarray, mean: np.ndarray, sd_weights: np.ndarray, sd_total: np.ndarray,
    train: tuple[np.ndarray, np.ndarray], ood: tuple[np.ndarray, np.ndarray] | None,
    train_range: tuple[float, float], title: str, path: Path,
) -> None:
    """1-D regression: predictive mean and +-2 sd bands (weight uncertainty alone, and with the
    observation noise) over a grid reaching beyond the training range, which is shaded."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.axvspan(*train_range, color="0.85", zorder=0, label="training range")
    ax.fill_between(grid, mean - 2 * sd_total, mean + 2 * sd_total, color="C0", alpha=0.18,
                    label="±2 sd, weights + noise")
    if sd_weights.max() > 0:  # a point estimate has no weight uncertainty: no empty legend entry
        ax.fill_between(grid, mean - 2 * sd_weights, mean + 2 * sd_weights, color="C0", alpha=0.4,
                        label="±2 sd, weights only")
    ax.plot(grid, mean, color="C0", lw=1.5, label="predictive mean")
    ax.scatter(*train, s=4, color="k", alpha=0.5, label="training data")
    if ood is not None:
        ax.scatter(*ood, s=6, color="C3", marker="x", alpha=0.7, label="held-out data outside the range")
    ax.set_xlim(grid.min(), grid.max())
    # the band can be huge far from the data: frame the data, let the band run off the edges
    targets = np.concatenate([train[1]] + ([ood[1]] if ood is not None else []))
    pad = 0.5 * np.ptp(targets)
    ax.set_ylim(targets.min() - pad, targets.max() + pad)
    ax.set_xlabel("x (input, unitless)")
    ax.set_ylabel("y (target, unitless)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=8, markerscale=2)
    _save(fig, plt, title, path)


def reliability_figure(
    edges: np.ndarray, count: np.ndarray, accuracy: np.ndarray, confidence: np.ndarray, ece: float,
    title: str, path: Path,
) -> None:
    """Reliability diagram: accuracy per equal-width confidence bin against the diagonal (a
    calibrated classifier's bars end on it), and below it how many test examples each bin holds."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    widths = np.diff(edges)
    filled = count > 0
    top.bar(edges[:-1][filled], accuracy[filled], width=widths[filled], align="edge", color="C0",
            edgecolor="white", label="accuracy in bin")
    top.scatter((edges[:-1] + widths / 2)[filled], confidence[filled], color="C3", s=14, zorder=3,
                label="mean confidence in bin")
    top.plot([0, 1], [0, 1], color="0.3", ls="--", lw=1, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy (fraction correct)")
    top.legend(loc="upper left", fontsize=8)
    top.text(0.97, 0.05, f"ECE = {ece:.4f}\n({len(count)} bins)", ha="right", va="bottom", transform=top.transAxes,
             bbox={"facecolor": "white", "edgecolor": "0.7", "alpha": 0.9})
    bottom.bar(edges[:-1], count, width=widths, align="edge", color="0.5", edgecolor="white")
    bottom.set_yscale("symlog", linthresh=1)
    bottom.set_xlabel("confidence (largest predictive probability)")
    bottom.set_ylabel("test examples")
    _save(fig, plt, title, path)


def predicted_vs_true_figure(
    y_true: np.ndarray, mean: np.ndarray, sd: np.ndarray, unit: str, title: str, path: Path
) -> None:
    """Regression on held-out data: predictive mean +-2 predictive sd against the true target."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.errorbar(y_true, mean, yerr=2 * sd, fmt="o", ms=3, color="C0", ecolor="C0", elinewidth=0.8, alpha=0.7,
                label="predictive mean ±2 sd")
    low, high = min(y_true.min(), (mean - 2 * sd).min()), max(y_true.max(), (mean + 2 * sd).max())
    ax.plot([low, high], [low, high], color="0.3", ls="--", lw=1, label="prediction = truth")
    ax.set_xlabel(f"true target ({unit})")
    ax.set_ylabel(f"predicted target ({unit})")
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, plt, title, path)


def loss_curve_figure(
    grid: np.ndarray, loss: np.ndarray, grid_label: str, loss_label: str, summary: str, title: str, path: Path
) -> None:
    """A loss on a fixed grid (e.g. per timestep or per unit log-SNR of a noising process); the
    y axis is logarithmic when the loss spans more than two decades."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(grid, loss, marker="o", ms=3, lw=1.5, color="C0")
    if (loss > 0).all() and loss.max() > 100 * loss.min():
        ax.set_yscale("log")
    ax.set_xlabel(grid_label)
    ax.set_ylabel(loss_label)
    ax.set_title(summary, fontsize=9)
    _save(fig, plt, title, path)
