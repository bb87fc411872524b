"""The training engine: loop, checkpoints, logging, distributed (see `trainer` for the contract).

Public API:
    TrainConfig, Trainer, fit                         - perception3d.engine.trainer
    load_checkpoint, read_checkpoint, save_atomic,
    CheckpointManager, resolve_latest, unwrap_model   - perception3d.engine.checkpoint
    seed_everything, derive_seed, sample_seed, fork_rng,
    ShardedBatchSampler, build_loader, move_to_device - perception3d.engine.data
    build_optimizer, build_scheduler, LRFactor        - perception3d.engine.optim
    RunLogger                                          - perception3d.engine.logger
    flush_torch_workers, denormals_flushed             - perception3d.engine.numerics
    RunFolder                                          - perception3d.engine.run
    distributed                                        - init_distributed, barrier, all_reduce_mean, ...
"""
from perception3d.engine import distributed
from perception3d.engine.checkpoint import (CheckpointManager, load_checkpoint, read_checkpoint, resolve_latest,
                                            save_atomic, unwrap_model)
from perception3d.engine.data import (ShardedBatchSampler, build_loader, derive_seed, fork_rng, move_to_device,
                                      sample_seed, seed_everything)
from perception3d.engine.logger import RunLogger
from perception3d.engine.numerics import denormals_flushed, flush_torch_workers
from perception3d.engine.run import RunFolder
from perception3d.engine.optim import LRFactor, build_optimizer, build_scheduler
from perception3d.engine.trainer import TrainConfig, Trainer, fit

__all__ = [
    "TrainConfig", "Trainer", "fit",
    "load_checkpoint", "read_checkpoint", "save_atomic", "CheckpointManager", "resolve_latest", "unwrap_model",
    "seed_everything", "derive_seed", "sample_seed", "fork_rng", "ShardedBatchSampler", "build_loader",
    "move_to_device",
    "build_optimizer", "build_scheduler", "LRFactor",
    "RunLogger", "distributed", "flush_torch_workers", "denormals_flushed", "RunFolder",
]
