"""Reader for IDX files, the format MNIST and Fashion-MNIST ship in.

Layout: a 4-byte magic number 0x00 0x00 <dtype code> <ndim>, then ndim big-endian uint32
dimension sizes, then the values, big-endian, in C order. Files may be gzip-compressed.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from klbench.errors import DataError

# IDX dtype codes and the numpy types they hold (multi-byte types are big-endian).
IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def find_idx(directory: Path, name: str) -> Path:
    """The file `name` or `name`.gz in `directory` (the uncompressed one first), or a DataError."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"missing IDX file '{name}' (or '{name}.gz') in {directory}")


def read_idx(path: Path) -> np.ndarray:
    """The array stored in one IDX file (gzip-compressed when the name ends in .gz).

    Raises DataError, naming the file, for a bad magic number, an unknown dtype code, or a
    size that does not match the header (a truncated or padded file).
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        # gzip.BadGzipFile is an OSError; a cut-off gzip stream raises EOFError.
        raise DataError(f"cannot read IDX file {path}: {error}") from None
    if len(raw) < 4:
        raise DataError(f"truncated IDX file {path}: expected at least 4 header bytes, found {len(raw)}")
    zero0, zero1, code, ndim = raw[:4]
    if zero0 != 0 or zero1 != 0 or code not in IDX_DTYPES:
        raise DataError(f"bad magic number 0x{raw[:4].hex()} in {path}: not an IDX file")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"truncated IDX file {path}: expected at least {header} header bytes, found {len(raw)}")
    dims = tuple(int(size) for size in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "oversized"
        raise DataError(f"{problem} IDX file {path}: expected {expected} bytes for shape {dims}, found {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
