"""A test fixture: a toy regression task, the smallest complete example of a task module.

Not one of the toolkit's tasks: the tests register it (`tests/run_tool.py`), so that a YAML file
holding just `task: toy` (plus any `train:` / `data:` / `model:` overrides) is a complete config:
`python tests/run_tool.py train --config toy.yaml --set train.max_steps=50`. It trains a small
MLP with dropout on noisy samples of a fixed function, with random augmentation drawn from the
global torch and NumPy generators (made reproducible by the engine's per-sample seeding). It is
used by the engine's tests (exact resume, DDP, the command line) and shows what a task module
provides: a config dataclass with `task`, `train: TrainConfig`, and
`train(cfg, out_dir, resume, on_start) -> dict` / `evaluate(cfg, ckpt, out_dir) -> dict`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from torch import nn

from perception3d.config import config_to_dict
from perception3d.engine.checkpoint import load_checkpoint
from perception3d.engine.data import seed_everything
from perception3d.engine.trainer import TrainConfig, fit
from perception3d.errors import ConfigError
from perception3d.io.atomic import atomic_write_text

__all__ = ["ToyDataConfig", "ToyModelConfig", "ToyConfig", "ToyDataset", "ToyMLP", "collate", "train", "evaluate"]


@dataclass(frozen=True)
class ToyDataConfig:
    """Attributes:
        num_samples: training samples.
        val_samples: held-out samples.
        in_dim: input features.
        noise: label noise (fixed per sample).
        augment_noise: std of the input jitter drawn per sample and epoch (0: no augmentation).
        seed: seed of the fixed samples.
    """

    num_samples: int = 48
    val_samples: int = 32
    in_dim: int = 4
    noise: float = 0.05
    augment_noise: float = 0.1
    seed: int = 123

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.val_samples < 1 or self.in_dim < 1:
            raise ConfigError("num_samples, val_samples and in_dim must be >= 1")


@dataclass(frozen=True)
class ToyModelConfig:
    """Attributes: hidden: width of the hidden layer; dropout: dropout probability."""

    hidden: int = 16
    dropout: float = 0.1


@dataclass(frozen=True)
class ToyConfig:
    """A toy experiment."""

    task: Literal["toy"] = "toy"
    data: ToyDataConfig = field(default_factory=ToyDataConfig)
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=20, batch_size=8, lr=0.01,
                                                                   log_every=5, ckpt_every=10, device="cpu"))


class ToyDataset(torch.utils.data.Dataset):
    """Samples `{"x": [D], "y": [1]}` of `y = sin(x . w) + noise`; optional random input jitter."""

    def __init__(self, n: int, in_dim: int, noise: float, augment_noise: float, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, in_dim, generator=g)
        w = torch.linspace(-1.0, 1.0, in_dim)
        self.y = torch.sin(self.x @ w)[:, None] + noise * torch.randn(n, 1, generator=g)
        self.augment_noise = augment_noise

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        x = self.x[index]
        if self.augment_noise > 0:  # draws from the global torch and NumPy generators on purpose
            scale = float(np.random.uniform(0.9, 1.1))
            x = scale * x + self.augment_noise * torch.randn(x.shape)
        return {"x": x, "y": self.y[index]}


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples into `{"x": [B, D], "y": [B, 1]}`."""
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


class ToyMLP(nn.Module):
    """`Linear -> ReLU -> Dropout -> Linear`; `forward(batch)` returns loss (MSE), mae and pred."""

    def __init__(self, in_dim: int, hidden: int = 16, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred = self.net(batch["x"])
        err = pred - batch["y"]
        return {"loss": (err ** 2).mean(), "mae": err.abs().mean().detach(), "pred": pred}


def _build(cfg: ToyConfig) -> tuple[ToyDataset, ToyDataset, ToyMLP]:
    d = cfg.data
    train_set = ToyDataset(d.num_samples, d.in_dim, d.noise, d.augment_noise, d.seed)
    val_set = ToyDataset(d.val_samples, d.in_dim, d.noise, 0.0, d.seed + 1)
    seed_everything(cfg.train.seed)
    model = ToyMLP(d.in_dim, cfg.model.hidden, cfg.model.dropout)
    return train_set, val_set, model


def _metrics(model: nn.Module, val_set: ToyDataset) -> dict[str, float]:
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model({"x": val_set.x.to(device), "y": val_set.y.to(device)})
    return {"val_mse": float(out["loss"]), "val_mae": float(out["mae"])}


def train(cfg: ToyConfig, out_dir: str | Path, resume: bool = False, on_start: Callable[[], None] | None = None) -> dict:
    """Train the toy model; returns `fit`'s summary (`on_start`: see `fit`)."""
    train_set, val_set, model = _build(cfg)
    return fit(model, train_set, collate, cfg.train, out_dir, evaluate_fn=lambda m, step: _metrics(m, val_set),
               resume=resume, run_config=config_to_dict(cfg), on_start=on_start)


def evaluate(cfg: ToyConfig, ckpt: str | Path, out_dir: str | Path) -> dict:
    """Evaluate a checkpoint on the held-out samples; writes `out_dir/metrics.json`."""
    _, val_set, model = _build(cfg)
    state = load_checkpoint(ckpt, model)
    model.eval()
    result = {"step": int(state["step"]), **_metrics(model, val_set)}
    atomic_write_text(Path(out_dir) / "metrics.json", json.dumps(result, indent=2))  # creates the folder
    return result
