"""Seeding, resumable data order and per-sample randomness.

Determinism contract (what makes `fit(..., resume=True)` exact):

* **Order.** Each epoch's order is a permutation drawn from a generator seeded by `(seed, epoch)`
  alone. It is cut into global batches of `batch_size`; rank `r` of `W` takes the slice
  `[r * B/W, (r + 1) * B/W)` of every global batch, so `W` processes together see exactly the
  batches one process would. The last incomplete batch of an epoch is dropped (every rank steps
  in lockstep). A run resumed at global step `s` starts at epoch `s // steps_per_epoch`, skipping
  the first `s % steps_per_epoch` batches without loading them.
* **Per-sample randomness.** Every sample is loaded inside `fork_rng(sample_seed(seed, epoch,
  index))`: Python's `random`, NumPy's global generator and torch's CPU generator are seeded for
  that sample and restored afterwards. A dataset that draws augmentation from those global
  generators is therefore reproducible and resumable, in the main process and in workers alike,
  and loading never disturbs the training RNG (dropout). A dataset that keeps its own generator
  can define `set_epoch(epoch)`; it is called before each epoch's loader is built, and should seed
  from `(its seed, epoch, index)` (as `detection.data.DetectionDataset` does).
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from perception3d.errors import ConfigError

__all__ = [
    "derive_seed",
    "sample_seed",
    "seed_everything",
    "get_rng_state",
    "set_rng_state",
    "fork_rng",
    "ShardedBatchSampler",
    "SeededDataset",
    "build_loader",
    "move_to_device",
]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (NumPy `SeedSequence`); stable across runs and platforms."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed a sample's augmentation uses: a function of `(seed, epoch, index)` only."""
    return derive_seed(seed, 1, epoch, index)


def seed_everything(seed: int) -> None:
    """Seed Python `random`, NumPy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    """The global RNG states (python, numpy, torch CPU, CUDA if present) as tensors and plain types.

    The result loads with `torch.load(weights_only=True)`.
    """
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `get_rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def fork_rng(seed: int | None = None) -> Iterator[None]:
    """Run a block with python/numpy/torch-CPU RNGs seeded by `seed` (if given), then restore them."""
    py, npy, tch = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        if seed is not None:
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(tch)


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's share of each global batch of one epoch, as `(index, sample_seed)` pairs.

    Args:
        num_samples: dataset length.
        batch_size: global batch size (all ranks together); divisible by `world_size`.
        seed: run seed.
        epoch: epoch number (the permutation depends on `(seed, epoch)` only).
        rank, world_size: this process's place.
        skip_batches: number of leading batches to skip (resume mid-epoch).
        shuffle: permute (True) or keep dataset order.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1, skip_batches: int = 0, shuffle: bool = True):
        if batch_size % world_size:
            raise ConfigError(f"train.batch_size={batch_size} (the global batch) must be divisible by the "
                              f"number of processes ({world_size})")
        if num_samples < batch_size:
            raise ConfigError(f"train.batch_size={batch_size} is larger than the dataset ({num_samples} samples)")
        self.num_samples, self.batch_size, self.seed, self.epoch = num_samples, batch_size, seed, epoch
        self.rank, self.world_size, self.skip, self.shuffle = rank, world_size, skip_batches, shuffle

    @staticmethod
    def steps_per_epoch(num_samples: int, batch_size: int) -> int:
        return num_samples // batch_size

    def __len__(self) -> int:
        return max(self.steps_per_epoch(self.num_samples, self.batch_size) - self.skip, 0)

    def order(self) -> list[int]:
        """The epoch's full sample order (identical on all ranks)."""
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(derive_seed(self.seed, 0, self.epoch))
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order()
        per_rank = self.batch_size // self.world_size
        for b in range(self.skip, self.steps_per_epoch(self.num_samples, self.batch_size)):
            start = b * self.batch_size + self.rank * per_rank
            idx = order[start:start + per_rank]
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in idx]


class SeededDataset(Dataset):
    """Wraps a map-style dataset: `ds[(index, seed)]` loads `base[index]` inside `fork_rng(seed)`."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with fork_rng(seed):
            return self.base[index]


def build_loader(dataset: Dataset, collate_fn: Callable | None, batch_size: int, seed: int, epoch: int,
                 rank: int = 0, world_size: int = 1, skip_batches: int = 0, num_workers: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """One epoch's deterministic loader (see the module docstring). Calls `dataset.set_epoch(epoch)`.

    The loader gets its own `torch.Generator`, so creating it does not consume the global torch RNG.
    """
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    sampler = ShardedBatchSampler(len(dataset), batch_size, seed, epoch, rank, world_size, skip_batches)
    return DataLoader(SeededDataset(dataset), batch_sampler=sampler, collate_fn=collate_fn,
                      num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(derive_seed(seed, 2, epoch)))


def move_to_device(obj: Any, device: torch.device | str) -> Any:
    """Move tensors (and anything with a `.to(device)`) inside dicts, lists, tuples and dataclasses."""
    import dataclasses

    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(move_to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to_device(v, device) for v in obj)
    if callable(getattr(obj, "to", None)):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: move_to_device(getattr(obj, f.name), device)
                   for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj
