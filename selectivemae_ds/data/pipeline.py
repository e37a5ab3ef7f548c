"""The DALI input pipeline: shard records -> augmented, normalized torch batches.

Graph (one per rank)::

    _SampleSource (parallel external_source, per sample, in worker processes)
        record bytes (uint8 [nbytes]), crop anchor (int32 [2], y x), crop shape
        (int32 [2], h w), mirror (int32 []), meta (int64 [4])
    -> fn.decoders.image_slice   device "mixed" (nvJPEG) or "cpu"; decodes only the crop
    mixed (GPU):
    -> fn.resize                 bicubic, antialiased, to img_size x img_size
    -> fn.crop_mirror_normalize  flip, ImageNet mean/std, HWC -> CHW, float32
    -> torch (DLPack, no copy)   (micro_batch, 3, img_size, img_size) on the training device
    cpu:
    -> torch (DLPack, no copy)   the uint8 HWC crops, one per sample, and the mirror flags
    -> _finish_on_host           bicubic antialiased resize (torch's uint8 kernel), flip,
                                 HWC -> CHW, ImageNet mean/std; on the training device
                                 when that is a GPU (a uint8 copy, 4x smaller than float)

On the CPU the resize is torch's, not DALI's: DALI's CPU resampler costs ~1.5 ms per
224 px image, torch's vectorized uint8 antialiased bicubic (the kernel behind
torchvision's resize, PIL-compatible) ~0.3 ms, and the decoded crops have to be
resized somewhere. It runs in the thread that calls ``next()``, after DALI's threads
decoded the batch ahead of time (see docs/loader.md, "Device and transfer").

Order. The per-sample source, not DALI, defines what is read: DALI's sample counter
``idx_in_epoch`` is used only as the index ``k`` into this rank's endless stream, and
:func:`order.stream_position` maps ``k`` to (epoch, permutation position) from the
first global batch the pipeline was built at. The source never raises StopIteration,
so DALI never ends an "epoch" of its own; our epochs follow each other inside one DALI
epoch. Resuming is rebuilding the pipeline with another first batch. With InfoBatch
(``data.infobatch``, see ``infobatch.py``) the source serves one epoch in its pruned order
instead, and the pipeline is rebuilt at each epoch boundary from the next epoch's plan.

Bad records. A record whose crc32 fails, that is not a JPEG, or whose JPEG header
disagrees with the stored size is replaced by the next sound record in the epoch's
permutation (positions p+1, p+2, ...; after ``MAX_SUBSTITUTE_TRIES`` failures, a
mean-gray image that normalizes to ~0). The substitute keeps the crop/flip draw of
the original slot, so the stream stays a pure function of (seed, epoch, position).
Every substitution is flagged in the sample's meta, counted by the main process and
logged: it never stops training and is never silent. A record that cannot be read at all
(a shard refused by its checks, an object store still unreachable after its retries) is not
substituted: the worker's DataError reaches the trainer and stops the run.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import logging
import os
import re
import signal
import struct
import sys
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from selectivemae_ds.data import order
from selectivemae_ds.data.config import DataConfig
from selectivemae_ds.data.infobatch import EpochPlan, InfoBatch
from selectivemae_ds.data.shards import RecordCorruptError, ShardedDataset
from selectivemae_ds.data.store import RemoteOptions
from selectivemae_ds.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# ImageNet statistics, in 0-255 units because DALI normalizes uint8 pixels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MAX_SUBSTITUTE_TRIES = 32
# How many substituted records the main process remembers by name (the count is exact).
SUBSTITUTED_LIST_LEN = 32
_META_K, _META_INDEX, _META_USED, _META_FLAG = range(4)
_GRAY = -1  # meta "used record" value of the gray fallback image
_GRAY_SIDE = 64
# prctl option (linux/prctl.h): the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1

# JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic);
# C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not frames.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0-7.
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, or None when ``data`` is not a sound JPEG.

    A cheap structural check run on every record before it reaches the decoder: SOI
    at the start, an EOI marker within the last 64 bytes (a truncated file has none)
    and a parsable segment chain up to the frame header. It does not decode pixels.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    if data.find(b"\xff\xd9", max(0, n - 64)) < 0:
        return None
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in (0xD8, 0xD9, 0xDA):  # SOI again, EOI or scan data before any frame header
            return None
        (length,) = struct.unpack_from(">H", data, i + 2)
        if length < 2:
            return None
        if marker in _SOF_MARKERS:
            if i + 9 > n:
                return None
            h, w = struct.unpack_from(">HH", data, i + 5)
            return (h, w) if h > 0 and w > 0 else None
        i += 2 + length
    return None


def _gray_jpeg() -> bytes:
    """A small JPEG filled with the ImageNet mean color (normalizes to ~0)."""
    from PIL import Image

    color = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)
    buf = io.BytesIO()
    Image.new("RGB", (_GRAY_SIDE, _GRAY_SIDE), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _die_with_parent(parent_pid: int) -> None:
    """In a DALI worker process: have the kernel SIGKILL it when the rank that spawned it dies.

    A rank killed with SIGKILL (OOM killer, a lost node, a scheduler) cannot stop its
    workers; left alone they run on and hold the rank's stdout/stderr, which keeps a
    remote launcher's ssh session (pdsh) and so the whole job from ever returning.
    Linux only (prctl); elsewhere the workers end when DALI's pipe to them closes.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed in a DALI worker")
    if os.getppid() != parent_pid:  # the rank died before the signal was armed
        os._exit(1)
    # SIGTERM/SIGINT are the rank's to handle: it finishes its step (which may need these
    # workers' samples), checkpoints and exits, and the workers die with it. DeepSpeed's
    # launcher sends TERM to the whole process tree, and Ctrl-C reaches the whole group.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _SampleSource:
    """Per-sample callback of DALI's parallel external_source (runs in worker processes).

    Module-level and holding only plain values plus a :class:`ShardedDataset` (which
    pickles without open handles), so it survives ``py_start_method="spawn"``.
    """

    def __init__(self, root: str, *, seed: int, first_batch: int, global_batch: int, rank: int,
                 world_size: int, batches_per_epoch: int, scale: tuple[float, float],
                 ratio: tuple[float, float], hflip: float, epoch: int = 0, kept: np.ndarray | None = None,
                 remote: RemoteOptions | None = None):
        # An object store root opens its client lazily in each worker process (store.py).
        self.dataset = ShardedDataset(root, remote=remote)
        self.n = len(self.dataset)
        self.seed = seed
        self.first_batch = first_batch
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = batches_per_epoch
        self.scale = scale
        self.ratio = ratio
        self.hflip = hflip
        self._perms: dict[int, np.ndarray] = {}
        self._gray: bytes | None = None
        # InfoBatch: the source serves one epoch, ``epoch``, in the order ``kept`` (record
        # indices, pruned ones removed) from its global batch ``first_batch``; the pipeline is
        # rebuilt for the next epoch. Stream samples past the epoch's end (DALI's prefetch)
        # wrap around inside it and are never delivered.
        self.epoch = epoch
        self.kept = kept if kept is None or len(kept) >= 2**31 else kept.astype(np.int32)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_perms"] = {}
        state["_parent_pid"] = os.getpid()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        parent = state.pop("_parent_pid")
        self.__dict__.update(state)
        if os.getpid() != parent:
            _die_with_parent(parent)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self.kept is not None:
            return self.kept
        perm = self._perms.get(epoch)
        if perm is None:
            # Two epochs at most: around a boundary a worker serves samples of both.
            if len(self._perms) >= 2:
                del self._perms[min(self._perms)]
            perm = order.epoch_permutation(self.seed, epoch, self.n)
            if self.n < 2**31:
                perm = perm.astype(np.int32)  # halves the per-worker cache (52 MB at 13M records)
            self._perms[epoch] = perm
        return perm

    def _sound(self, index: int) -> tuple[bytes, int, int] | None:
        """(bytes, h, w) of record ``index`` when it passes crc and the JPEG header check."""
        try:
            data = self.dataset.read(index)
        except RecordCorruptError:
            return None
        h, w = self.dataset.shape(index)
        return (data, h, w) if jpeg_size(data) == (h, w) else None

    def record(self, epoch: int, pos: int) -> tuple[bytes, int, int, int, int]:
        """(bytes, h, w, record used, intended record) for permutation position ``pos``."""
        perm = self._permutation(epoch)
        index = int(perm[pos])
        for t in range(min(MAX_SUBSTITUTE_TRIES, len(perm))):
            used = int(perm[(pos + t) % len(perm)])
            got = self._sound(used)
            if got is not None:
                return got[0], got[1], got[2], used, index
        if self._gray is None:
            self._gray = _gray_jpeg()
        return self._gray, _GRAY_SIDE, _GRAY_SIDE, _GRAY, index

    def __call__(self, info: Any) -> tuple[np.ndarray, ...]:
        """DALI SampleInfo -> (bytes, anchor, shape, mirror, meta) of one sample."""
        k = int(info.idx_in_epoch)
        epoch, pos = order.stream_position(
            k, first_batch=self.first_batch, global_batch=self.global_batch, rank=self.rank,
            world_size=self.world_size, batches_per_epoch=self.batches_per_epoch)
        if self.kept is not None:
            epoch = self.epoch
        data, h, w, used, index = self.record(epoch, pos)
        # Draws are keyed by the intended record, so a substitute does not shift anyone's.
        y, x, ch, cw = order.crop_params(self.seed, epoch, index, h, w, self.scale, self.ratio)
        mirror = order.flip(self.seed, epoch, index, self.hflip)
        return (
            np.frombuffer(data, dtype=np.uint8),
            np.array([y, x], dtype=np.int32),
            np.array([ch, cw], dtype=np.int32),
            np.array(int(mirror), dtype=np.int32),
            np.array([k, index, used, int(used != index)], dtype=np.int64),
        )


_WORKER_ERROR = re.compile(r"^(selectivemae_ds\.data\.[\w.]+)\.(\w+): (.+)$", re.MULTILINE)


def _worker_data_error(e: Exception) -> DataError | None:
    """The :class:`DataError` a DALI worker raised (a shard refused, an object store that stayed
    unreachable through its retries), rebuilt with its type and message from the traceback text
    DALI passes on; None for any other exception (it propagates as it is)."""
    found = _WORKER_ERROR.findall(str(e))
    if not found:
        return None
    module, name, message = found[-1]
    cls = getattr(sys.modules.get(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, DataError)):
        return None
    err = DataError.__new__(cls)
    DataError.__init__(err, f"{message} (in a loader worker process)")
    return err


@contextlib.contextmanager
def _single_torch_thread() -> Iterator[None]:
    """Run torch's CPU kernels on the calling thread alone, restoring the caller's setting after.

    The host path's kernels are per image (~0.3 ms): an OpenMP team forks, joins and
    spin-waits per call, and its spinning threads take the cores from DALI's decode
    threads. Measured on 2 cores (smae-bench loader, B=32, 224 px): 6.6-8.9 ms of CPU
    per image for the whole loader with torch's 2 threads, 1.5-1.6 with one. Setting
    and restoring the count costs well under a microsecond.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def resolve_decode_device(cfg_device: str, device: torch.device) -> str:
    """DataConfig.device + training device -> DALI decoder device ("mixed" or "cpu")."""
    if cfg_device == "gpu":
        if device.type != "cuda":
            raise ValueError(f"data.device: gpu decoding needs a CUDA training device, got {device}")
        return "mixed"
    if cfg_device == "auto":
        return "mixed" if device.type == "cuda" and torch.cuda.is_available() else "cpu"
    return "cpu"


class InputPipeline:
    """Endless stream of this rank's micro-batches in the global order.

    Yields ``(micro_batch, 3, img_size, img_size)`` tensors on ``device``. Global batch
    g's slice for this rank (``global_batch // world_size`` samples) comes as
    ``accum = global_batch // (world_size * micro_batch)`` consecutive micro-batches;
    global batches follow in order, epochs follow each other.

    ``state_dict()`` / ``load_state_dict()`` work at global-batch boundaries; after a
    load the next micro-batch is the first of global batch ``samples_seen //
    global_batch``, for any world size with the same global batch.
    """

    def __init__(self, cfg: DataConfig, *, seed: int, global_batch: int, micro_batch: int, rank: int,
                 world_size: int, device: str | torch.device = "cpu"):
        self._pipe: Any = None  # set first: close() (and __del__) must work if validation fails
        cfg.validate()
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if micro_batch <= 0 or global_batch <= 0 or global_batch % (world_size * micro_batch):
            raise ValueError(f"global batch {global_batch} is not divisible by world_size * micro_batch = "
                             f"{world_size} * {micro_batch}")
        self.cfg = cfg
        self.seed = seed
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size
        self.accum = global_batch // (world_size * micro_batch)
        self.device = torch.device(device)
        self.decode_device = resolve_decode_device(cfg.device, self.device)
        self.out_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        # (1, 3, 1, 1) per-channel scale (for 0-255 pixels) and bias of the CPU-decode path's
        # normalization; moved to the training device on first use (never touched under mixed).
        self._scale = torch.tensor([1 / (255 * s) for s in IMAGENET_STD]).view(1, 3, 1, 1)
        self._bias = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
        self._dataset = ShardedDataset(cfg.path, remote=cfg.remote_options())
        self._n = len(self._dataset)
        self._steps_per_epoch = order.steps_per_epoch(self._n, global_batch)
        self._batches_done = 0  # absolute global batches completed (all epochs)
        self._epoch = 0  # epoch of the next global batch
        self._batch = 0  # global batches of that epoch already completed
        self.infobatch: InfoBatch | None = None
        self._plan: EpochPlan | None = None  # InfoBatch's plan of self._epoch, once drawn
        self._built_epoch = -1  # epoch the running DALI pipeline serves (InfoBatch builds one per epoch)
        self.last_weights: np.ndarray | None = None
        """InfoBatch loss weights of the last micro-batch's records, float32 (micro_batch,); None without it."""
        self.last_global_indices = np.empty(0, dtype=np.int64)
        """InfoBatch: record indices of the last completed global batch, all ranks in rank order, (global_batch,)."""
        self._micro = 0  # micro-batches of the current global batch already yielded
        self._k = 0  # next stream sample index expected from the running DALI pipeline
        self.substituted = 0
        self.substituted_records: list[tuple[int, str]] = []
        self.last_indices = np.empty(0, dtype=np.int64)
        """Record indices (by the order, before substitution) of the last micro-batch, (micro_batch,)."""

    @property
    def steps_per_epoch(self) -> int:
        """Global batches of a full (unpruned) epoch (the last partial one is dropped)."""
        return self._steps_per_epoch

    @property
    def steps_in_epoch(self) -> int:
        """Global batches of the current epoch: fewer than ``steps_per_epoch`` when InfoBatch pruned it."""
        if self.infobatch is None:
            return self._steps_per_epoch
        return self._current_plan().steps(self.global_batch)

    @property
    def epoch_progress(self) -> float:
        """Epochs done, fractional inside the current epoch (by its own number of steps)."""
        return self._epoch + (self._batch / self.steps_in_epoch if self._batch else 0.0)

    @property
    def schedule_position(self) -> float:
        """Progress in steps of full epochs: ``epoch_progress * steps_per_epoch``.

        Without InfoBatch this is the number of completed global batches; with it, the
        learning-rate and PSTS schedules run on this (the public code's per-epoch-fraction
        schedule), so a run of E epochs follows the same curve however many steps pruning saves.
        """
        if not self._batch:
            return float(self._epoch * self._steps_per_epoch)
        return self._epoch * self._steps_per_epoch + self._batch * self._steps_per_epoch / self.steps_in_epoch

    def attach_infobatch(self, infobatch: InfoBatch) -> None:
        """Prune each epoch by ``infobatch``'s plans (before the first batch or ``load_state_dict``)."""
        if self._pipe is not None or self._micro:
            raise ValueError("attach_infobatch() after iteration started; attach it before the first batch")
        if infobatch.n != self._n or infobatch.seed != self.seed:
            raise ValueError(f"InfoBatch table of {infobatch.n} records (seed {infobatch.seed}) for a dataset of "
                             f"{self._n} (seed {self.seed})")
        self.infobatch = infobatch
        self._plan = None

    def _current_plan(self) -> EpochPlan:
        """InfoBatch's plan of the current epoch, drawn on first use; DataError when it leaves no full batch."""
        assert self.infobatch is not None
        if self._plan is None or self._plan.epoch != self._epoch:
            plan = self.infobatch.plan(self._epoch)
            if plan.steps(self.global_batch) < 1:
                raise DataError(f"InfoBatch kept {len(plan.order)} of {self._n} records in epoch {self._epoch}, "
                                f"less than one global batch of {self.global_batch}; lower data.infobatch_ratio")
            self._plan = plan
            log.info("rank %d: InfoBatch epoch %d keeps %d of %d records (%d steps of %d)", self.rank,
                     self._epoch, len(plan.order), self._n, plan.steps(self.global_batch), self._steps_per_epoch)
        return self._plan

    @property
    def dataset_len(self) -> int:
        return self._n

    @property
    def samples_seen(self) -> int:
        """Global samples of completed global batches."""
        return self._batches_done * self.global_batch

    @property
    def epoch(self) -> int:
        """Epoch of the next global batch."""
        return self._epoch

    def _build(self) -> None:
        from nvidia.dali import Pipeline, fn, types

        if self.infobatch is None:
            # One endless stream over all epochs, from the absolute global batch.
            epoch_kw: dict[str, Any] = {"first_batch": self._epoch * self._steps_per_epoch + self._batch,
                                        "batches_per_epoch": self._steps_per_epoch}
        else:
            # This epoch only, in its pruned order; the pipeline is rebuilt at its end.
            plan = self._current_plan()
            epoch_kw = {"first_batch": self._batch, "batches_per_epoch": plan.steps(self.global_batch),
                        "epoch": self._epoch, "kept": plan.order}
        source = _SampleSource(
            str(self.cfg.path), seed=self.seed, global_batch=self.global_batch, rank=self.rank,
            world_size=self.world_size, scale=tuple(self.cfg.scale), ratio=tuple(self.cfg.ratio),
            hflip=self.cfg.hflip, remote=self.cfg.remote_options(), **epoch_kw)
        gpu = self.decode_device == "mixed"
        pipe = Pipeline(
            batch_size=self.micro_batch, num_threads=self.cfg.decode_threads,
            device_id=(self.device.index or 0) if gpu else None, seed=self.seed % 2**31,
            prefetch_queue_depth=self.cfg.prefetch, py_num_workers=self.cfg.workers,
            # spawn, not fork: forking after CUDA (or DeepSpeed) initialized is unsafe.
            py_start_method="spawn")
        with pipe:
            data, anchor, shape, mirror, meta = fn.external_source(
                source=source, num_outputs=5, batch=False, parallel=True,
                prefetch_queue_depth=self.cfg.prefetch,
                dtype=[types.UINT8, types.INT32, types.INT32, types.INT32, types.INT64],
                ndim=[1, 1, 1, 0, 1])
            decode_kw: dict[str, Any] = {"hw_decoder_load": self.cfg.hw_decoder_load} if gpu else {}
            # Orientation off: crop boxes are drawn on the stored (header) size, which the
            # source checked against the index; rotating by EXIF would invalidate them.
            images = fn.decoders.image_slice(
                data, anchor, shape, device="mixed" if gpu else "cpu", axis_names="HW",
                output_type=types.RGB, adjust_orientation=False, **decode_kw)
            if gpu:
                images = fn.resize(images, size=[self.cfg.img_size, self.cfg.img_size],
                                   interp_type=types.INTERP_CUBIC, antialias=True)
                images = fn.crop_mirror_normalize(
                    images, mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
                    mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD])
                pipe.set_outputs(images, meta)
            else:
                # The decoded crops leave DALI as they are; _finish_on_host resizes them.
                pipe.set_outputs(images, meta, mirror)
        pipe.build()
        self._pipe = pipe
        self._built_epoch = self._epoch
        self._k = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        """The next micro-batch: (micro_batch, 3, img_size, img_size), cfg.dtype, on self.device."""
        if self.infobatch is not None and self._pipe is not None and self._built_epoch != self._epoch:
            # A new InfoBatch epoch: its plan needs the last epoch's losses, recorded since the
            # last next(), so its pipeline is built only now. Closed here, not at the epoch's
            # end, because the last batch may still be a view of DALI's output buffer.
            self.close()
        if self._pipe is None:
            self._build()
        try:
            images_tl, meta_tl, *mirror_tl = self._pipe.run()
        except Exception as e:  # DALI re-raises a worker's exception as a plain Exception
            raise _worker_data_error(e) or e
        meta = np.array(meta_tl.as_tensor())  # (micro_batch, 4) int64, host data already
        expected = np.arange(self._k, self._k + self.micro_batch)
        if not np.array_equal(meta[:, _META_K], expected):
            raise RuntimeError(f"DALI delivered stream samples {meta[:, _META_K].tolist()}, expected "
                               f"{expected.tolist()}: the sample order guarantee is broken")
        self._k += self.micro_batch
        self.last_indices = meta[:, _META_INDEX].copy()
        if self.infobatch is not None:
            self.last_weights = self._current_plan().weights[self.last_indices]
        self._note_substitutions(meta)
        if self.decode_device == "mixed":
            images = self._to_torch(images_tl)
        else:
            images = self._finish_on_host(images_tl, np.array(mirror_tl[0].as_tensor()))
        self._micro += 1
        if self._micro == self.accum:
            self._end_global_batch()
        return images

    def _end_global_batch(self) -> None:
        """Count a completed global batch (and, with InfoBatch, note its records)."""
        if self.infobatch is not None:
            plan = self._current_plan()
            self.last_global_indices = plan.order[self._batch * self.global_batch:
                                                  (self._batch + 1) * self.global_batch]
        self._micro = 0
        self._batches_done += 1
        self._batch += 1
        if self._batch == self.steps_in_epoch:
            self._epoch += 1
            self._batch = 0

    def _to_torch(self, images_tl: Any) -> torch.Tensor:
        """DALI GPU TensorList (micro_batch, 3, S, S) -> torch tensor on self.device, no host round trip."""
        # DLPack import on DALI's output; torch waits on DALI's stream, no copy, no host sync.
        with torch.cuda.device(self.device):
            images = torch.from_dlpack(images_tl.as_tensor())
        return images.to(self.out_dtype) if images.dtype != self.out_dtype else images

    def _finish_on_host(self, crops_tl: Any, mirror: np.ndarray) -> torch.Tensor:
        """CPU-decoded uint8 HWC crops + flip flags -> (micro_batch, 3, S, S) cfg.dtype on self.device.

        Resize: torch's uint8 antialiased bicubic on a channels-last view of each crop
        (no copy out of DALI's buffer). That is torch's vectorized integer kernel, the one
        torchvision's resize uses, which follows PIL's filter: deterministic and
        independent of the thread count (bit-identical runs on one machine and torch
        version). Its output is contiguous (1, 3, S, S), so storing it, flipping it along
        W and the float conversion into the contiguous batch are plain sequential passes.
        """
        size = self.cfg.img_size
        small = torch.empty((len(mirror), 3, size, size), dtype=torch.uint8,
                            pin_memory=self.device.type == "cuda")
        with _single_torch_thread():
            for i in range(len(mirror)):
                # (h, w, 3) -> (1, 3, h, w): a channels-last view, the layout of the fast kernel.
                crop = torch.from_dlpack(crops_tl[i]).permute(2, 0, 1).unsqueeze(0)
                out = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True,
                                    align_corners=False)[0]
                small[i] = out.flip(-1) if mirror[i] else out
            if self.device.type != "cpu":
                # data.device=cpu with a CUDA trainer: one host->device copy, of uint8 (a quarter
                # of the float batch); the normalization below then runs on the device.
                small = small.to(self.device, non_blocking=True)
                if self._scale.device != small.device:
                    self._scale, self._bias = self._scale.to(small.device), self._bias.to(small.device)
            # One pass: float32(x) * (1 / std) + (-mean / std), uint8 promoted inside the kernel.
            images = torch.empty(small.shape, dtype=torch.float32, device=small.device)
            torch.addcmul(self._bias, small, self._scale, out=images)
            return images.to(self.out_dtype) if images.dtype != self.out_dtype else images

    def _note_substitutions(self, meta: np.ndarray) -> None:
        bad = meta[meta[:, _META_FLAG] != 0]
        for k, index, used, _flag in bad.tolist():
            self.substituted += 1
            name = self._dataset.source(index)
            if len(self.substituted_records) < SUBSTITUTED_LIST_LEN:
                self.substituted_records.append((index, name))
            replacement = "a mean-gray image" if used == _GRAY else f"record {used}"
            log.warning("rank %d: record %d (%s) failed its checks; replaced by %s (stream sample %d, "
                        "%d substituted so far)", self.rank, index, name, replacement, k, self.substituted)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable position; only at a global-batch boundary."""
        if self._micro:
            raise ValueError(f"state_dict() in the middle of a global batch ({self._micro}/{self.accum} "
                             "micro-batches yielded); save after the optimizer step")
        state = {"seed": self.seed, "global_batch": self.global_batch, "dataset_len": self._n,
                 "dataset_fingerprint": self.dataset_fingerprint, "samples_seen": self.samples_seen,
                 "substituted": self.substituted}
        if self.infobatch is not None:
            # Pruned epochs have varying lengths: samples_seen alone no longer gives the position.
            state.update(epoch=self._epoch, batch_in_epoch=self._batch, infobatch=self.infobatch.settings())
        return state

    @property
    def dataset_fingerprint(self) -> str:
        """sha256 over the manifest's shard list (names, counts, index digests, excluded records):
        two datasets with the same records in the same order, and only those, share it."""
        shards = [(s["name"], s["count"], s["index_sha256"], s.get("exclude", []))
                  for s in self._dataset.manifest["shards"]]
        return hashlib.sha256(json.dumps(shards).encode()).hexdigest()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state["samples_seen"]``; the world size may differ from the saving run's.

        The dataset must be the one the state was saved with (same manifest fingerprint, not
        only the same length), and the seed and global batch the same: else the sample order
        would differ. ConfigError names the key that differs.
        """
        if self._micro:
            raise ValueError("load_state_dict() in the middle of a global batch; load before iterating")
        for key, mine in (("global_batch", self.global_batch), ("dataset_len", self._n), ("seed", self.seed),
                          ("dataset_fingerprint", self.dataset_fingerprint)):
            if state.get(key) != mine:
                what = " (data.path holds other records than the checkpoint's dataset)" \
                    if key == "dataset_fingerprint" else ""
                raise ConfigError(f"cannot resume the input pipeline: {key} was {state.get(key)!r} in the "
                                  f"checkpoint and is {mine!r} now{what}; the sample order would differ")
        mine_ib = self.infobatch.settings() if self.infobatch is not None else None
        if state.get("infobatch") != mine_ib:
            raise ConfigError(f"cannot resume the input pipeline: data.infobatch settings were "
                              f"{state.get('infobatch')!r} in the checkpoint and are {mine_ib!r} now; the sample "
                              "order would differ")
        samples_seen = int(state["samples_seen"])
        if mine_ib is None:
            epoch, g = order.position(samples_seen, self._n, self.global_batch)
        else:
            epoch, g = int(state["epoch"]), int(state["batch_in_epoch"])
        self.close()
        self._batches_done = samples_seen // self.global_batch
        self._epoch, self._batch = epoch, g
        self._plan = None
        self.substituted = int(state.get("substituted", 0))

    def close(self) -> None:
        """Stop DALI's executor and its worker processes (rebuilt on the next iteration)."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            # DALI frees these in finalizers at garbage collection; close now so the
            # worker processes and pinned/shared memory do not outlive the pipeline.
            pipe._shutdown()
            if pipe._py_pool is not None:
                pipe._py_pool.close()

    def __enter__(self) -> "InputPipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
