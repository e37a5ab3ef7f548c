"""64-bit DCT perceptual hash, numpy only.

The rule (fixed: hashes are stored in the shards and compared across runs):

1. the image is reduced to 32x32 luminance (done by the caller, see
   :func:`data_prep.images.hash_input`: Pillow ``L`` conversion, BOX filter);
2. a 2-D orthonormal DCT-II, computed as ``C @ X @ C.T`` with the 32x32 DCT matrix ``C``
   (two small matrix products: far cheaper than an FFT for one tiny block, and batched);
3. the 8x8 lowest-frequency coefficients (DC included) are compared with their median;
4. bit ``63 - k`` is set when coefficient ``k`` (row-major in the 8x8 block) is above the
   median, so the first coefficient is the most significant bit.

Two images with a small Hamming distance between their hashes look alike at low
frequencies: re-encodes, format conversions and mild resampling keep the distance at a
few bits.
"""
from __future__ import annotations

import numpy as np

HASH_SIZE = 32
"""Side of the luminance block the DCT runs on."""
LOW_FREQ = 8
"""Side of the low-frequency block kept: 8x8 = 64 bits."""


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``(C @ x)`` is the DCT of the column vector ``x``."""
    k = np.arange(n, dtype=np.float64)[:, None]
    i = np.arange(n, dtype=np.float64)[None, :]
    c = np.cos(np.pi * (2.0 * i + 1.0) * k / (2.0 * n)) * np.sqrt(2.0 / n)
    c[0, :] = np.sqrt(1.0 / n)
    return c


_DCT = _dct_matrix(HASH_SIZE)
# Only the 8 lowest frequencies are ever used: slicing C first makes each hash two
# (8x32)@(32x32)@(32x8) products instead of full 32x32x32 ones.
_DCT_LOW = np.ascontiguousarray(_DCT[:LOW_FREQ])
_WEIGHTS = (np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def phash_blocks(blocks: np.ndarray) -> np.ndarray:
    """Hashes of a batch of luminance blocks.

    blocks: (N, 32, 32) array of luminance values (any real dtype).
    Returns (N,) uint64.
    """
    x = np.asarray(blocks, dtype=np.float64)
    if x.ndim != 3 or x.shape[1:] != (HASH_SIZE, HASH_SIZE):
        raise ValueError(f"expected (N, {HASH_SIZE}, {HASH_SIZE}) blocks, got {x.shape}")
    low = _DCT_LOW @ x @ _DCT_LOW.T  # (N, 8, 8)
    flat = low.reshape(x.shape[0], LOW_FREQ * LOW_FREQ)
    med = np.median(flat, axis=1, keepdims=True)
    bits = (flat > med).astype(np.uint64)
    return (bits * _WEIGHTS).sum(axis=1, dtype=np.uint64)


def phash_block(block: np.ndarray) -> int:
    """Hash of one (32, 32) luminance block, as a Python int in [0, 2**64)."""
    return int(phash_blocks(np.asarray(block)[None])[0])


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two 64-bit hashes."""
    return (a ^ b).bit_count()
