"""Static binarization of grey-level images: one fixed draw of Bernoulli pixels, reused forever."""

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
    probability = torch.from_numpy(pixels.astype(np.float32)) / 255.0
    return (torch.rand(probability.shape, generator=generator) < probability).float()
