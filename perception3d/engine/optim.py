"""Optimizer and learning-rate schedule from a `TrainConfig`.

Schedules are pure functions of the step (`lr = cfg.lr * lr_factor(step)`), wrapped in a
`LambdaLR` so their state is just the step count and resumes exactly:

* `constant`: 1 after warmup.
* `cosine`: after `warmup_steps` of linear warmup, cosine from 1 down to `min_lr_ratio`.
* `onecycle`: cosine ramp from `1/div_factor` up to 1 over `warmup_steps` (30% of the run when
  `warmup_steps` is 0), then cosine down to `1/(div_factor * final_div_factor)` (the learning-rate
  part of OneCycleLR as used by OpenPCDet; momentum is not cycled).

Linear warmup (constant, cosine) goes from `1/warmup_steps` to 1 over `warmup_steps` steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from perception3d.engine.trainer import TrainConfig

__all__ = ["LRFactor", "build_optimizer", "build_scheduler"]


@dataclass
class LRFactor:
    """Multiplier of the base learning rate at a step (picklable; see module docstring)."""

    schedule: str
    max_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    div_factor: float = 10.0
    final_div_factor: float = 1e4

    def __call__(self, step: int) -> float:
        step = min(step, self.max_steps)
        if self.schedule == "onecycle":
            up = self.warmup_steps or max(int(0.3 * self.max_steps), 1)
            start, low = 1.0 / self.div_factor, 1.0 / (self.div_factor * self.final_div_factor)
            if step < up:
                t = step / up
                return start + (1.0 - start) * 0.5 * (1.0 - math.cos(math.pi * t))
            t = (step - up) / max(self.max_steps - up, 1)
            return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * t))
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "cosine":
            t = (step - self.warmup_steps) / max(self.max_steps - self.warmup_steps, 1)
            return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
        raise ValueError(f"unknown schedule {self.schedule!r}")


def build_optimizer(model: torch.nn.Module, cfg: "TrainConfig") -> torch.optim.Optimizer:
    """AdamW / Adam / SGD over the model's trainable parameters.

    Weight decay is applied to parameters with 2 or more dimensions only (not to biases and norm
    scales), the usual convention.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: "TrainConfig") -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` applying `LRFactor` for `cfg` (step it once per optimizer step).

    The factor is passed as a plain function, so the scheduler's state dict holds only the step
    count: a run resumed with a changed schedule (say a larger `max_steps`) follows the new one.
    """
    factor = LRFactor(cfg.schedule, cfg.max_steps, cfg.warmup_steps, cfg.min_lr_ratio,
                      cfg.div_factor, cfg.final_div_factor)

    def lr_lambda(step: int) -> float:
        return factor(step)

    lr_lambda.factor = factor  # type: ignore[attr-defined]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
