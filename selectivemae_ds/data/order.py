"""The global sample order and per-sample augmentation draws, as pure functions.

Every random choice of the input pipeline is a function of (seed, epoch, index) and
nothing else: no generator state is carried from one sample, batch or process to
the next. That is what makes the guarantees of ``pipeline.py`` cheap:

* two runs with one seed see identical batches;
* resuming at ``samples_seen`` is "compute the position and start there";
* a resumed run with another world size continues the same global order, since the
  order is defined over global batches and a rank only picks its slice.

Randomness comes from :class:`numpy.random.SeedSequence`, whose output NumPy
guarantees to be stable across versions and platforms (unlike ``Generator``
methods, whose streams may change). ``SeedSequence([seed, epoch, index, tag])`` acts
as a counter-based generator: any sample's draws can be computed directly, in any
process, in any order.

Layout of an epoch of ``n`` records with global batch ``B``::

    permutation positions  [0 ........................................ n)
    global batch g         [g*B, (g+1)*B)        for g < n // B
    rank r of world W      [g*B + r*B/W, g*B + (r+1)*B/W)
    the last n % B positions of the epoch are dropped (never a partial batch)

With InfoBatch the same layout applies to the epoch's permutation with its pruned
records removed (:func:`kept_order`), so an epoch has ``kept // B`` global batches.
"""
from __future__ import annotations

import math

import numpy as np

from selectivemae_ds.errors import ConfigError

# Stream tags keep the permutation, crop and flip draws independent of each other
# even where (seed, epoch, index) coincide.
_TAG_PERMUTATION = 0x5EED_0001
_TAG_CROP = 0x5EED_0002
_TAG_FLIP = 0x5EED_0003
_TAG_PRUNE = 0x5EED_0004

# torchvision RandomResizedCrop tries 10 boxes before falling back to a centre crop.
CROP_ATTEMPTS = 10
_U53 = 2.0 ** -53


def _check_key(seed: int, epoch: int) -> None:
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")


def _uniforms(words: np.ndarray) -> np.ndarray:
    """uint64 words -> float64 uniforms in [0, 1) from their top 53 bits."""
    return (words >> np.uint64(11)).astype(np.float64) * _U53


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of records in ``epoch``: a permutation of ``range(n)``, int64 (n,).

    Built as the stable argsort of n 64-bit keys from ``SeedSequence([seed, epoch])``,
    so it depends on nothing but its arguments (no Generator algorithm involved).
    Cost: O(n log n); about a second for 13M records, once per epoch per process.
    """
    _check_key(seed, epoch)
    if n <= 0:
        raise ValueError(f"dataset size must be positive, got {n}")
    keys = np.random.SeedSequence([seed, epoch, _TAG_PERMUTATION]).generate_state(n, np.uint64)
    return np.argsort(keys, kind="stable").astype(np.int64, copy=False)


def steps_per_epoch(n: int, global_batch: int) -> int:
    """Global batches per epoch; the last partial global batch is dropped.

    The one check that the dataset holds a full global batch (the pipeline, the epoch
    conversion and the resume position all count through here).
    """
    if global_batch <= 0:
        raise ValueError(f"global batch must be positive, got {global_batch}")
    if n < global_batch:
        raise ConfigError(f"train.global_batch: the dataset (data.path) of {n} records is smaller than one "
                          f"global batch of {global_batch}; lower train.global_batch or pack more images")
    return n // global_batch


def prune_keys(seed: int, epoch: int, n: int) -> np.ndarray:
    """One uint64 key per record for ``epoch``'s InfoBatch draw: the kept well-learned records
    are those with the smallest keys (a uniform subset of exact size, see ``data/infobatch.py``)."""
    _check_key(seed, epoch)
    return np.random.SeedSequence([seed, epoch, _TAG_PRUNE]).generate_state(n, np.uint64)


def kept_order(permutation: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """An epoch's order with pruned records removed: the permutation's kept entries, in order.

    ``keep`` is a bool mask over record indices (n,). Batching then works on this order
    exactly as on the full permutation (global batch g = positions [g*B, (g+1)*B)).
    """
    if keep.shape != permutation.shape:
        raise ValueError(f"keep mask of shape {keep.shape} does not match a permutation of {permutation.shape}")
    return permutation[keep[permutation]]


def rank_slice(batch_index: int, global_batch: int, rank: int, world_size: int) -> tuple[int, int]:
    """Permutation positions [start, stop) that ``rank`` takes from global batch ``batch_index``.

    Ranks take contiguous, equal, disjoint slices; their union in rank order is the
    global batch, so the concatenation over ranks is independent of the world size.
    """
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
    per_rank = global_batch // world_size
    start = batch_index * global_batch + rank * per_rank
    return start, start + per_rank


def position(samples_seen: int, n: int, global_batch: int) -> tuple[int, int]:
    """``samples_seen`` (global samples of completed global batches) -> (epoch, batch in epoch).

    ``samples_seen`` counts only kept samples (the dropped tail of an epoch is not
    "seen"), so it must be a multiple of the global batch.
    """
    if samples_seen < 0 or samples_seen % global_batch:
        raise ValueError(f"samples_seen={samples_seen} is not a whole number of global batches of {global_batch}")
    done = samples_seen // global_batch
    spe = steps_per_epoch(n, global_batch)
    return done // spe, done % spe


def stream_position(k: int, *, first_batch: int, global_batch: int, rank: int, world_size: int,
                    batches_per_epoch: int) -> tuple[int, int]:
    """Sample ``k`` of a rank's endless stream -> (epoch, permutation position).

    A rank's stream starts at absolute global batch ``first_batch`` (counted over all
    epochs) and holds, per global batch, its ``global_batch // world_size`` samples.
    """
    per_rank = global_batch // world_size
    absolute = first_batch + k // per_rank
    epoch, g = divmod(absolute, batches_per_epoch)
    start, _ = rank_slice(g, global_batch, rank, world_size)
    return epoch, start + k % per_rank


def crop_params(seed: int, epoch: int, index: int, h: int, w: int,
                scale: tuple[float, float] = (0.2, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (y, x, crop_h, crop_w) for record ``index`` of size h x w in ``epoch``.

    The sampling rule is torchvision's ``RandomResizedCrop.get_params``: up to 10
    attempts of (area ~ U(scale) * h*w, log aspect ~ U(log ratio)), rounding with
    Python's ``round``, accepted when the box fits; otherwise a centre crop clamped
    to the ratio range. Only the random source differs: the uniforms are drawn from
    ``SeedSequence([seed, epoch, index])`` instead of torch's global generator.
    """
    _check_key(seed, epoch)
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    u = _uniforms(np.random.SeedSequence([seed, epoch, index, _TAG_CROP]).generate_state(2 * CROP_ATTEMPTS + 2,
                                                                                         np.uint64))
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for t in range(CROP_ATTEMPTS):
        target = area * (scale[0] + (scale[1] - scale[0]) * float(u[2 * t]))
        aspect = math.exp(log_lo + (log_hi - log_lo) * float(u[2 * t + 1]))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            y = int(float(u[-2]) * (h - ch + 1))
            x = int(float(u[-1]) * (w - cw + 1))
            return y, x, ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw = w
        ch = int(round(cw / min(ratio)))
    elif in_ratio > max(ratio):
        ch = h
        cw = int(round(ch * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def flip(seed: int, epoch: int, index: int, p: float = 0.5) -> bool:
    """Whether record ``index`` is flipped horizontally in ``epoch`` (probability ``p``)."""
    _check_key(seed, epoch)
    u = _uniforms(np.random.SeedSequence([seed, epoch, index, _TAG_FLIP]).generate_state(1, np.uint64))
    return bool(u[0] < p)
