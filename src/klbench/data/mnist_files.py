"""Full MNIST and Fashion-MNIST read from a folder of IDX files the user provides.

Both ship as the same four files (each optionally .gz): train-images-idx3-ubyte,
train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte. The official
train/test split is kept; `n_train`/`n_test` take the first n images of each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch

from klbench.data.binarize import BINARIZE_SEED, binarize, redraw_bernoulli
from klbench.data.dataset import Dataset, hash_tensors
from klbench.data.idx import find_idx, read_idx
from klbench.data.split import check_count, generators
from klbench.errors import DataError

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_part(name: str, directory: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8, N x H x W) and labels (uint8, N) of one split, checked against each other."""
    image_path, label_path = (find_idx(directory, file) for file in FILES[part])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(f"dataset '{name}': {image_path} should hold uint8 images (N, H, W), holds {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.shape != images.shape[:1]:
        raise DataError(f"dataset '{name}': {label_path} should hold {len(images)} uint8 labels, holds {labels.dtype} {labels.shape}")
    return images, labels


BINARIZATIONS = ("static", "dynamic")


def _load(name: str, path: str | Path | None, n_train: int | None, n_test: int | None, binarization: str) -> Dataset:
    if binarization not in BINARIZATIONS:
        raise DataError(f"dataset '{name}': option 'binarization' must be one of {', '.join(BINARIZATIONS)}, "
                        f"got {binarization!r}")
    if path is None:
        raise DataError(f"dataset '{name}' needs the folder of its IDX files: set datasets.{name}.options.path in the config")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise DataError(f"dataset '{name}': IDX folder {directory} does not exist (datasets.{name}.options.path)")
    parts = {part: _read_part(name, directory, part) for part in FILES}
    train_images, test_images = parts["train"][0], parts["test"][0]
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(f"dataset '{name}': train images are {train_images.shape[1:]} but test images {test_images.shape[1:]}")
    counts = {
        "train": len(train_images) if n_train is None else check_count(name, "n_train", n_train, len(train_images)),
        "test": len(test_images) if n_test is None else check_count(name, "n_test", n_test, len(test_images)),
    }
    x, y = {}, {}
    # Binarize each whole split with its own stream, then take the first n: an image's bits
    # do not depend on n_train or n_test.
    for (part, (images, labels)), generator in zip(parts.items(), generators(BINARIZE_SEED, 2)):
        x[part] = binarize(images.reshape(len(images), -1), generator)[: counts[part]]
        y[part] = torch.from_numpy(labels[: counts[part]].astype(np.int64))
    how = "static Bernoulli(x/255) binarization"
    if binarization == "dynamic":  # training batches are redrawn from the intensities; test stays static
        x["train"] = torch.from_numpy(parts["train"][0][: counts["train"]].reshape(counts["train"], -1)
                                      .astype(np.float32)) / 255.0
        how = "dynamic binarization of training batches (Bernoulli(x/255) per batch), static test"
    return Dataset(
        name=name, kind="binary", x_train=x["train"], x_test=x["test"], shape=tuple(train_images.shape[1:]),
        split={"n_train": counts["train"], "n_test": counts["test"], "seed": None,
               "how": f"official train/t10k files, first n of each (no shuffling); {how}",
               "binarization": binarization, "binarize_seed": BINARIZE_SEED},
        data_hash=hash_tensors(x["train"], x["test"], y["train"], y["test"]),
        y_train=y["train"], y_test=y["test"], redraw=redraw_bernoulli if binarization == "dynamic" else None,
    )


def mnist(path: str | None = None, n_train: int | None = None, n_test: int | None = None,
          binarization: Literal["static", "dynamic"] = "static") -> Dataset:
    """MNIST (60,000 train / 10,000 test, 28x28) from IDX files in `path`, binarized.

    static: x_bin = Bernoulli(x / 255), drawn once per pixel with fixed generators (one per
    split), so every call returns the same bits. dynamic: the training split keeps x / 255 and
    every training batch draws its bits afresh (Burda et al. 2016); test (and validation) bits
    are drawn once, as for static. kind "binary".
    """
    return _load("mnist", path, n_train, n_test, binarization)


def fashion_mnist(path: str | None = None, n_train: int | None = None, n_test: int | None = None,
                  binarization: Literal["static", "dynamic"] = "static") -> Dataset:
    """Fashion-MNIST (60,000 train / 10,000 test, 28x28) from IDX files in `path`; binarized like mnist."""
    return _load("fashion_mnist", path, n_train, n_test, binarization)
