"""InfoBatch: prune well-learned samples each epoch and rescale the loss of the kept ones.

The public SelectiveMAE training script (``SelectiveMAE/infobatch.py`` of
github.com/Fengxiang23/SelectiveMAE, after Qin et al., "InfoBatch", ICLR 2024) keeps a
per-sample score, the last loss each record had, and at the start of every epoch:

* the records whose score is below the mean score are "well learned"; a uniform random
  ``1 - ratio`` of them is kept (``int((1 - ratio) * count)`` records), the others sit
  the epoch out;
* the kept well-learned records get loss weight ``1 / (1 - ratio)`` for the epoch, so
  the expected gradient stays the same; every other record has weight 1;
* in the last ``1 - delta`` of the epochs (12.5% with ``delta = 0.875``) nothing is
  pruned and every weight is 1.

Here the draw is a pure function of (seed, epoch, score table):
:func:`prune_plan` keys the records with ``order.prune_keys`` (``SeedSequence``), and
the epoch's order is the usual permutation with the pruned records removed
(``order.kept_order``), batched as before (last partial global batch dropped). So the
steps per epoch vary with the scores, and a resumed run recomputes the same plan from
the table it loads.

Deviations from the public code, each deliberate:

* Records never scored (all of them before the first epoch, the dropped tail of epoch 0)
  hold NaN, are left out of the mean and are never pruned; the public code fills the
  table with 3.0, a value that only works for losses well below 3.
* Pruning runs in epochs ``e < delta * epochs``: with 800 epochs, 0..699, so exactly the
  last 100 are unpruned. The public code tests ``e <= delta * epochs`` (701 epochs with
  pruning), which with fewer than 8 epochs never turns pruning off.
* Scores are keyed by the record the order asked for; a bad record's substitute (see
  docs/loader.md) lends it its loss.

The table lives on the training device. Per optimizer step, the per-sample losses of the
global batch are all-gathered (one collective on the device, no host sync) and written
at the batch's record indices, which every rank knows from the order without
communication. The host reads the table once per epoch (to plan the next one) and at
checkpoints.

Checkpoint. Each rank writes a fixed-size slice ``[r*n//W, (r+1)*n//W)`` of the two
tables it needs (the live scores and the snapshot the current epoch was planned from,
float32 each) as ``infobatch-rank{r}-of-{W}.npz`` in the checkpoint's ``rank_state/``;
:meth:`InfoBatch.load` merges all slices, whatever the saving and loading world sizes.
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from selectivemae_ds.data import order
from selectivemae_ds.data.config import check_infobatch
from selectivemae_ds.errors import CheckpointError, ConfigError

SHARD_RE = re.compile(r"^infobatch-rank(\d{5})-of-(\d{5})\.npz$")


def shard_name(rank: int, world_size: int) -> str:
    """File name of rank ``rank``'s slice of the score tables in a world of ``world_size``."""
    return f"infobatch-rank{rank:05d}-of-{world_size:05d}.npz"


def pruning_active(epoch: int, total_epochs: float, delta: float) -> bool:
    """Whether ``epoch`` prunes: the first ``delta`` of the run's epochs do, the rest do not."""
    return epoch < delta * total_epochs


@dataclass(frozen=True)
class EpochPlan:
    """What InfoBatch decided for one epoch."""

    epoch: int
    order: np.ndarray
    """Record indices of the epoch in delivery order, int64 (kept records only)."""
    weights: np.ndarray
    """Loss weight per record, float32 (n,): ``1 / (1 - ratio)`` for kept well-learned records, else 1."""
    pruned: int
    """Records that sit this epoch out."""

    def steps(self, global_batch: int) -> int:
        """Global batches of the epoch (the last partial one is dropped)."""
        return len(self.order) // global_batch


def prune_plan(seed: int, epoch: int, scores: np.ndarray, *, ratio: float,
               active: bool) -> tuple[np.ndarray, np.ndarray]:
    """(keep mask bool (n,), loss weights float32 (n,)) of ``epoch``: a pure function of its arguments.

    Well learned = scored (finite) and below the mean of the scored records. Of those,
    the ``int((1 - ratio) * count)`` with the smallest ``order.prune_keys`` are kept and
    weighted ``1 / (1 - ratio)``; the rest are pruned. ``active=False`` keeps all at weight 1.
    """
    n = len(scores)
    keep = np.ones(n, dtype=bool)
    weights = np.ones(n, dtype=np.float32)
    scored = np.isfinite(scores)
    if not active or not scored.any():
        return keep, weights
    mean = float(np.mean(scores[scored], dtype=np.float64))
    well = np.flatnonzero(scored & (scores < mean))
    n_keep = int((1.0 - ratio) * len(well))
    keys = order.prune_keys(seed, epoch, n)
    chosen = well[np.argsort(keys[well], kind="stable")[:n_keep]]
    keep[well] = False
    keep[chosen] = True
    weights[chosen] = np.float32(1.0 / (1.0 - ratio))
    return keep, weights


class InfoBatch:
    """The per-record score table of one rank and the epoch plans drawn from it.

    Every rank holds the whole table (updates are all-gathered), so every rank draws the
    same plan. ``total_epochs`` is the run's length in full (unpruned) epochs.
    """

    def __init__(self, *, n: int, seed: int, ratio: float, delta: float, total_epochs: float,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1) -> None:
        check_infobatch(ratio, delta)
        if n <= 0:
            raise ValueError(f"dataset size must be positive, got {n}")
        if not total_epochs > 0:
            raise ConfigError(f"train.epochs: InfoBatch needs the run's length in epochs > 0, got {total_epochs!r}")
        self.n = n
        self.seed = seed
        self.ratio = ratio
        self.delta = delta
        self.total_epochs = float(total_epochs)
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.live = torch.full((n,), math.nan, dtype=torch.float32, device=self.device)
        """The last loss of each record (NaN: never scored), on the training device."""
        self.snapshot = np.full(n, np.nan, dtype=np.float32)
        """The table as it was when epoch ``snapshot_epoch`` was planned (host)."""
        self.snapshot_epoch = -1

    def settings(self) -> dict[str, Any]:
        """What fixes the plans besides the scores (saved in the loader state and the shards)."""
        return {"ratio": self.ratio, "delta": self.delta, "total_epochs": self.total_epochs}

    def plan(self, epoch: int) -> EpochPlan:
        """The plan of ``epoch``, from the table as it stood when the epoch began.

        The first call for a new epoch copies the live table to the host (one device sync
        per epoch) and keeps that copy: a run resumed in the middle of the epoch loads it
        and draws the same plan.
        """
        if epoch < self.snapshot_epoch:
            raise ValueError(f"InfoBatch: epoch {epoch} was asked for after epoch {self.snapshot_epoch} was planned")
        if epoch > self.snapshot_epoch:
            self.snapshot = self.live.cpu().numpy().copy()
            self.snapshot_epoch = epoch
        keep, weights = prune_plan(self.seed, epoch, self.snapshot, ratio=self.ratio,
                                   active=pruning_active(epoch, self.total_epochs, self.delta))
        kept = order.kept_order(order.epoch_permutation(self.seed, epoch, self.n), keep)
        return EpochPlan(epoch=epoch, order=kept, weights=weights, pruned=self.n - len(kept))

    def weighted_loss(self, per_sample_loss: torch.Tensor, weights: np.ndarray) -> torch.Tensor:
        """Mean of ``per_sample_loss * weights`` (the micro-batch's records' weights, host float32)."""
        w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
        if per_sample_loss.device.type == "cuda":
            w = w.pin_memory()
        w = w.to(per_sample_loss.device, non_blocking=True)
        return (per_sample_loss * w).mean()

    def record(self, local_losses: torch.Tensor, global_indices: np.ndarray) -> None:
        """Write one global batch's losses into the table.

        ``local_losses``: this rank's per-sample losses of the batch, in delivery order
        (its slice of the global batch); ``global_indices``: the record indices of the
        whole global batch in order (ranks' slices concatenated). Non-finite losses leave
        the old score. No host sync: the gather and the scatter stay on the device.
        """
        values = local_losses.detach().float().reshape(-1)
        if self.world_size > 1:
            parts = [torch.empty_like(values) for _ in range(self.world_size)]
            dist.all_gather(parts, values)
            values = torch.cat(parts)
        if values.numel() != len(global_indices):
            raise ValueError(f"InfoBatch: {values.numel()} losses for a global batch of {len(global_indices)} records")
        idx = torch.from_numpy(np.ascontiguousarray(global_indices, dtype=np.int64))
        if self.device.type == "cuda":
            idx = idx.pin_memory()
        idx = idx.to(self.device, non_blocking=True)
        values = values.to(self.device)
        self.live[idx] = torch.where(torch.isfinite(values), values, self.live[idx])

    def shard(self) -> dict[str, bytes]:
        """This rank's checkpoint file: its slice of both tables, {file name: npz bytes}."""
        start = self.rank * self.n // self.world_size
        stop = (self.rank + 1) * self.n // self.world_size
        buf = io.BytesIO()
        np.savez(buf, start=np.int64(start), stop=np.int64(stop), n=np.int64(self.n), seed=np.int64(self.seed),
                 ratio=np.float64(self.ratio), delta=np.float64(self.delta),
                 total_epochs=np.float64(self.total_epochs), snapshot_epoch=np.int64(self.snapshot_epoch),
                 live=self.live[start:stop].cpu().numpy(), snapshot=self.snapshot[start:stop])
        return {shard_name(self.rank, self.world_size): buf.getvalue()}

    def load(self, folder: str | Path) -> None:
        """Merge the slices saved in ``folder`` (a checkpoint's rank-state folder; any saving world
        size) into this table."""
        folder = Path(folder)
        files = sorted(p for p in folder.glob("infobatch-rank*.npz") if SHARD_RE.match(p.name)) \
            if folder.is_dir() else []
        if not files:
            raise CheckpointError(f"{folder}: no InfoBatch score table (infobatch-rank*.npz); the checkpoint "
                                  "was written without data.infobatch")
        worlds = {int(SHARD_RE.match(p.name).group(2)) for p in files}  # type: ignore[union-attr]
        if len(worlds) != 1 or len(files) != next(iter(worlds)):
            raise CheckpointError(f"{folder}: expected one InfoBatch slice per saving rank, found "
                                  f"{[p.name for p in files]}")
        live = np.full(self.n, np.nan, dtype=np.float32)
        snapshot = np.full(self.n, np.nan, dtype=np.float32)
        covered = 0
        epochs = set()
        for path in files:
            with np.load(path, allow_pickle=False) as z:
                for key, mine in (("n", self.n), ("seed", self.seed), ("ratio", self.ratio), ("delta", self.delta),
                                  ("total_epochs", self.total_epochs)):
                    if z[key].item() != mine:
                        raise CheckpointError(f"{path}: InfoBatch {key} was {z[key].item()!r} in the checkpoint and "
                                              f"is {mine!r} now; the epoch plans would differ")
                start, stop = int(z["start"]), int(z["stop"])
                if z["live"].shape != (stop - start,) or z["snapshot"].shape != (stop - start,):
                    raise CheckpointError(f"{path}: slice [{start}, {stop}) holds {z['live'].shape} scores")
                live[start:stop] = z["live"]
                snapshot[start:stop] = z["snapshot"]
                covered += stop - start
                epochs.add(int(z["snapshot_epoch"]))
        if covered != self.n or len(epochs) != 1:
            raise CheckpointError(f"{folder}: the slices cover {covered} of {self.n} records "
                                  f"(snapshot epochs {sorted(epochs)})")
        self.live = torch.from_numpy(live).to(self.device)
        self.snapshot = snapshot
        self.snapshot_epoch = epochs.pop()
