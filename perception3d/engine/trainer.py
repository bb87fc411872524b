"""The training loop shared by detection and splatting: `fit(model, train_set, collate_fn, cfg, out_dir)`.

Contract for a model trained by the engine:

* `model(batch)` in train mode returns a mapping with `"loss"`: a scalar tensor (mean-reduced over
  the batch, so that DDP's gradient averaging matches one process on the global batch). Other
  entries that are scalar tensors or numbers (e.g. `"loss_heatmap"`) are averaged over
  `log_every` steps and over ranks and logged; anything else is ignored.
* `batch` is `collate_fn([dataset[i] for i in this rank's part of the global batch])`, moved to
  the device by `move_to_device` (tensors, dicts, lists, tuples, dataclasses, and any object with
  a `.to(device)` method).
* The dataset is map-style (`__len__`, `__getitem__(index)`); see `perception3d.engine.data` for
  the per-sample seeding that makes random augmentation reproducible and resumable, and for
  `set_epoch(epoch)`.
* `evaluate_fn(model, step) -> dict[str, float]` (optional) runs on rank 0 with the unwrapped model
  in eval mode under `torch.no_grad()`, every `eval_every` steps and at the end. It must not
  depend on the global RNG for training to resume exactly: the RNG states are saved before it and
  restored after it anyway.

The caller builds the model (after `seed_everything(cfg.seed)` so that initial weights are
reproducible); `fit` reseeds the global RNGs from `(cfg.seed, rank)` (dropout differs per rank),
moves the model to the device, builds the optimizer and schedule, resumes from
`out_dir/ckpt/latest.pt` when `resume=True`, wraps it in DDP when launched by torchrun, and trains
for `cfg.max_steps` optimizer steps. Rank 0 writes `out_dir/ckpt/`, `out_dir/tb/` and
`out_dir/log.jsonl`.
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional

import torch
from torch.utils.data import Dataset

from perception3d.engine import distributed as dist_utils
from perception3d.engine.checkpoint import FORMAT_VERSION, CheckpointManager, load_checkpoint, unwrap_model
from perception3d.engine.data import (ShardedBatchSampler, build_loader, derive_seed, fork_rng, get_rng_state,
                                      move_to_device, seed_everything)
from perception3d.engine.logger import RunLogger
from perception3d.engine.numerics import denormals_flushed
from perception3d.engine.optim import build_optimizer, build_scheduler
from perception3d.errors import ConfigError

__all__ = ["TrainConfig", "Trainer", "fit", "EvaluateFn", "StepCallback"]

EvaluateFn = Callable[[torch.nn.Module, int], Mapping[str, float]]
StepCallback = Callable[[int, Mapping[str, float]], None]


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the `train:` section of a task config).

    Attributes:
        seed: seeds initial weights (via the task), data order, augmentation and dropout.
        max_steps: optimizer steps in the whole run (the schedule spans them).
        batch_size: the GLOBAL batch size; each of W processes loads `batch_size / W` samples.
        num_workers: DataLoader worker processes (0 loads in the main process).
        lr: peak learning rate.
        weight_decay: decoupled (AdamW) or L2 (Adam, SGD) decay on weights with >= 2 dims.
        optimizer: 'adamw', 'adam' or 'sgd'.
        betas: Adam(W) betas.
        momentum: SGD momentum.
        schedule: 'onecycle', 'cosine' or 'constant' (see `perception3d.engine.optim`).
        warmup_steps: warmup length (onecycle: the ramp-up length; 0 means 30% of the run).
        min_lr_ratio: cosine floor as a fraction of `lr`.
        div_factor, final_div_factor: onecycle start lr `lr/div_factor`, end `lr/(div*final_div)`.
        grad_clip: clip the global gradient L2 norm to this value (None: no clipping).
        log_every: steps between logged (averaged) scalars.
        ckpt_every: steps between checkpoints (one is always written at the end).
        eval_every: steps between evaluations (0: only at the end).
        keep_last_ckpts: step checkpoints kept on disk.
        device: 'auto' (CUDA when available), 'cpu' or 'cuda'.
        precision: 'fp32', or 'bf16': the training forward pass runs under ``torch.autocast``
            with bfloat16 (matmuls and convolutions in bf16; weights, gradients, optimizer state
            and evaluation stay fp32; no loss scaling is needed for bf16). Fast where the hardware
            has bf16 units (CPUs with AMX, Ampere and newer GPUs); elsewhere it can be slower.
        find_unused_parameters: passed to DistributedDataParallel.
        progress: show a progress bar on rank 0.
    """

    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 4
    num_workers: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.01
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    schedule: Literal["onecycle", "cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    div_factor: float = 10.0
    final_div_factor: float = 1e4
    grad_clip: Optional[float] = None
    log_every: int = 10
    ckpt_every: int = 500
    eval_every: int = 0
    keep_last_ckpts: int = 3
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    find_unused_parameters: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "log_every", "ckpt_every", "keep_last_ckpts")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "warmup_steps", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"train.lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"train.grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.schedule != "onecycle" and self.warmup_steps > self.max_steps:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} exceeds train.max_steps={self.max_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def _scalars(out: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if not isinstance(out, Mapping) or "loss" not in out:
        raise TypeError(f"model(batch) must return a dict with a scalar 'loss' tensor (step {step}); "
                        f"got {type(out).__name__}" + (f" with keys {sorted(out)}" if isinstance(out, Mapping) else ""))
    loss = out["loss"]
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
        raise TypeError(f"model(batch)['loss'] must be a scalar tensor that requires grad (step {step}); got "
                        + (f"tensor of shape {tuple(loss.shape)}, requires_grad={loss.requires_grad}"
                           if isinstance(loss, torch.Tensor) else type(loss).__name__))
    logged = {}
    for k, v in out.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            logged[k] = v.detach().reshape(()).float()
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            logged[k] = torch.tensor(float(v))
    return loss.reshape(()), logged


class Trainer:
    """One training run; see the module docstring for the contract. `fit()` is the usual entry.

    Args:
        model: an `nn.Module` whose `forward(batch)` returns `{"loss": ..., ...}` in train mode.
        train_set: map-style dataset.
        collate_fn: list of samples -> batch.
        cfg: the training options.
        out_dir: run folder (checkpoints, TensorBoard, logs).
        evaluate_fn: `(model, step) -> metrics`, optional.
        run_config: the whole task config as a plain dict, stored in every checkpoint (default: `cfg`).
        on_step_end: called on every rank after each optimizer step with `(step, scalars)`;
            `scalars` holds the step's (un-averaged, this-rank) values. Exceptions propagate.
        on_start: called once on rank 0 when the run is set up (after a resume loaded its
            checkpoint), before the first step; `tools/train.py` writes the run's `config.yaml` there,
            so that a resume that fails leaves the run's files as they were.
    """

    def __init__(self, model: torch.nn.Module, train_set: Dataset, collate_fn: Callable | None, cfg: TrainConfig,
                 out_dir: str | Path, evaluate_fn: EvaluateFn | None = None, run_config: Mapping | None = None,
                 on_step_end: StepCallback | None = None, on_start: Callable[[], None] | None = None):
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.train_set = train_set
        self.collate_fn = collate_fn
        self.evaluate_fn = evaluate_fn
        self.on_step_end = on_step_end
        self.on_start = on_start
        self.run_config = dict(run_config) if run_config is not None else {"train": dataclasses.asdict(cfg)}
        self.info = dist_utils.init_distributed(cfg.device)
        self.model = model.to(self.info.device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.ckpts = CheckpointManager(self.out_dir / "ckpt", cfg.keep_last_ckpts)
        self.step = 0
        self.steps_per_epoch = ShardedBatchSampler.steps_per_epoch(len(train_set), cfg.batch_size)
        if self.steps_per_epoch < 1:
            raise ConfigError(f"train.batch_size={cfg.batch_size} is larger than the training set "
                              f"({len(train_set)} samples)")
        self.ddp_model: torch.nn.Module = self.model
        self.metrics: dict[str, float] = {}
        self.last_train: dict[str, float] = {}
        self.last_checkpoint: Path | None = None
        self.elapsed_s = 0.0  # training seconds before this process (resumed runs)
        self._logger: RunLogger | None = None

    # -- state -------------------------------------------------------------------------------

    def _state(self) -> dict:
        rng = get_rng_state()
        if self.info.world_size > 1:
            gathered: list = [None] * self.info.world_size
            torch.distributed.all_gather_object(gathered, rng)
            rngs = gathered
        else:
            rngs = [rng]
        return {
            "format": FORMAT_VERSION,
            "step": self.step,
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rngs,
            "config": self.run_config,
            "extra": {"world_size": self.info.world_size, "epoch": self.step // self.steps_per_epoch,
                      "elapsed_s": self._logger.elapsed_s if self._logger is not None else self.elapsed_s},
        }

    def save_checkpoint(self) -> None:
        """Write a checkpoint for the current step (rank 0 writes; every rank waits for it)."""
        state = self._state()  # collective when distributed: every rank takes part
        if self.info.is_main:
            self.last_checkpoint = self.ckpts.save(self.step, state)
        dist_utils.barrier()

    def _resume(self, logger: RunLogger) -> None:
        latest = self.ckpts.latest()
        if latest is None:
            logger.message(f"[train] resume: no checkpoint in {self.ckpts.dir}; starting from step 0")
            return
        # The config is authoritative for hyper-parameters, the checkpoint for state: keep this run's
        # weight decay, betas, momentum and base lr, and recompute the lr from this run's schedule.
        hparams = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in self.optimizer.param_groups]
        state = load_checkpoint(latest, self.model, self.optimizer, self.scheduler,
                                map_location=self.info.device, restore_rng=True)
        self.step = int(state["step"])
        for group, h in zip(self.optimizer.param_groups, hparams):
            group.update(h)
        self.scheduler.base_lrs = [h["initial_lr"] for h in hparams]
        sched = self.scheduler
        for group, base, fn in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * fn(sched.last_epoch)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.last_checkpoint = latest
        self.elapsed_s = float(state.get("extra", {}).get("elapsed_s", 0.0))
        saved_ws = state.get("extra", {}).get("world_size", 1)
        if saved_ws != self.info.world_size:
            logger.message(f"[train] checkpoint was written by {saved_ws} process(es), resuming with "
                           f"{self.info.world_size}: data order is kept, dropout RNG is not")
        logger.message(f"[train] resumed from {latest} at step {self.step}")

    # -- evaluation --------------------------------------------------------------------------

    def evaluate(self, logger: RunLogger) -> dict[str, float]:
        """Run `evaluate_fn` on rank 0 (RNG-neutral), broadcast and log its metrics."""
        metrics: dict[str, float] = {}
        if self.info.is_main:
            model = unwrap_model(self.model)
            was_training = model.training
            model.eval()
            try:
                with fork_rng(), torch.no_grad():
                    raw = self.evaluate_fn(model, self.step) or {}
            finally:
                model.train(was_training)
            if not isinstance(raw, Mapping):
                raise TypeError(f"evaluate_fn must return a dict of metrics, got {type(raw).__name__}")
            metrics = {}
            for k, v in raw.items():
                try:
                    metrics[str(k)] = float(v)
                except (TypeError, ValueError):
                    raise TypeError(f"evaluate_fn returned a non-numeric metric {k!r}: {v!r}") from None
            logger.log(self.step, metrics, split="eval")
        metrics = dist_utils.broadcast_object(metrics)
        self.metrics = metrics
        return metrics

    # -- the loop ----------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> dict:
        """Train to `cfg.max_steps` (resuming from the latest checkpoint if `resume`).

        Returns:
            `{"step", "train": last averaged train scalars, "eval": last metrics, "checkpoint"}`.
        """
        cfg, info = self.cfg, self.info
        seed_everything(derive_seed(cfg.seed, 3, info.rank))  # dropout and other training RNG
        # the log starts once the step is known (after a resume): see RunLogger(initial_step=None)
        logger = RunLogger(self.out_dir, cfg.max_steps, initial_step=None, enabled=info.is_main,
                           progress=cfg.progress)
        self._logger = logger
        try:
            if resume:
                self._resume(logger)
            elif info.is_main and self.ckpts.latest() is not None:
                logger.message(f"[train] {self.ckpts.dir} already holds checkpoints; training from scratch "
                               "(pass resume=True / --resume to continue instead)")
            logger.set_step(self.step, self.elapsed_s)
            if self.on_start is not None and info.is_main:
                self.on_start()
            if info.world_size > 1:
                from torch.nn.parallel import DistributedDataParallel as DDP

                self.ddp_model = DDP(self.model, device_ids=[info.device] if info.device.type == "cuda" else None,
                                     find_unused_parameters=cfg.find_unused_parameters)
            self._loop(logger)
        finally:
            self.elapsed_s = logger.elapsed_s
            self._logger = None
            logger.close()
        return {"step": self.step, "train": self.last_train, "eval": self.metrics,
                "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None}

    def _step(self, model: torch.nn.Module, batch: Any, params: list, epoch: int) -> dict[str, torch.Tensor]:
        """Forward, backward and optimizer step on one batch; the step's scalars."""
        cfg = self.cfg
        with torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            out = model(batch)
        loss, scalars = _scalars(out, self.step + 1)
        if not torch.isfinite(loss.detach()).item():
            raise FloatingPointError(
                f"non-finite loss ({loss.item()}) at step {self.step + 1} (epoch {epoch}); weights were "
                f"not updated. Last checkpoint: {self.last_checkpoint or 'none'}. Lower train.lr, set "
                f"train.grad_clip, or check the batch")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            scalars["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).detach().float()
        scalars["lr"] = torch.tensor(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        return scalars

    def _loop(self, logger: RunLogger) -> None:
        cfg, info = self.cfg, self.info
        model = self.ddp_model
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        window: dict[str, list[torch.Tensor]] = defaultdict(list)
        last_eval = -1
        if self.step >= cfg.max_steps:
            logger.message(f"[train] already at step {self.step} >= max_steps={cfg.max_steps}; nothing to train")
        while self.step < cfg.max_steps:
            epoch, skip = divmod(self.step, self.steps_per_epoch)
            loader = build_loader(self.train_set, self.collate_fn, cfg.batch_size, cfg.seed, epoch, info.rank,
                                  info.world_size, skip, cfg.num_workers, pin_memory=info.device.type == "cuda")
            for batch in loader:
                batch = move_to_device(batch, info.device)
                # denormal floats flushed on this thread for the step's torch work only (numerics.py)
                with denormals_flushed(info.device.type == "cpu"):
                    scalars = self._step(model, batch, params, epoch)
                self.step += 1
                for k, v in scalars.items():
                    window[k].append(v)
                logger.step()

                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    local = {k: torch.stack(v).mean().item() for k, v in window.items()}
                    window.clear()
                    self.last_train = dist_utils.all_reduce_mean(local)
                    logger.log(self.step, self.last_train)
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps:
                    self.save_checkpoint()
                if self.evaluate_fn is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                    self.evaluate(logger)
                    last_eval = self.step
                if self.on_step_end is not None:
                    self.on_step_end(self.step, {k: float(v) for k, v in scalars.items()})
                if self.step >= cfg.max_steps:
                    break
        if self.evaluate_fn is not None and last_eval != self.step:
            self.evaluate(logger)


def fit(model: torch.nn.Module, train_set: Dataset, collate_fn: Callable | None, cfg: TrainConfig,
        out_dir: str | Path, evaluate_fn: EvaluateFn | None = None, resume: bool = False, *,
        run_config: Mapping | None = None, on_step_end: StepCallback | None = None,
        on_start: Callable[[], None] | None = None) -> dict:
    """Train `model` on `train_set` (see the module docstring for the contract).

    Args:
        model: returns `{"loss": scalar tensor, ...}` from `model(batch)` in train mode.
        train_set: map-style dataset; `collate_fn` packs a list of its samples into a batch.
        collate_fn: list of samples -> batch (None: torch's default collate).
        cfg: `TrainConfig`.
        out_dir: run folder: `ckpt/`, `tb/`, `log.jsonl`.
        evaluate_fn: `(model, step) -> {name: value}`, every `cfg.eval_every` steps and at the end.
        resume: continue from `out_dir/ckpt/latest.pt` if present (exactly: same weights as an
            uninterrupted run).
        run_config: the task's whole config as a plain dict, stored in checkpoints.
        on_step_end: `(step, scalars)` callback after every optimizer step.
        on_start: called on rank 0 once the run is set up, before the first step (see `Trainer`).

    Returns:
        `{"step": int, "train": {scalar: value}, "eval": {metric: value}, "checkpoint": path}`.
    """
    trainer = Trainer(model, train_set, collate_fn, cfg, out_dir, evaluate_fn, run_config, on_step_end, on_start)
    return trainer.fit(resume=resume)
