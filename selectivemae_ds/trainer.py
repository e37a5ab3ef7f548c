"""The pretraining loop; reads like the paper's recipe.

    for each optimizer step:
        lr   <- warmup + cosine of the step          (schedules.lr_at)
        t    <- step / total_steps                     drives the PSTS stage (near / far / random)
        for each of `accum` micro-batches of this rank's slice of the global batch:
            loss <- model(images, t)                   PSTS picks ~15% visible, ~25% targets
            backward(loss)                             ZeRO reduces gradients
        AdamW step with clipping                       (skipped by ZeRO if the gradient norm is not finite)
        one all_reduce + one host sync: mean loss, non-finite flag
        log / picture / checkpoint on their cadence

Entry points: ``launcher/pretrain.py`` under ``deepspeed`` and the ``smae-pretrain``
console script (one process when started without a launcher).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from selectivemae_ds import checkpoint
from selectivemae_ds.config import TrainConfig, config_to_dict, load_config, resolve_steps, write_resolved
from selectivemae_ds.engine import initialize, load_ds_json, merge_ds_config, set_lr
from selectivemae_ds.metrics import MetricsWriter, mfu, peak_tflops
from selectivemae_ds.schedules import lr_at, peak_lr, progress_at
from selectivemae_ds.visualize import picture_grid


class NonFiniteError(RuntimeError):
    """Training produced too many consecutive non-finite steps, even after a rollback."""


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the model's randomness (masking, drop path) at one optimizer step on one rank.

    Reseeding per step from (seed, step, rank) makes resumed runs reproduce the straight
    run exactly without storing RNG states in the checkpoint.
    """
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def _free_port() -> int:
    """A TCP port free on this machine (for a launcher-less single-rank world)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup_distributed() -> tuple[int, int, torch.device]:
    """Initialize the process group (a world of one without a launcher); return (rank, world, device)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        # smae-pretrain without a launcher: a single-rank world on this machine.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    accel = get_accelerator()
    if accel.device_name() == "cuda":
        accel.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(accel.device_name())
    return dist.get_rank(), dist.get_world_size(), device


class Trainer:
    """State of one pretraining run: engine, input pipeline, counters; saved with every checkpoint."""

    def __init__(self, cfg: TrainConfig, ds_json: dict[str, Any], ds_source: str) -> None:
        self.rank, self.world, self.device = setup_distributed()
        # Everything that can be checked without touching data or weights is checked here.
        target = checkpoint.resolve_resume(cfg.checkpoint.resume, cfg.checkpoint_dir, config_to_dict(cfg),
                                           self.world)
        ds_config = merge_ds_config(ds_json, cfg, self.world, source=ds_source,
                                    load_universal=bool(target and target.universal))
        from selectivemae_ds.data.pipeline import InputPipeline
        from selectivemae_ds.models import build_model

        self.pipeline = InputPipeline(cfg.data, seed=cfg.train.seed, global_batch=cfg.train.global_batch,
                                      micro_batch=cfg.train.micro_batch, rank=self.rank, world_size=self.world,
                                      device=self.device)
        self.cfg = resolve_steps(cfg, self.pipeline.steps_per_epoch)
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
        self.nonfinite_total = 0
        self.rolled_back = False
        self.finished = False
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

    def _load(self, target: checkpoint.ResumeTarget) -> None:
        """Restore engine, loader position and counters from a complete checkpoint."""
        checkpoint.load(self.engine, target)
        state = target.client_state
        self.pipeline.load_state_dict(state["loader"])
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

    def train_step(self) -> tuple[float, dict[str, float], bool, float, torch.Tensor]:
        """One optimizer step.

        Returns (global mean loss, the method's logged values averaged over micro-batches
        and ranks (``self.log_keys``: its loss terms and stats, e.g. selectivemae's
        ``psts_stage_id``), step applied, data-wait seconds, last micro-batch).

        No host sync inside the micro-step loop; the single sync is the ``tolist()`` of
        the all-reduced [loss, non-finite count] pair after the step.
        """
        cfg = self.cfg
        set_lr(self.engine, lr_at(self.step, peak=self.peak, warmup_steps=cfg.optim.warmup_steps,
                                  total_steps=self.total, min_lr=cfg.optim.min_lr))
        progress = progress_at(self.step, self.total)
        torch.manual_seed(step_seed(cfg.train.seed, self.step, self.rank))
        inject = self.step in cfg.train.nonfinite_at
        poison = float(cfg.train.nonfinite_value)
        # Fault injection (tests, drills): one gradient replaced by inf/NaN, the loss stays finite.
        hook = self._first_param.register_hook(lambda g: torch.full_like(g, poison)) \
            if self.step in cfg.train.nonfinite_grad_at else None
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        bad = torch.zeros((), device=self.device, dtype=torch.float32)
        logged_sum = torch.zeros(len(self.log_keys), device=self.device, dtype=torch.float32)
        wait = 0.0
        imgs = torch.empty(0)
        for imgs, waited in self._micro_batches():
            wait += waited
            out = self.engine(imgs, progress)
            loss = out.loss
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
        if hook is not None:
            hook.remove()
        packed = torch.cat([torch.stack([loss_sum / self.accum, bad]), logged_sum / self.accum])
        dist.all_reduce(packed)
        loss_mean, n_bad, *logged_means = packed.tolist()  # HOST SYNC: the one per optimizer step
        applied = bool(self.engine.was_step_applied())
        if n_bad > 0 and applied:
            raise RuntimeError(
                f"step {self.step}: the loss was not finite on some rank but DeepSpeed applied the update; "
                "the DeepSpeed config must keep ZeRO's overflow check (zero stage >= 1, bf16.check_grad_overflow)"
            )
        logged = {k: v / self.world for k, v in zip(self.log_keys, logged_means)}
        return loss_mean / self.world, logged, applied, wait, imgs

    def _rollback_or_stop(self, consecutive: int) -> None:
        """K consecutive non-finite steps: reload the last complete checkpoint once, then stop."""
        newest = checkpoint.newest_complete(self.cfg.checkpoint_dir)
        if self.rolled_back or newest is None:
            why = "after a rollback" if self.rolled_back else "and there is no complete checkpoint to roll back to"
            raise NonFiniteError(
                f"{consecutive} consecutive non-finite steps (train.max_nonfinite = {self.cfg.train.max_nonfinite}) "
                f"at step {self.step} {why}; lower optim.blr, check the data, or raise optim.grad_clip"
            )
        target = checkpoint.resolve_resume(str(newest), self.cfg.checkpoint_dir, config_to_dict(self.cfg), self.world)
        assert target is not None
        from_step = self.step
        # Keep the count across the rollback: the skipped steps did happen.
        nonfinite_total = self.nonfinite_total
        self._load(target)
        self.nonfinite_total = nonfinite_total
        self.rolled_back = True
        if self.metrics is not None:
            self.metrics.event({"event": "rollback", "step": self.step, "from_step": from_step, "to": str(newest)})

    def _picture(self, imgs: torch.Tensor) -> None:
        """Input / HOG / visible / targets / reconstruction grid to TensorBoard (all ranks run the forward:
        ZeRO-3 gathers parameters collectively)."""
        progress = progress_at(self.step, self.total)
        with torch.no_grad():
            details = self.engine.module.forward_details(imgs[:4], progress)
        if self.metrics is not None:
            grid = picture_grid(imgs, details, self.patch)
            self.metrics.picture("reconstruction", grid, self.step)

    def run(self) -> None:
        """Train from ``self.step`` to ``train.steps``, logging and checkpointing on their cadence."""
        cfg = self.cfg
        peak_flops = peak_tflops(self.device, cfg.train.peak_tflops)
        consecutive = 0
        window_t, window_wait, window_steps = 0.0, 0.0, 0
        losses: list[float] = []
        logged: list[dict[str, float]] = []
        while self.step < self.total:
            t0 = time.perf_counter()
            loss, values, applied, wait, imgs = self.train_step()
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
            if not ok and consecutive >= cfg.train.max_nonfinite:
                self._rollback_or_stop(consecutive)
                consecutive = 0
                continue
            if self.step % cfg.train.log_every == 0 or self.step == self.total:
                self._log(losses, logged, window_t, window_wait, window_steps, peak_flops)
                window_t, window_wait, window_steps = 0.0, 0.0, 0
                losses, logged = [], []
            if cfg.train.picture_every and self.step % cfg.train.picture_every == 0:
                self._picture(imgs)
            if (cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0) or self.step == self.total:
                tag = checkpoint.save(self.engine, cfg.checkpoint_dir, self.step, self.client_state(),
                                      cfg.checkpoint.keep)
                if self.metrics is not None:
                    self.metrics.event({"event": "checkpoint", "step": self.step, "path": str(tag)})
        self.finished = True

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
        progress = progress_at(self.step - 1, self.total)
        # HOST SYNC on log steps only, where DeepSpeed keeps the norm as a device tensor.
        grad_norm = self.engine.get_global_grad_norm()
        # inf after a skipped step: logged as null so the JSONL stays strict JSON.
        grad_norm = float(grad_norm) if grad_norm is not None and np.isfinite(float(grad_norm)) else None
        self.metrics.log({
            "step": self.step,
            "total_steps": self.total,
            "epoch": self.pipeline.samples_seen / self.pipeline.dataset_len,
            "samples_seen": self.pipeline.samples_seen,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "lr": lr_at(self.step - 1, peak=self.peak, warmup_steps=cfg.optim.warmup_steps,
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


def main(argv: list[str] | None = None) -> int:
    """Parse, validate everything, then train. Exit code 2 on a configuration error."""
    args = parse_args(argv)
    overrides = list(args.set) + ([f"checkpoint.resume={args.resume}"] if args.resume is not None else [])
    source = str(args.deepspeed_config) if args.deepspeed_config else "DeepSpeed config"
    try:
        cfg = load_config(args.config, overrides)
        ds_json = load_ds_json(args.deepspeed_config)
        # Checked again after init with the real world size; this catches it before any work.
        merge_ds_config(ds_json, cfg, int(os.environ.get("WORLD_SIZE", "1")), source=source)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        trainer = Trainer(cfg, ds_json, source)
    except ValueError as e:
        # Resume compatibility and world-size checks run before any data or weights are touched.
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        trainer.run()
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        trainer.close()
    return 0
