"""Patch layout helpers shared by the encoder, the decoders, the methods and the pictures.

One gather for every "take these patches of each sample" in the package
(`gather_tokens`), and MAE's patchify/unpatchify layout.
"""
from __future__ import annotations

import torch
from torch import Tensor


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Rows `idx` of every sample. x: (B, N, C), idx: (B, K) int64 -> (B, K, C)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def patchify(imgs: Tensor, p: int) -> Tensor:
    """imgs: (B, C, H, W) -> (B, N, p*p*C), patches row-major, pixels (row, col, channel).

    The layout of MAE's `patchify`, so predictions are comparable with MAE's.
    """
    b, c, h, w = imgs.shape
    if h % p != 0 or w % p != 0:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    gh, gw = h // p, w // p
    x = imgs.reshape(b, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(x: Tensor, p: int, h: int, w: int) -> Tensor:
    """Inverse of `patchify`. x: (B, N, p*p*C); h, w: the grid in PATCHES (N = h*w).

    Returns (B, C, h*p, w*p).
    """
    b, n, d = x.shape
    if n != h * w:
        raise ValueError(f"unpatchify: {n} patches do not form a {h}x{w} grid (h and w count patches, not pixels)")
    c = d // (p * p)
    if c * p * p != d:
        raise ValueError(f"unpatchify: patch vector of {d} values is not p*p*C for p={p}")
    x = x.reshape(b, h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, c, h * p, w * p)
