"""The HTML report of a detection run or evaluation (`OUT/report.html`, beside `metrics.json`):
the official KITTI table per class, nuScenes' summary, the precision-recall curve each moderate 3D
AP is read from, the training curves of a run, the pictures, and every number in a closed table."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from detection.evaluation import Evaluation  # noqa: E402
from perception3d.engine.report import Report, loss_figure  # noqa: E402

__all__ = ["write_report"]


def _pr_figure(ev: Evaluation, metrics: dict):
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for cls, curves in ev.curves.items():
        precision, recall = curves.precision_recall()
        ap = metrics.get(f"{cls}/3d_R40/moderate")
        label = f"{cls}: AP {ap:.2f}" if isinstance(ap, float) else cls
        if len(recall):
            ax.plot(recall, precision, ".-", ms=3, label=label)
        else:
            ax.plot([], [], label=f"{cls}: no true positive")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision (max over higher recall)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def write_report(out_dir: Path, result: dict, ev: Evaluation, title: str) -> Path:
    """Write `out_dir/report.html` for an evaluation `result` (as metrics.json holds it)."""
    m = result["metrics"]
    data = result.get("data", {})
    subtitle = (f"{result['val_frames']} held-out frames of {data.get('root', '?')} ({data.get('split', '?')}); "
                f"checkpoint {result.get('checkpoint', '?')}")
    r = Report(title, subtitle)
    r.heading("KITTI object detection (official evaluation, AP R40 in %)")
    classes = list(ev.curves)
    header = ["class", "3D easy", "3D moderate", "3D hard", "BEV moderate", "2D moderate", "AOS moderate"]
    keys = ["3d_R40/easy", "3d_R40/moderate", "3d_R40/hard", "bev_R40/moderate", "bbox_R40/moderate",
            "aos_R40/moderate"]
    rows = [[cls, *(m.get(f"{cls}/{k}") for k in keys)] for cls in classes]
    rows.append(["mean", *(m.get(f"mAP/{k}") for k in keys)])
    r.table(header, rows, "3D and BEV at IoU 0.7 (Car) / 0.5 (Pedestrian, Cyclist); the KITTI devkit's rules.")
    if "nuscenes/NDS" in m:
        r.heading("nuScenes detection metrics")
        names = ["mAP", "NDS", "mATE", "mASE", "mAOE", "mAVE", "mAAE"]
        r.table(names, [[m.get(f"nuscenes/{n}") for n in names]],
                "AP over centre distances 0.5/1/2/4 m; error metrics in metres / 1-IoU / radians.")
    r.heading("Precision-recall, moderate 3D")
    r.figure(_pr_figure(ev, m), "The official curve of each class, one point per devkit score threshold: the "
                                "R40 AP is the mean of its precision over threshold positions 1-40 (with few objects "
                                "there are fewer thresholds than positions, and the AP stays below 100 even at "
                                "precision 1).")
    loss = loss_figure(out_dir / "log.jsonl")
    if loss is not None:
        r.heading("Training")
        r.figure(loss, "Training losses (log.jsonl), log scale.")
    pictures = [Path(p) for p in result.get("pictures", []) if Path(p).is_file()]
    if pictures:
        r.heading("Pictures")
        r.note("Bird's-eye view and camera: ground truth green, detections red with their score.")
        for p in pictures:
            r.image(p, p.name)
    r.heading("Every number")
    r.table(["metric", "value"], sorted(m.items()), f"all {len(m)} values of metrics.json", collapsed=True)
    return r.save(out_dir / "report.html")
