"""Typed configuration of the input pipeline (the ``[data]`` table of an experiment TOML)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from selectivemae_ds.data.store import RemoteOptions, is_remote
from selectivemae_ds.errors import ConfigError

DEVICES = ("auto", "cpu", "gpu")
DTYPES = ("float32", "bfloat16")


@dataclass
class DataConfig:
    """Where the images come from and how they are augmented and delivered.

    Fields with ``metadata={"resume": "fixed"}`` define the sample stream: a resume must
    keep them (``selectivemae_ds.config.fixed_on_resume``)."""

    path: str = ""
    """Packed dataset directory (holds ``manifest.json`` and ``shard-*.zarr``), as written by smae-pack,
    or its object store URL (``s3://bucket/prefix``; credentials and endpoint from the AWS_* environment)."""

    img_size: int = field(default=224, metadata={"resume": "fixed"})
    """Side of the square model input in pixels; crops are resized (bicubic) to img_size x img_size."""

    scale: tuple[float, float] = field(default=(0.2, 1.0), metadata={"resume": "fixed"})
    """RandomResizedCrop area range, as fractions of the stored image area (paper: 0.2-1.0)."""

    ratio: tuple[float, float] = field(default=(3 / 4, 4 / 3), metadata={"resume": "fixed"})
    """RandomResizedCrop aspect-ratio (width / height) range; sampled log-uniformly."""

    hflip: float = field(default=0.5, metadata={"resume": "fixed"})
    """Probability of a horizontal flip per sample."""

    workers: int = 4
    """DALI parallel external_source worker processes per rank (each reads and checks records)."""

    prefetch: int = 2
    """DALI prefetch queue depth in batches: how far the pipeline runs ahead of the trainer."""

    decode_threads: int = 2
    """DALI num_threads: CPU threads for decoding (cpu) or host-side parsing (mixed).

    On the cpu path the resize and normalization run in torch in the caller's thread;
    under mixed they run on the GPU."""

    hw_decoder_load: float = 0.65
    """Share of JPEG work given to the A100/H100 hardware decoder under device mixed; ignored elsewhere."""

    device: str = "auto"
    """Where decoding runs: "gpu" (nvJPEG, mixed), "cpu", or "auto" (gpu when CUDA is available)."""

    dtype: str = "float32"
    """Element type of the delivered images: "float32" or "bfloat16"."""

    cache_dir: str = ""
    """Object store datasets only: a local directory caching the record bytes read (shared by all
    workers and ranks of the machine; "" for none). Cached bytes are still crc32-checked."""

    cache_max_gb: float = 0.0
    """Bound of ``cache_dir`` in GB (10^9 bytes); least recently used records are evicted."""

    retries: int = 4
    """Object store datasets only: retries of a failed request (network or server error) before
    the run stops with a data error naming the object; a missing object is never retried."""

    retry_backoff_s: float = 0.5
    """Wait before the first retry in seconds, doubled per retry (capped at 10 s)."""

    infobatch: bool = False
    """Prune well-learned samples each epoch (InfoBatch, as the public SelectiveMAE training
    script does; not in the paper). Off by default. See docs/loader.md, "InfoBatch"."""

    infobatch_ratio: float = 0.5
    """InfoBatch: share of the below-mean-loss samples pruned per epoch, in (0, 0.9]; the kept
    ones get loss weight 1 / (1 - ratio) (public code: 0.5)."""

    infobatch_delta: float = 0.875
    """InfoBatch: epochs e < delta * (run's epochs) prune, the rest do not (public code: 0.875)."""

    def validate(self, check_path: bool = True) -> None:
        """Raise ConfigError naming the first bad key (``data.<key>: ...``).

        ``check_path=False`` skips the existence check of ``data.path`` (a resolved config
        read on another machine, e.g. by smae-export)."""
        if not self.path:
            raise ConfigError("data.path: no dataset directory given")
        if check_path and not is_remote(self.path) and not Path(self.path).is_dir():
            raise ConfigError(f"data.path: {self.path} does not exist")
        if not isinstance(self.img_size, int) or self.img_size < 8:
            raise ConfigError(f"data.img_size: must be an integer >= 8, got {self.img_size!r}")
        lo, hi = _pair("scale", self.scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"data.scale: need 0 < min <= max <= 1, got {tuple(self.scale)!r}")
        lo, hi = _pair("ratio", self.ratio)
        if not 0.0 < lo <= hi:
            raise ConfigError(f"data.ratio: need 0 < min <= max, got {tuple(self.ratio)!r}")
        if not 0.0 <= self.hflip <= 1.0:
            raise ConfigError(f"data.hflip: a probability in [0, 1], got {self.hflip!r}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"data.workers: need at least 1 worker process, got {self.workers!r}")
        if not isinstance(self.prefetch, int) or self.prefetch < 1:
            raise ConfigError(f"data.prefetch: need a queue depth >= 1, got {self.prefetch!r}")
        if not isinstance(self.decode_threads, int) or self.decode_threads < 1:
            raise ConfigError(f"data.decode_threads: need at least 1 thread, got {self.decode_threads!r}")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ConfigError(f"data.hw_decoder_load: a fraction in [0, 1], got {self.hw_decoder_load!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"data.device: one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"data.dtype: one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check_infobatch(self.infobatch_ratio, self.infobatch_delta)
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ConfigError(f"data.retries: need an integer >= 0, got {self.retries!r}")
        if not isinstance(self.cache_max_gb, (int, float)) or self.cache_max_gb < 0:
            raise ConfigError(f"data.cache_max_gb: need a size >= 0, got {self.cache_max_gb!r}")
        self.remote_options().check()

    def remote_options(self) -> RemoteOptions:
        """How an object store ``path`` is read (retries, cache)."""
        return RemoteOptions(attempts=self.retries + 1, backoff_s=self.retry_backoff_s, cache_dir=self.cache_dir,
                             cache_max_bytes=int(self.cache_max_gb * 1e9))


def check_infobatch(ratio: float, delta: float) -> None:
    """ConfigError naming the ``data.*`` key when the InfoBatch prune ratio or pruning span is out of range."""
    if not (isinstance(ratio, float) and 0.0 < ratio <= 0.9):
        raise ConfigError(f"data.infobatch_ratio: the share of well-learned samples pruned per epoch must be in "
                          f"(0, 0.9] (public code: 0.5), got {ratio!r}")
    if not (isinstance(delta, float) and 0.0 < delta <= 1.0):
        raise ConfigError(f"data.infobatch_delta: the fraction of the epochs that prune must be in (0, 1] "
                          f"(public code: 0.875), got {delta!r}")


def _pair(key: str, value: object) -> tuple[float, float]:
    """Check that ``value`` is a (min, max) pair of numbers and return it as floats."""
    try:
        lo, hi = value  # type: ignore[misc]
        return float(lo), float(hi)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data.{key}: expected a (min, max) pair, got {value!r}") from e
