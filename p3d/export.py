"""Export a run's model weights as a `.safetensors` file (what the model zoo ships).

    p3d export outputs/second --out weights/second.safetensors [--fp32]

RUN is a checkpoint file or a run folder (its ckpt/latest.pt). Float tensors are written in fp16
(fp32 with --fp32), with the run's config (the run folder's config.yaml, else the one stored in
the checkpoint), step and source as metadata; `p3d eval --ckpt
FILE.safetensors` evaluates them, after checking that the config given matches the one stored.
The last line printed is one JSON object: the file, its size and its tensor count.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from perception3d.errors import Perception3DError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="p3d export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", metavar="RUN", help="checkpoint file or run folder")
    ap.add_argument("--out", required=True, metavar="FILE.safetensors", help="weights file to write")
    ap.add_argument("--fp32", action="store_true", help="keep float tensors in fp32 (default: fp16)")
    args = ap.parse_args(argv)
    import torch

    from perception3d.engine.checkpoint import export_weights, read_checkpoint

    run_config = Path(args.run) / "config.yaml"
    try:
        config = None
        if run_config.is_file():
            import yaml

            config = yaml.safe_load(run_config.read_text())
        out = export_weights(args.run, args.out, torch.float32 if args.fp32 else torch.float16, config)
        n = len(read_checkpoint(out)["model"])
    except Perception3DError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"weights": str(out), "mb": round(out.stat().st_size / 1e6, 3), "tensors": n}))
    return 0

