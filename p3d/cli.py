"""The `p3d` command: one command line for training, evaluation, benchmarks, the viewer and export.

    p3d train --config configs/quickstart.yaml [--set KEY=VALUE ...] [--out DIR] [--resume]
    p3d eval --config X.yaml --ckpt RUN_OR_FILE [--out DIR]
    p3d bench NAME [--quick]
    p3d view FRAME_OR_FOLDER_OR_PLY [--screenshot out.png]
    p3d export RUN --out weights.safetensors
    p3d quantize --config X.yaml --ckpt WEIGHTS --out INT8.safetensors
    p3d make-synthetic --out DIR --frames N
    p3d compare --out compare.png LABEL=RUN ...

`p3d COMMAND --help` describes each. The scripts in tools/ (`python tools/train.py ...`) run the
same commands. Bad input stops with exit code 2 and one `error:` line.
"""
from __future__ import annotations

import importlib
import sys

# command -> (module with main(argv) -> int, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("p3d.train", "train the experiment a config describes"),
    "eval": ("p3d.eval", "evaluate a checkpoint, run folder or shipped weights file"),
    "bench": ("p3d.bench", "run a benchmark; the last line printed is its JSON"),
    "view": ("p3d.view", "look at a dataset frame, predictions, a run or a .ply (Open3D; --screenshot headless)"),
    "export": ("p3d.export", "export a run's model weights as .safetensors (what the model zoo ships)"),
    "quantize": ("p3d.quantize", "quantize a trained detector to INT8 (LiDAR-PTQ post-training quantization)"),
    "make-synthetic": ("p3d.make_synthetic", "write a seeded synthetic dataset in the KITTI layout"),
    "compare": ("p3d.compare", "compare evaluated detection runs in one picture and one table"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return ("usage: p3d COMMAND [ARGS ...]\n\ncommands:\n" + "\n".join(lines)
            + "\n\n`p3d COMMAND --help` describes a command.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\n" + usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    from perception3d.engine.numerics import flush_torch_workers

    flush_torch_workers()  # before any torch work: torch's worker threads flush denormals (see numerics)
    return importlib.import_module(COMMANDS[name][0]).main(rest)
