"""The pretraining loop; reads like the paper's recipe.

    for each optimizer step:
        lr   <- warmup + cosine of the step          (schedules.lr_at)
        t    <- step / total_steps                     drives the PSTS stage (near / far / random)
        for each of `accum` micro-batches of this rank's slice of the global batch:
            loss <- model(images, t)                   PSTS picks ~15% visible, ~25% targets
            backward(loss)                             ZeRO reduces gradients
        AdamW step with clipping                       (skipped by ZeRO if the gradient norm is not finite)
        one all_reduce + one host sync: mean loss, non-finite flag, stop flag
        log / picture / checkpoint on their cadence
        a stop request (SIGTERM/SIGINT) agreed by all ranks: checkpoint, exit 128 + signal

Failures a user can act on are typed (selectivemae_ds.errors): configuration (exit 2),
data (3), checkpoint (4), a run that had to stop (5: non-finite training, a collective
timed out, run_dir held by another run); anything else is a bug and keeps its traceback.

Entry points: ``launcher/pretrain.py`` under ``deepspeed`` and the ``smae-pretrain``
console script (one process when started without a launcher).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from selectivemae_ds import checkpoint
from selectivemae_ds.config import TrainConfig, config_to_dict, load_config, resolve_steps, write_resolved
from selectivemae_ds.engine import initialize, load_ds_json, merge_ds_config, set_lr
from selectivemae_ds.errors import RunError, run_cli
from selectivemae_ds.locking import DirLock
from selectivemae_ds.metrics import MetricsWriter, mfu, peak_tflops
from selectivemae_ds.schedules import lr_at, peak_lr, progress_at
from selectivemae_ds.visualize import picture_grid


class NonFiniteError(RunError):
    """Training produced too many consecutive non-finite steps, even after a rollback."""


# What gloo (``Timed out waiting 5000ms for recv operation to complete``, ``Application timeout
# caused pair closure``) and NCCL (``Watchdog caught collective operation timeout``) say when a
# collective times out; nothing else is relabelled.
_TIMEOUT_RE = re.compile(r"Timed out waiting \d+ms for (recv|send)|Application timeout caused pair closure|"
                         r"collective operation timeout")


@contextlib.contextmanager
def collective(what: str, rank: int, step: int, timeout_s: float) -> Iterator[None]:
    """Run a block that waits on the other ranks; a backend timeout becomes a RunError naming
    this rank, the collective and the step. Other errors propagate unchanged."""
    try:
        yield
    except RuntimeError as e:
        if not _TIMEOUT_RE.search(str(e)):
            raise
        raise RunError(
            f"rank {rank}: {what} at step {step} timed out after train.collective_timeout_s = {timeout_s:g} s "
            f"waiting for the other ranks (one of them is hung, stopped or dead); "
            f"backend: {e}"
        ) from e


class StopRequest:
    """SIGTERM/SIGINT (and the loss of the ``deepspeed`` launcher) turned into a flag the
    step loop reads; the ranks agree on it through the step's existing all_reduce.

    DeepSpeed 0.19.8's launcher (``deepspeed.launcher.launch``) forwards SIGTERM/SIGINT to
    every rank's process tree, then SIGKILLs what is left after 30 s. Its parent, the
    ``deepspeed`` command (``launcher/runner.py``), forwards nothing on a single node: a
    SIGTERM to it kills it alone. So each rank also watches that its launcher's parent
    is still the one it started under, and treats a change as SIGTERM.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self.reason = ""
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}
        self._watch = _launcher_watch()

    def restore(self) -> None:
        """Put back the handlers that were there before (the run is over)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self.signum:  # the first request names the exit code; repeats change nothing
            self.signum = signum
            self.reason = signal.Signals(signum).name

    def poll(self) -> int:
        """The signal number to stop with, 0 when no stop was requested (checked once per step)."""
        if not self.signum and self._watch is not None and self._watch():
            self.signum = int(signal.SIGTERM)
            self.reason = "the deepspeed launcher is gone (treated as SIGTERM)"
        return self.signum


def _ppid_of(pid: int) -> int | None:
    """Parent pid of ``pid`` from /proc (None when it is gone or unreadable)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 4; the command name (field 2) is in parentheses and may hold spaces.
    return int(stat.rsplit(")", 1)[1].split()[1])


def _launcher_watch() -> Callable[[], bool] | None:
    """Under ``deepspeed.launcher.launch``: a check that its parent (the ``deepspeed`` command)
    is still there; None elsewhere (torchrun and schedulers signal the ranks themselves)."""
    launch_pid = os.getppid()
    try:
        cmdline = Path(f"/proc/{launch_pid}/cmdline").read_bytes()
    except OSError:
        return None
    if b"deepspeed.launcher.launch" not in cmdline:
        return None
    runner = _ppid_of(launch_pid)
    if runner is None or runner <= 1:
        return None
    return lambda: _ppid_of(launch_pid) != runner


def micro_seed(seed: int, step: int, micro: int) -> int:
    """Seed of the model's randomness (masking, drop path) for one micro-batch of one step.

    `micro` is the micro-batch's index in the global batch (rank * accumulation steps +
    k): rank r reads the r-th slice of the global batch as consecutive micro-batches, so
    the same images get the same draws at any world size with the same micro_batch (a
    resume through a universal checkpoint), and a resumed run reproduces the straight
    run without storing RNG states in the checkpoint.
    """
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1)[0])


def _free_port() -> int:
    """A TCP port free on this machine (for a launcher-less single-rank world)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_allreduce_buffer(rank: int) -> Path:
    """The /dev/shm file of ``rank``'s buffer in DeepSpeed's CPU all-reduce (shm.cpp names it
    after the uid, MASTER_ADDR, MASTER_PORT and the rank)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def _release_cpu_allreduce_buffer(rank: int) -> None:
    """Unlink this rank's shared-memory all-reduce buffer once every rank has mapped them all.

    With ranks on one machine, DeepSpeed's CPU backend creates one ~69 MB /dev/shm buffer per
    rank at init and never unlinks it: every CPU run left them behind (18 GB after a day of
    tests). Its init returns only after the rank has opened every peer's buffer and nothing
    opens them by name again, so after a barrier the names can go: the mappings stay valid
    and the memory is freed when the ranks exit, however they exit."""
    dist.barrier()
    path = cpu_allreduce_buffer(rank)
    if path.exists():
        path.unlink()


def setup_distributed(timeout_s: float) -> tuple[int, int, torch.device]:
    """Initialize the process group (a world of one without a launcher); return (rank, world, device).

    ``timeout_s`` bounds every collective: a rank that waits longer for its peers fails."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        # smae-pretrain without a launcher: a single-rank world on this machine.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    timeout = datetime.timedelta(seconds=timeout_s)
    # DeepSpeed makes its own groups (ZeRO clones the world group with new_group() and no
    # timeout), and torch gives such groups its module default (30 min), not the world
    # group's timeout. Setting that default before any group exists bounds them all.
    c10d = dist.distributed_c10d
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(timeout=timeout)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        _release_cpu_allreduce_buffer(dist.get_rank())
    if accel.device_name() == "cuda":
        accel.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(accel.device_name())
    return dist.get_rank(), dist.get_world_size(), device


class Trainer:
    """State of one pretraining run: engine, input pipeline, counters; saved with every checkpoint."""

    def __init__(self, cfg: TrainConfig, ds_json: dict[str, Any], ds_source: str) -> None:
        self.rank, self.world, self.device = setup_distributed(cfg.train.collective_timeout_s)
        self.stop = StopRequest()
        # Held for the life of the run, before anything looks at or writes into run_dir.
        self.lock = self._lock_run_dir(cfg)
        # Everything that can be checked without touching data or weights is checked here.
        target = checkpoint.resolve_resume(cfg.checkpoint.resume, cfg.checkpoint_dir, config_to_dict(cfg),
                                           self.world)
        if target is not None and self.rank == 0:
            checkpoint.warn_skipped(target)
        ds_config = merge_ds_config(ds_json, cfg, self.world, source=ds_source,
                                    load_universal=bool(target and target.universal))
        from selectivemae_ds.data.pipeline import InputPipeline
        from selectivemae_ds.models import build_model

        self.pipeline = InputPipeline(cfg.data, seed=cfg.train.seed, global_batch=cfg.train.global_batch,
                                      micro_batch=cfg.train.micro_batch, rank=self.rank, world_size=self.world,
                                      device=self.device)
        self.cfg = resolve_steps(cfg, self.pipeline.dataset_len)
        if target is not None:
            checkpoint.check_steps(target, self.cfg.train.steps)
        self.infobatch = None
        if self.cfg.data.infobatch:
            from selectivemae_ds.data.infobatch import InfoBatch

            # The run's length in full epochs: train.steps counts steps of unpruned epochs.
            self.infobatch = InfoBatch(
                n=self.pipeline.dataset_len, seed=self.cfg.train.seed, ratio=self.cfg.data.infobatch_ratio,
                delta=self.cfg.data.infobatch_delta, total_epochs=self.cfg.train.steps / self.pipeline.steps_per_epoch,
                device=self.device, rank=self.rank, world_size=self.world)
            self.pipeline.attach_infobatch(self.infobatch)
        if self.rank == 0:
            write_resolved(self.cfg, self.cfg.run_dir)
        # The same seed on every rank gives identical initial weights before DeepSpeed broadcasts.
        torch.manual_seed(self.cfg.train.seed)
        model = build_model(self.cfg.model, self.cfg.method_cfg)
        self.flops_per_image = float(model.flops_per_image())
        # What the method logs besides the loss: its loss terms and stats (averaged per step).
        self.spec = model.spec
        self.log_keys = tuple(f"loss_{t}" for t in self.spec.loss_terms) + self.spec.logged_stats
        self.patch = self.cfg.model.resolved_patch_size()
        self.engine = initialize(model, self.cfg, ds_config, self.device)
        self.dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32
        # Where train.nonfinite_grad_at injects a non-finite gradient (fault injection only).
        self._first_param = next(p for p in self.engine.module.parameters() if p.requires_grad)
        self.accum = self.engine.gradient_accumulation_steps()
        self.total = self.cfg.train.steps
        self.peak = peak_lr(self.cfg)
        self.step = 0
        self.position = 0.0  # schedule position of the last step started (see _position)
        self.nonfinite_total = 0
        self.rolled_back = False
        self.finished = False
        self.stopped_by = 0  # the signal number the run stopped on (0: it did not)
        if target is not None:
            self._load(target)
        self.metrics = MetricsWriter(self.cfg.run_dir, self.step) if self.rank == 0 else None
        if self.metrics is not None:
            print(f"[start] {self.cfg.model.method} ViT-{self.cfg.model.size} {self.cfg.model.img_size}px, "
                  f"{self.world} ranks x {self.cfg.train.micro_batch} x {self.accum} accumulation = "
                  f"{self.cfg.train.global_batch} per step, {self.total} steps "
                  f"({self.pipeline.steps_per_epoch} per epoch), peak lr {self.peak:.3e}, "
                  f"warmup {self.cfg.optim.warmup_steps} steps, run_dir {self.cfg.run_dir}", flush=True)
        if self.metrics is not None and target is not None:
            self.metrics.event({"event": "resume", "step": self.step, "from": str(target.tag_dir),
                                "universal": target.universal, "world_size": self.world})

    def _position(self) -> float:
        """Where the schedules (lr, PSTS progress, run length) stand: the step, or with InfoBatch the
        pipeline's position in steps of full epochs (pruned epochs take fewer steps)."""
        return float(self.step) if self.infobatch is None else self.pipeline.schedule_position

    def _lock_run_dir(self, cfg: TrainConfig) -> DirLock | None:
        """Rank 0 takes the run_dir lock; every rank learns whether it did (one startup all_reduce).

        A second run on the same run_dir is refused naming the holder; the kernel releases
        the lock when the holder exits or is killed, so ``--resume auto`` after a kill -9 works.
        """
        lock: DirLock | None = None
        refusal: RunError | None = None
        if self.rank == 0:
            try:
                lock = DirLock(cfg.run_dir, "training run")
            except RunError as e:
                refusal = e
        failed = torch.tensor([float(refusal is not None)], device=self.device)
        with collective("the run_dir lock agreement", self.rank, 0, cfg.train.collective_timeout_s):
            dist.all_reduce(failed)
        if refusal is not None:
            raise refusal
        if failed.item():  # HOST SYNC: once, at startup
            raise RunError(f"{cfg.run_dir} is in use by another training run (rank 0 names the holder)")
        return lock

    def _load(self, target: checkpoint.ResumeTarget) -> None:
        """Restore engine, loader position and counters from a complete checkpoint."""
        checkpoint.load(self.engine, target)
        state = target.client_state
        self.pipeline.load_state_dict(state["loader"])
        if self.infobatch is not None:
            self.infobatch.load(target.tag_dir / checkpoint.RANK_STATE_DIR)
        self.step = int(state["step"])
        self.nonfinite_total = int(state.get("nonfinite_steps", 0))

    def client_state(self) -> dict[str, Any]:
        """What a checkpoint stores besides DeepSpeed's own state (JSON-serializable)."""
        return {
            "step": self.step,
            "samples_seen": self.pipeline.samples_seen,
            "loader": self.pipeline.state_dict(),
            "config": config_to_dict(self.cfg),
            "world_size": self.world,
            "nonfinite_steps": self.nonfinite_total,
        }

    def _micro_batches(self) -> Iterator[tuple[torch.Tensor, float]]:
        """This rank's micro-batches of one global batch, with the seconds spent waiting for each."""
        for _ in range(self.accum):
            t = time.perf_counter()
            imgs = next(self.pipeline)
            wait = time.perf_counter() - t
            yield imgs.to(self.dtype, non_blocking=True), wait

    def train_step(self) -> tuple[float, dict[str, float], bool, float, torch.Tensor, bool]:
        """One optimizer step.

        Returns (global mean loss, the method's logged values averaged over micro-batches
        and ranks (``self.log_keys``: its loss terms and stats, e.g. selectivemae's
        ``psts_stage_id``), step applied, data-wait seconds, last micro-batch, stop: some
        rank was asked to stop before this step's all_reduce).

        No host sync inside the micro-step loop; the single sync is the ``tolist()`` of
        the all-reduced [loss, non-finite count, stage, stop requests] after the step.
        """
        cfg = self.cfg
        self.position = self._position()
        set_lr(self.engine, lr_at(self.position, peak=self.peak, warmup_steps=cfg.optim.warmup_steps,
                                  total_steps=self.total, min_lr=cfg.optim.min_lr))
        progress = progress_at(self.position, self.total)
        inject = self.step in cfg.debug.nonfinite_at
        poison = float(cfg.debug.nonfinite_value)
        # Fault injection (debug.*, tests and drills): one gradient replaced by inf/NaN, the loss stays finite.
        hook = self._first_param.register_hook(lambda g: torch.full_like(g, poison)) \
            if self.step in cfg.debug.nonfinite_grad_at else None
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        bad = torch.zeros((), device=self.device, dtype=torch.float32)
        logged_sum = torch.zeros(len(self.log_keys), device=self.device, dtype=torch.float32)
        wait = 0.0
        imgs = torch.empty(0)
        timeout = cfg.train.collective_timeout_s
        per_sample: list[torch.Tensor] = []
        with collective("the step's forward/backward/optimizer step (ZeRO gradient reduction)",
                        self.rank, self.step, timeout):
            for k, (imgs, waited) in enumerate(self._micro_batches()):
                wait += waited
                torch.manual_seed(micro_seed(cfg.train.seed, self.step, self.rank * self.accum + k))
                out = self.engine(imgs, progress)
                loss = out.loss
                if self.infobatch is not None:
                    # InfoBatch: kept well-learned records count 1 / (1 - ratio); their losses become scores.
                    loss = self.infobatch.weighted_loss(out.per_sample_loss, self.pipeline.last_weights)
                    per_sample.append(out.per_sample_loss.detach())
                if self.log_keys:
                    logged_sum += torch.stack([*(out.terms[t] for t in self.spec.loss_terms),
                                               *(out.stats[k] for k in self.spec.logged_stats)]).detach().float()
                if inject:
                    loss = loss * poison
                # Accumulated on the device: reading the flag now would sync every micro-step.
                bad += (~torch.isfinite(loss.detach())).float()
                loss_sum += torch.nan_to_num(loss.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
                self.engine.backward(loss)
                # DeepSpeed only updates on the accumulation boundary; the ZeRO optimizer
                # discards the update there when the gradient norm is inf/NaN.
                self.engine.step()
            if self.infobatch is not None:
                # One all_gather on the device; indices come from the order, not from other ranks.
                self.infobatch.record(torch.cat(per_sample), self.pipeline.last_global_indices)
        if hook is not None:
            hook.remove()
        # The stop flag rides on the step's one all_reduce: every rank sees the same sum and
        # so stops after the same step, with no collective of its own.
        # torch.full fills on the device: no host-to-device copy (a sync on CUDA) for the flag.
        asked = torch.full((), float(self.stop.poll() != 0), device=self.device)
        packed = torch.cat([torch.stack([loss_sum / self.accum, bad, asked]),
                            logged_sum / self.accum])
        with collective("the step's all_reduce of loss, non-finite and stop flags", self.rank, self.step, timeout):
            dist.all_reduce(packed)
            loss_mean, n_bad, n_stop, *logged_means = packed.tolist()  # HOST SYNC: the one per optimizer step
        applied = bool(self.engine.was_step_applied())
        if n_bad > 0 and applied:
            raise RuntimeError(
                f"step {self.step}: the loss was not finite on some rank but DeepSpeed applied the update; "
                "the DeepSpeed config must keep ZeRO's overflow check (zero stage >= 1, bf16.check_grad_overflow)"
            )
        logged = {k: v / self.world for k, v in zip(self.log_keys, logged_means)}
        return loss_mean / self.world, logged, applied, wait, imgs, n_stop > 0

    def _rollback_or_stop(self, consecutive: int) -> None:
        """K consecutive non-finite steps: reload the newest loadable checkpoint once (as
        ``--resume auto`` chooses it: a damaged newer tag is passed over with a warning), then stop."""
        target = None
        if not self.rolled_back:
            target = checkpoint.resolve_resume("auto", self.cfg.checkpoint_dir, config_to_dict(self.cfg), self.world)
        if target is None:
            why = "after a rollback" if self.rolled_back else "and there is no complete checkpoint to roll back to"
            raise NonFiniteError(
                f"{consecutive} consecutive non-finite steps (train.max_nonfinite = {self.cfg.train.max_nonfinite}) "
                f"at step {self.step} {why}; lower optim.blr, check the data, or raise optim.grad_clip"
            )
        if self.rank == 0:
            checkpoint.warn_skipped(target)
        from_step = self.step
        # Keep the count across the rollback: the skipped steps did happen.
        nonfinite_total = self.nonfinite_total
        self._load(target)
        self.nonfinite_total = nonfinite_total
        self.rolled_back = True
        if self.metrics is not None:
            self.metrics.event({"event": "rollback", "step": self.step, "from_step": from_step,
                                "to": str(target.tag_dir)})

    def _picture(self, imgs: torch.Tensor) -> None:
        """Input / HOG / visible / targets / reconstruction grid to TensorBoard (all ranks run the forward:
        ZeRO-3 gathers parameters collectively)."""
        progress = progress_at(self._position(), self.total)
        with torch.no_grad():
            details = self.engine.module.forward_details(imgs[:4], progress)
        if self.metrics is not None:
            grid = picture_grid(imgs, details, self.patch)
            self.metrics.picture("reconstruction", grid, self.step)

    def run(self) -> None:
        """Train from ``self.step`` to ``train.steps``, logging and checkpointing on their cadence.

        A stop request (SIGTERM/SIGINT on any rank) ends the run after the step at which the
        ranks agree on it, with a checkpoint of that step when ``train.checkpoint_on_preempt``;
        ``self.stopped_by`` then holds the signal number."""
        cfg = self.cfg
        peak_flops = peak_tflops(self.device, cfg.train.peak_tflops)
        consecutive = 0
        window_t, window_wait, window_steps = 0.0, 0.0, 0
        losses: list[float] = []
        logged: list[dict[str, float]] = []
        while self._position() < self.total:
            t0 = time.perf_counter()
            loss, values, applied, wait, imgs, stop = self.train_step()
            elapsed = time.perf_counter() - t0
            ok = applied and np.isfinite(loss)
            consecutive = 0 if ok else consecutive + 1
            self.nonfinite_total += 0 if ok else 1
            self.step += 1
            window_t += elapsed
            window_wait += wait
            window_steps += 1
            logged.append(values)
            if ok:
                losses.append(loss)
            if not ok and consecutive >= cfg.train.max_nonfinite and not stop:
                self._rollback_or_stop(consecutive)
                consecutive = 0
                continue
            if self.step % cfg.train.log_every == 0 or self._position() >= self.total:
                self._log(losses, logged, window_t, window_wait, window_steps, peak_flops)
                window_t, window_wait, window_steps = 0.0, 0.0, 0
                losses, logged = [], []
            if cfg.train.picture_every and self.step % cfg.train.picture_every == 0:
                self._picture(imgs)
            due = (cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0) or \
                self._position() >= self.total
            if due or (stop and cfg.train.checkpoint_on_preempt):
                self._save()
            if stop and self._position() < self.total:
                self._stop()
                return
        self.finished = True

    def _save(self) -> None:
        """A complete checkpoint of the current step, written by every rank."""
        cfg = self.cfg
        with collective("the checkpoint write's barriers", self.rank, self.step, cfg.train.collective_timeout_s):
            tag = checkpoint.save(self.engine, cfg.checkpoint_dir, self.step, self.client_state(), cfg.checkpoint.keep,
                                  rank_files=self.infobatch.shard() if self.infobatch is not None else None,
                                  delay_s=cfg.debug.checkpoint_delay_s)
        if self.metrics is not None:
            self.metrics.event({"event": "checkpoint", "step": self.step, "path": str(tag)})

    def _stop(self) -> None:
        """Record the agreed stop; a rank that got no signal itself stops as on SIGTERM."""
        self.stopped_by = self.stop.signum or int(signal.SIGTERM)
        reason = self.stop.reason or "another rank was asked to stop"
        newest = checkpoint.newest_complete(self.cfg.checkpoint_dir)
        print(f"[stop] rank {self.rank}: {reason}; stopped after step {self.step} of {self.total}, newest complete "
              f"checkpoint {newest.name if newest else None}; exit {128 + self.stopped_by} "
              "(continue with --resume auto)", flush=True)
        if self.metrics is not None:
            self.metrics.event({"event": "stop", "step": self.step, "reason": reason,
                                "checkpoint": str(newest) if newest else None})

    def _log(self, losses: list[float], logged: list[dict[str, float]], window_t: float, window_wait: float,
             window_steps: int, peak_flops: float | None) -> None:
        """One log record on rank 0 from host numbers already at hand.

        Besides the common fields, the method's spec adds its own: ``log_fields`` (host
        values at this progress, e.g. selectivemae's scheduled ``psts_stage``) and the
        window means of its loss terms and stats (e.g. ``psts_stage_id``, the mean stage
        id the model used: fractional inside a blend window).
        """
        if self.metrics is None:
            return
        cfg = self.cfg
        img_s = cfg.train.global_batch * window_steps / max(window_t, 1e-9)
        progress = progress_at(self.position, self.total)
        # HOST SYNC on log steps only, where DeepSpeed keeps the norm as a device tensor.
        grad_norm = self.engine.get_global_grad_norm()
        # inf after a skipped step: the metrics writer logs it as null.
        grad_norm = float(grad_norm) if grad_norm is not None else None
        self.metrics.log({
            "step": self.step,
            "total_steps": self.total,
            "epoch": self.pipeline.epoch_progress,
            "samples_seen": self.pipeline.samples_seen,
            # null for a window without an applied step.
            "loss": float(np.mean(losses)) if losses else None,
            "lr": lr_at(self.position, peak=self.peak, warmup_steps=cfg.optim.warmup_steps,
                        total_steps=self.total, min_lr=cfg.optim.min_lr),
            # Host value already (DeepSpeed computed it for clipping); None before the first update.
            "grad_norm": grad_norm,
            "img_per_s": img_s,
            "img_per_s_per_rank": img_s / self.world,
            "data_wait": window_wait / max(window_t, 1e-9),
            "mfu": mfu(img_s, self.flops_per_image, self.world, peak_flops),
            "progress": progress,
            **self.spec.log_fields(cfg.method_cfg, progress),
            **{k: float(np.mean([v[k] for v in logged])) for k in self.log_keys},
            "nonfinite_steps": self.nonfinite_total,
            "substituted": self.pipeline.substituted,
        })

    def close(self) -> None:
        """Release the input pipeline and the metric sinks; print where the outputs are."""
        self.pipeline.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.lock is not None:
            self.lock.release()
        self.stop.restore()
        if self.metrics is not None and self.finished:
            newest = checkpoint.newest_complete(self.cfg.checkpoint_dir)
            print(f"[done] checkpoint: {newest}\n[done] tensorboard: {self.metrics.tb_dir} "
                  f"(tensorboard --logdir {self.metrics.tb_dir})\n[done] metrics: {self.metrics.jsonl_path}\n"
                  f"[done] config: {Path(self.cfg.run_dir) / 'config.toml'}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line shared by ``launcher/pretrain.py`` and ``smae-pretrain``."""
    p = argparse.ArgumentParser(description="SelectiveMAE / MAE / CrossMAE pretraining on DeepSpeed")
    p.add_argument("--config", type=Path, default=None, help="experiment TOML (configs/*.toml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--deepspeed_config", type=Path, default=None, help="DeepSpeed JSON (ds_configs/*.json)")
    p.add_argument("--resume", default=None, help='"auto" or a checkpoint tag directory (= checkpoint.resume)')
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher; unused")
    return p.parse_args(argv)


def train(argv: list[str] | None = None) -> int:
    """Parse, validate everything, then train; 128 + N when stopped by signal N (see errors.py)."""
    args = parse_args(argv)
    overrides = list(args.set) + ([f"checkpoint.resume={args.resume}"] if args.resume is not None else [])
    source = str(args.deepspeed_config) if args.deepspeed_config else "DeepSpeed config"
    cfg = load_config(args.config, overrides)
    ds_json = load_ds_json(args.deepspeed_config)
    # Checked again after init with the real world size; this catches it before any work.
    merge_ds_config(ds_json, cfg, int(os.environ.get("WORLD_SIZE", "1")), source=source)
    trainer = Trainer(cfg, ds_json, source)
    try:
        trainer.run()
    finally:
        trainer.close()
    return 128 + trainer.stopped_by if trainer.stopped_by else 0


def main(argv: list[str] | None = None) -> int:
    """``smae-pretrain`` / ``launcher/pretrain.py``: :func:`train` with the shared exit codes."""
    return run_cli(train, argv)
