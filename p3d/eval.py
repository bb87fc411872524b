"""Evaluate a checkpoint of the experiment a config describes.

    p3d eval --config configs/quickstart.yaml --ckpt outputs/quickstart/ckpt/latest.pt [--out DIR]

(`p3d eval ...` is the same command.)
The config's `task:` selects the experiment (see p3d/tasks.py). `--ckpt` may also be a run
folder (its ckpt/latest.pt is used). The task writes its metrics (and pictures) under OUT;
the last line printed is the metrics as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from perception3d.config import load_config
from perception3d.engine.run import RunFolder
from perception3d.errors import Perception3DError
from p3d.tasks import get_task, task_name_of


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="p3d eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, metavar="X.yaml", help="experiment config (YAML)")
    ap.add_argument("--ckpt", required=True, metavar="C",
                    help="checkpoint file (e.g. outputs/<run>/ckpt/latest.pt) or a run folder")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value (repeatable; VALUE is YAML)")
    ap.add_argument("--data", metavar="PATH", default=None,
                    help="the dataset to use: the same as --set data.root=PATH")
    ap.add_argument("--out", metavar="DIR", default=None,
                    help="where metrics go (default: outputs/<config file stem>/eval)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.data is not None:  # first: an explicit --set data.root wins
        args.overrides.insert(0, f"data.root={args.data}")
    config_path, ckpt = Path(args.config), Path(args.ckpt)
    if not config_path.is_file():
        ap.error(f"--config {config_path}: file not found")
    if not ckpt.exists():
        ap.error(f"--ckpt {ckpt}: no such checkpoint file or run folder")
    if ckpt.is_dir():
        from perception3d.engine.checkpoint import resolve_latest

        found = resolve_latest(ckpt / "ckpt") or resolve_latest(ckpt)
        if found is None:
            ap.error(f"--ckpt {ckpt}: folder has no ckpt/latest.pt")
        ckpt = found
    out_dir = Path(args.out) if args.out else Path("outputs") / config_path.stem / "eval"
    try:
        task = get_task(task_name_of(config_path, args.overrides))
        cfg = load_config(config_path, task.config_cls, args.overrides)
        with RunFolder(out_dir):  # one process writes OUT at a time
            result = task.evaluate(cfg, ckpt, out_dir)
    except Perception3DError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, default=str))
    return 0

