"""Train the experiment a config describes.

    p3d train --config configs/quickstart.yaml [--set train.lr=0.002 ...] [--resume] [--out DIR]
    p3d train --config configs/splatting/coherentgs_llff.yaml --data nerf_llff_data/fern --views 3
    torchrun --standalone --nproc_per_node=2 tools/train.py --config ...   # data parallel

(`p3d train ...` is the same command.)

The config's `task:` selects the experiment (see p3d/tasks.py). The fully resolved config is
saved to OUT/config.yaml; checkpoints go to OUT/ckpt, TensorBoard events to OUT/tb, the log to
OUT/log.jsonl. The last line printed is the run's summary as one JSON object.

One process owns OUT while it runs (a second one stops with an error). A folder holding an
earlier run is continued only with --resume; bad input stops with exit code 2 and one error line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


from perception3d.config import config_differences, config_to_dict, load_config, save_config
from perception3d.engine.run import RunFolder
from perception3d.errors import ConfigError, Perception3DError
from p3d.tasks import get_task, task_name_of


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="p3d train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, metavar="X.yaml", help="experiment config (YAML)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set train.lr=0.002 (repeatable; VALUE is YAML)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from OUT/ckpt/latest.pt (exactly where it stopped)")
    ap.add_argument("--data", metavar="PATH", default=None,
                    help="the dataset to use: the same as --set data.root=PATH")
    ap.add_argument("--views", metavar="K", type=int, default=None,
                    help="splatting: train on K views picked by the sparse-view rule (first, last, evenly between); "
                         "the same as --set data.train_views=K")
    ap.add_argument("--out", metavar="DIR", default=None,
                    help="run folder (default: outputs/<config file stem>)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    # the shortcuts go first: an explicit --set of the same key wins
    args.overrides[:0] = ([f"data.root={args.data}"] if args.data is not None else []) + (
        [f"data.train_views={args.views}"] if args.views is not None else [])
    config_path = Path(args.config)
    if not config_path.is_file():
        ap.error(f"--config {config_path}: file not found")
    try:
        task = get_task(task_name_of(config_path, args.overrides))
        if args.views is not None and task.name != "splatting":
            raise ConfigError(f"--views {args.views}: only splatting runs train on a number of views; "
                              f"{config_path} is a {task.name} config")
        cfg = load_config(config_path, task.config_cls, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.out) if args.out else Path("outputs") / config_path.stem
    is_main = int(os.environ.get("RANK", "0")) == 0
    run = RunFolder(out_dir, resume=args.resume)
    from perception3d.engine import distributed

    finished = False
    try:
        if is_main:
            run.open()  # owned by this process until it ends; a new run never mixes with an old one
        saved = out_dir / "config.yaml"
        if is_main and args.resume and saved.is_file():
            import yaml

            changed = config_differences(yaml.safe_load(saved.read_text()) or {}, config_to_dict(cfg))
            if changed:
                print("warning: resuming with a config that differs from the run's saved config.yaml:\n  "
                      + "\n  ".join(changed), file=sys.stderr)

        def on_start() -> None:  # written once the run is set up: a failed resume leaves the old one
            save_config(cfg, saved)
            print(f"[train] task {task.name}; config {config_path} -> {saved}", file=sys.stderr)

        result = task.train(cfg, out_dir, resume=args.resume, on_start=on_start if is_main else None)
        finished = True
    except Perception3DError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue the run with: --resume --out {out_dir}", file=sys.stderr)
        return 130
    finally:
        distributed.cleanup(barrier=finished)
        run.close()
    if is_main:
        print(json.dumps(result, default=str))
    return 0

