"""Test helper (not a test): train the toy model for a few steps, one process or under torchrun.

    python tests/perception3d/_ddp_toy.py OUT
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/perception3d/_ddp_toy.py OUT

Each rank writes OUT/weights_rank<r>.pt and OUT/result_rank<r>.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: tests.toy_task

from perception3d.engine import TrainConfig, distributed, fit, seed_everything  # noqa: E402
from tests.toy_task import ToyDataset, ToyMLP, collate  # noqa: E402


def main(out: Path) -> None:
    cfg = TrainConfig(seed=0, max_steps=6, batch_size=8, lr=0.01, optimizer="adam", weight_decay=0.0,
                      schedule="cosine", warmup_steps=2, log_every=2, ckpt_every=3, device="cpu", progress=False)
    train_set = ToyDataset(32, 4, 0.05, 0.1, seed=5)  # random augmentation, seeded per sample
    val_set = ToyDataset(16, 4, 0.05, 0.0, seed=6)
    seed_everything(cfg.seed)
    model = ToyMLP(4, hidden=16, dropout=0.0)  # no dropout/batchnorm: DDP == one process on the global batch

    def evaluate_fn(m, step):
        return {"val_mse": float(m({"x": val_set.x, "y": val_set.y})["loss"])}

    finished = False
    try:
        result = fit(model, train_set, collate, cfg, out, evaluate_fn=evaluate_fn)
        rank = distributed.get_rank()
        result["world_size"] = distributed.get_world_size()
        torch.save(model.state_dict(), out / f"weights_rank{rank}.pt")
        (out / f"result_rank{rank}.json").write_text(json.dumps(result))
        finished = True
    finally:
        distributed.cleanup(barrier=finished)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
