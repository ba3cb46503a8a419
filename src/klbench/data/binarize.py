"""Binarization of grey-level images: static (one fixed draw of Bernoulli pixels, reused forever)
or dynamic (a fresh draw for every training batch, Burda et al. 2016's protocol)."""

from __future__ import annotations

import numpy as np
import torch

# Seed of the single Bernoulli draw: fixed so every load returns the same bits.
BINARIZE_SEED = 0


def binarize(pixels: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    """x_bin = 1[u < x / 255] with u ~ U(0, 1), i.e. Bernoulli(x / 255) per pixel, as float32 0/1.

    pixels: uint8 (N, D) in 0..255. One uniform is drawn per pixel in C order, so the bits
    depend only on the images and the generator's seed.
    """
    return redraw_bernoulli(torch.from_numpy(pixels.astype(np.float32)) / 255.0, generator)


def redraw_bernoulli(intensity: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Dynamic binarization of a batch: x_bin = 1[u < intensity], u ~ U(0, 1), intensity in [0, 1]."""
    return (torch.rand(intensity.shape, generator=generator) < intensity).float()
