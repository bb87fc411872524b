"""Write a seeded synthetic dataset in the KITTI object layout.

    p3d make-synthetic --out data/synthetic --frames 100 --seed 0 [--val-fraction 0.2] [--workers 2]

Frame i is generated from (seed, i): the output does not depend on --workers, and the same seed
writes the same bytes. Read it back with `perception3d.io.kitti.KittiDataset(out, image_set="train")`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


from perception3d.errors import Perception3DError
from perception3d.synthetic.dataset import write_kitti_dataset
from perception3d.synthetic.scene import SceneConfig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="p3d make-synthetic", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="output root (gets training/ and ImageSets/)")
    ap.add_argument("--frames", required=True, type=int, help="number of frames")
    ap.add_argument("--seed", type=int, default=0, help="dataset seed")
    ap.add_argument("--val-fraction", type=float, default=0.2, help="last fraction of frames listed in val.txt")
    ap.add_argument("--workers", type=int, default=1, help="worker processes")
    ap.add_argument("--split", default="training", help="split directory name")
    args = ap.parse_args(argv)
    if args.frames < 1:
        ap.error("--frames must be >= 1")
    if not 0.0 <= args.val_fraction <= 1.0:
        ap.error("--val-fraction must be in [0, 1]")
    t0 = time.perf_counter()
    try:
        ids = write_kitti_dataset(args.out, args.frames, args.seed, SceneConfig(), split=args.split,
                                  val_fraction=args.val_fraction, workers=args.workers, progress=True)
    except Perception3DError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    print(f"wrote {len(ids)} frames to {args.out} in {dt:.1f} s ({dt / len(ids):.2f} s/frame, "
          f"{args.workers} worker(s))")
    return 0

