"""Atomic checkpoints: write a temp file in the same folder, fsync, `os.replace`.

Layout under a run's `ckpt/` folder:

    step_00000100.pt   step_00000200.pt   ...   latest.pt -> step_00000200.pt

`latest.pt` is a relative symlink (a hard link where symlinks are unavailable), replaced
atomically after the new checkpoint is complete, so a process killed at any moment leaves
`latest.pt` pointing at a whole checkpoint. Only the newest `keep_last` step files are kept.

A checkpoint is a dict loadable with `torch.load(weights_only=True)`:
`{"model", "optimizer", "scheduler", "step", "rng", "config", "extra", "format"}`, where `rng` is a
list with one RNG state per rank.

Weights (`export_weights`): a `.safetensors` file of the model's tensors alone (float tensors in
fp16 or fp32), with the run's whole config, its step and where it came from as metadata: what the
model zoo ships. `read_checkpoint` / `load_checkpoint` read it as a checkpoint without optimizer
state, float tensors back in float32.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from perception3d.errors import DataError
from perception3d.io.atomic import atomic_path, fsync_dir

__all__ = ["save_atomic", "CheckpointManager", "load_checkpoint", "read_checkpoint", "resolve_latest",
           "unwrap_model", "export_weights", "FORMAT_VERSION", "WEIGHTS_FORMAT"]

FORMAT_VERSION = 1
WEIGHTS_FORMAT = "perception3d-weights-1"
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")
LATEST = "latest.pt"


def save_atomic(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj)` to `path` so that `path` is either the old file or the complete new one."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def _point_latest(ckpt_dir: Path, target: Path) -> None:
    """Atomically make `ckpt_dir/latest.pt` refer to `target` (same folder)."""
    latest = ckpt_dir / LATEST
    tmp = ckpt_dir / f".{LATEST}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(target.name, tmp)
    except (OSError, NotImplementedError):
        try:
            os.link(target, tmp)
        except OSError:
            save_atomic(torch.load(target, map_location="cpu", weights_only=True), tmp)
    os.replace(tmp, latest)
    fsync_dir(ckpt_dir)


def resolve_latest(ckpt_dir: str | Path) -> Path | None:
    """The checkpoint `latest.pt` refers to (the real step file when it is a link), or None."""
    latest = Path(ckpt_dir) / LATEST
    if not os.path.lexists(latest):
        return None
    if latest.is_symlink():
        target = latest.parent / os.readlink(latest)
        return target if target.exists() else None
    return latest


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a `DistributedDataParallel` / `DataParallel` wrapper (or the model itself)."""
    return getattr(model, "module", model) if isinstance(
        model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) else model


class CheckpointManager:
    """Saves `step_XXXXXXXX.pt` files in `ckpt_dir`, keeps the newest `keep_last`, maintains `latest.pt`.

    Args:
        ckpt_dir: folder for the checkpoints (created).
        keep_last: how many step files to keep (>= 1).
    """

    def __init__(self, ckpt_dir: str | Path, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last

    def step_files(self) -> list[tuple[int, Path]]:
        """Existing step checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = _STEP_RE.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        return resolve_latest(self.dir)

    def save(self, step: int, state: dict) -> Path:
        """Write the checkpoint for `step`, point `latest.pt` at it, then drop the oldest extras."""
        path = save_atomic(state, self.dir / f"step_{step:08d}.pt")
        _point_latest(self.dir, path)
        files = self.step_files()
        for _, old in files[: max(len(files) - self.keep_last, 0)]:
            if old != path:
                old.unlink(missing_ok=True)
        return path


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint file into a dict, with errors that name the file.

    Raises:
        DataError: the file is missing, truncated/corrupt, or not a checkpoint dict.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return _read_weights(path, map_location)
    if path.is_dir():
        latest = resolve_latest(path / "ckpt") or resolve_latest(path)
        if latest is None:
            raise DataError(f"{path}: is a folder without a ckpt/latest.pt or latest.pt checkpoint")
        path = latest
    if not path.exists():
        raise DataError(f"{path}: checkpoint file not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, pickle errors, zipfile errors...
        raise DataError(f"{path}: cannot read checkpoint (truncated or corrupt file?): "
                        f"{type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise DataError(f"{path}: not a perception3d checkpoint (expected a dict with a 'model' entry)")
    return state


def export_weights(checkpoint: str | Path, out: str | Path, dtype: torch.dtype = torch.float16,
                   config: dict | None = None) -> Path:
    """Write a checkpoint's model weights as `out` (`.safetensors`, atomically): float tensors in
    `dtype`, integer ones as they are, the run's config (`config`, else the one stored in the
    checkpoint), step and source as metadata.

    Raises:
        DataError: an unreadable checkpoint, an `out` not ending in `.safetensors`, a `dtype` that
            is not float16 / bfloat16 / float32.
    """
    import json

    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise DataError(f"{out}: expected a .safetensors file name for the weights")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise DataError(f"dtype: expected torch.float16, bfloat16 or float32, got {dtype}")
    state = read_checkpoint(checkpoint)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state["model"].items()}
    meta = {"format": WEIGHTS_FORMAT, "config": json.dumps(config if config is not None else state.get("config") or {}),
            "step": str(state.get("step", "")), "source": Path(checkpoint).name}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return out


def _read_weights(path: Path, map_location) -> dict:
    import json

    from safetensors import safe_open

    if not path.is_file():
        raise DataError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            model = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise DataError(f"{path}: cannot read the weights (truncated or not a safetensors file?): "
                        f"{type(e).__name__}: {e}") from None
    if meta.get("format") != WEIGHTS_FORMAT:
        raise DataError(f"{path}: not perception3d weights (metadata format {meta.get('format')!r}, expected "
                        f"{WEIGHTS_FORMAT!r}; tools/export_weights.py writes them)")
    try:
        config = json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError:
        raise DataError(f"{path}: the config in its metadata is not valid JSON") from None
    model = {k: (v.float() if v.is_floating_point() else v).to(map_location) for k, v in model.items()}
    step = meta.get("step", "")
    return {"model": model, "config": config, "step": int(step) if step.isdigit() else None,
            "format": meta["format"]}


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any | None = None, map_location: str | torch.device = "cpu",
                    strict: bool = True, restore_rng: bool = False) -> dict:
    """Load weights (and optionally optimizer, scheduler and RNG states) from a checkpoint.

    Args:
        path: a checkpoint file, or a run folder / ckpt folder (its `latest.pt` is used).
        model: receives the weights (a DDP wrapper is unwrapped).
        optimizer, scheduler: restored when given.
        map_location: where tensors are loaded.
        strict: require the checkpoint's weights to match the model's parameters exactly.
        restore_rng: also restore python/numpy/torch RNG states saved with the checkpoint.

    Returns:
        The whole checkpoint dict (`step`, `config`, `extra`, ...).

    Raises:
        DataError: missing or corrupt file, or (strict) weights that do not match the model:
            the message lists missing and unexpected keys and shape mismatches.
    """
    state = read_checkpoint(path, map_location)
    target = unwrap_model(model)
    weights = state["model"]
    try:  # load_state_dict first: modules may rename the keys of older checkpoints as they load
        target.load_state_dict(weights, strict=strict)
    except RuntimeError as e:
        own = target.state_dict()
        missing = [k for k in own if k not in weights]
        unexpected = [k for k in weights if k not in own]
        shapes = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in weights and hasattr(weights[k], "shape") and weights[k].shape != own[k].shape]

        def _ls(items: list[str]) -> str:
            return ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "") or "none"

        raise DataError(f"{path}: checkpoint weights do not match {type(target).__name__}: "
                        f"missing keys: {_ls(missing)}; unexpected keys: {_ls(unexpected)}; "
                        f"shape mismatches: {_ls(shapes)}") from e
    if optimizer is not None:
        if state.get("optimizer") is None:
            raise DataError(f"{path}: checkpoint has no optimizer state to resume from")
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and state.get("rng") is not None:
        from perception3d.engine.data import set_rng_state
        from perception3d.engine.distributed import get_rank, get_world_size

        rng = state["rng"]
        if isinstance(rng, (list, tuple)):  # one state per rank
            rng = rng[get_rank()] if len(rng) == get_world_size() else rng[0]
        set_rng_state(rng)
    return state
