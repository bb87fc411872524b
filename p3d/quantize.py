"""Quantize a trained detector to INT8 after training (LiDAR-PTQ; detection/quant.py).

    p3d quantize --config configs/detection/pointpillars.yaml --ckpt weights/pointpillars.safetensors \
        --out outputs/pointpillars_int8.safetensors [--method lidar-ptq] [--calib-frames 16]

(`python tools/quantize.py ...` is the same command.) The weights must have been trained with the
config's model (checked as `p3d eval` checks them). Calibration runs the model on `--calib-frames`
frames of the training split (evenly spaced through it); `--method`: `lidar-ptq` (the default:
sparsity-based calibration, then adaptive rounding of the dense part's weights with the task-guided
global positive loss, `--steps` steps), `sparse` (the calibration alone), `minmax` or `entropy`
(the baselines), `qat` (the `sparse` calibration, then `--steps` quantization-aware fine-tune steps
on the training split: the costly baseline PTQ is compared with). The INT8 file is evaluated like any weights: `p3d eval --config X.yaml
--ckpt OUT`. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from perception3d.errors import Perception3DError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="p3d quantize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, metavar="X.yaml", help="the detector's config (task: detection)")
    ap.add_argument("--ckpt", required=True, metavar="C", help="trained weights: .safetensors, checkpoint or run folder")
    ap.add_argument("--out", required=True, metavar="OUT.safetensors", help="the INT8 model file to write")
    ap.add_argument("--method", default="lidar-ptq", help="lidar-ptq (default), sparse, minmax, entropy or qat")
    ap.add_argument("--calib-frames", type=int, default=16, metavar="N", help="training frames to calibrate on (default 16)")
    ap.add_argument("--steps", type=int, default=None, metavar="N",
                    help="optimisation steps: lidar-ptq's adaptive rounding (default 64), qat's fine-tune (default 100)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value (repeatable; VALUE is YAML)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    config_path, ckpt, out = Path(args.config), Path(args.ckpt), Path(args.out)
    if not config_path.is_file():
        ap.error(f"--config {config_path}: file not found")
    if not ckpt.exists():
        ap.error(f"--ckpt {ckpt}: no such weights file, checkpoint or run folder")
    if out.suffix != ".safetensors":
        ap.error(f"--out {out}: expected a .safetensors file name")
    if args.calib_frames < 1:
        ap.error(f"--calib-frames must be >= 1, got {args.calib_frames}")
    if args.steps is not None and args.steps < 0:
        ap.error(f"--steps must be >= 0, got {args.steps}")
    from perception3d.config import config_to_dict, load_config
    from perception3d.errors import ConfigError
    from p3d.tasks import get_task, task_name_of

    try:
        task = get_task(task_name_of(config_path, args.overrides))
        if task.name != "detection":
            raise ConfigError(f"{config_path}: task {task.name!r}; quantization is for detectors (task: detection)")
        cfg = load_config(config_path, task.config_cls, args.overrides)
        from detection.quant import PIPELINES

        if args.method not in PIPELINES:
            raise ConfigError(f"--method {args.method!r}: expected one of {', '.join(PIPELINES)}")
        if ckpt.is_dir():
            from perception3d.engine.checkpoint import resolve_latest

            found = resolve_latest(ckpt / "ckpt") or resolve_latest(ckpt)
            if found is None:
                raise ConfigError(f"--ckpt {ckpt}: folder has no ckpt/latest.pt")
            ckpt = found
        result = quantize(cfg, ckpt, out, args.method, args.calib_frames, config_to_dict(cfg), args.steps)
    except Perception3DError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


def quantize(cfg, ckpt: Path, out: Path, method: str, calib_frames: int, config: dict, steps: int | None) -> dict:
    from tqdm import tqdm

    from detection.data import DetectionDataset
    from detection.models.detector import CenterPointDetector
    from detection.quant import default_steps, quantize_model, save_quantized
    from detection.task import load_weights, prepare_data

    model = CenterPointDetector(cfg.model)
    load_weights(ckpt, model, cfg)  # checks the weights' model config first, before any data work
    model.eval()
    root = prepare_data(cfg.data, training=True)
    # qat trains: on the config's augmented training frames; calibration reads them unaugmented
    train_set = DetectionDataset(root, cfg.data.train_split, cfg.model.pc_range_m,
                                 cfg.data.augment if method == "qat" else None)
    steps = default_steps(method) if steps is None else steps
    bar = tqdm(total=min(calib_frames, len(train_set)) + steps, desc=f"quantize ({method})", leave=False)
    done = quantize_model(model, train_set, method, calib_frames, steps, cfg.train.batch_size, cfg.train.seed,
                          progress=bar.update)
    bar.close()
    info = {**done["info"], "source": str(ckpt)}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_quantized(model, out, config, info)
    return {"model": str(out), **info, "mb": round(out.stat().st_size / 1e6, 3),
            "zero_fraction_first_dense": next((round(f["zero_fraction"], 4) for n, f in done["facts"].items()
                                                if n.startswith("bev_backbone")), None)}
