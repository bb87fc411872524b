"""The KITTI devkit's python port (the `kitti_object_eval_python` of OpenPCDet, as shipped in
mmdetection3d 1.4.0, Apache-2.0) as a test oracle, loaded from files, never imported as a package.

`scripts/install.sh` puts the mmdet3d wheel's files (without its dependencies: only the two pure
numba files below are used) under `~/.cache/perception3d/oracles/mmdet3d-1.4.0`;
`$P3D_MMDET3D_ROOT` overrides the folder. Tests that need it skip with a reason without it.

Its rotated IoU is a numba CUDA kernel: `devkit_ap(..., cuda_sim=True)` runs the whole port in a
subprocess under numba's CUDA simulator (slow: small inputs only); `cuda_sim=False` replaces that
one kernel by a float64 CPU function (`_rotate_iou_cpu`, the same geometry) and runs everything
else of the port in this process, so that larger inputs can be compared.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(os.environ.get("P3D_MMDET3D_ROOT", Path.home() / ".cache" / "perception3d" / "oracles" / "mmdet3d-1.4.0"))
PORT = ROOT / "mmdet3d" / "evaluation" / "functional" / "kitti_utils"
SKIP_REASON = (f"the KITTI devkit's python port is not at {PORT} (scripts/install.sh puts it there: "
               "pip install --no-deps --target ... mmdet3d==1.4.0)")


def available() -> bool:
    return (PORT / "eval.py").is_file() and (PORT / "rotate_iou.py").is_file()


def _rotate_iou_cpu(boxes, qboxes, criterion=-1):
    """The port's `rotate_iou_gpu_eval` on the CPU: boxes `(x, y, w, h, angle)` with corners
    `R(-angle) (±w/2, ±h/2) + centre`; criterion -1 IoU, 2 intersection area."""
    import torch

    from perception3d.geometry.iou import bev_intersection_area

    def as7(b):
        b = np.asarray(b, np.float64).reshape(-1, 5)
        return torch.from_numpy(np.stack([b[:, 0], b[:, 1], np.zeros(len(b)), b[:, 2], b[:, 3], np.ones(len(b)),
                                          -b[:, 4]], 1))

    a, q = as7(boxes), as7(qboxes)
    inter = bev_intersection_area(a, q).numpy() if len(a) and len(q) else np.zeros((len(a), len(q)))
    if criterion == 2:
        return inter.astype(np.float32)
    area_a = (a[:, 3] * a[:, 4]).numpy()[:, None]
    area_q = (q[:, 3] * q[:, 4]).numpy()[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(inter > 0, inter / (area_a + area_q - inter), 0.0).astype(np.float32)


def load_port(cuda_sim: bool):
    """The port's `eval` module (with the CPU IoU unless `cuda_sim`)."""
    pkg = types.ModuleType("kitti_devkit_port")
    pkg.__path__ = [str(PORT)]
    sys.modules["kitti_devkit_port"] = pkg
    if cuda_sim:
        spec = importlib.util.spec_from_file_location("kitti_devkit_port.rotate_iou", PORT / "rotate_iou.py")
        rot = importlib.util.module_from_spec(spec)
        sys.modules["kitti_devkit_port.rotate_iou"] = rot
        spec.loader.exec_module(rot)
    else:
        rot = types.ModuleType("kitti_devkit_port.rotate_iou")
        rot.rotate_iou_gpu_eval = _rotate_iou_cpu
        sys.modules["kitti_devkit_port.rotate_iou"] = rot
    spec = importlib.util.spec_from_file_location("kitti_devkit_port.eval", PORT / "eval.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kitti_devkit_port.eval"] = mod
    spec.loader.exec_module(mod)
    return mod


def to_anno(labels) -> dict:
    """A `KittiLabels` as the port's annotation dict (dimensions l, h, w as its label reader)."""
    n = len(labels)
    return {"name": np.asarray(labels.names).astype(str), "truncated": np.asarray(labels.truncated, np.float64),
            "occluded": np.asarray(labels.occluded, np.int64), "alpha": np.asarray(labels.alpha, np.float64),
            "bbox": np.asarray(labels.bbox2d, np.float64).reshape(n, 4),
            "dimensions": np.asarray(labels.dims_hwl, np.float64).reshape(n, 3)[:, [2, 0, 1]],
            "location": np.asarray(labels.loc_cam, np.float64).reshape(n, 3),
            "rotation_y": np.asarray(labels.rotation_y, np.float64),
            "score": np.asarray(labels.score if labels.score is not None else np.zeros(n), np.float64)}


_CLASS_ID = {"Car": 0, "Pedestrian": 1, "Cyclist": 2}
_METRIC_ID = {"bbox": 0, "bev": 1, "3d": 2}


def _run(annos_gt, annos_dt, classes, metrics, overlaps, cuda_sim) -> dict:
    port = load_port(cuda_sim)
    out = {}
    for metric in metrics:
        # min_overlaps [num_overlap=1, metric=3, class]: the benchmark's thresholds
        mo = np.array([[[overlaps[c][m] for c in classes] for m in ("bbox", "bev", "3d")]])
        ret = port.eval_class(annos_gt, annos_dt, [_CLASS_ID[c] for c in classes], [0, 1, 2], _METRIC_ID[metric],
                              mo, compute_aos=metric == "bbox")
        r40, r11 = port.get_mAP40(ret["precision"]), port.get_mAP11(ret["precision"])
        a40, a11 = port.get_mAP40(ret["orientation"]), port.get_mAP11(ret["orientation"])
        for ci, c in enumerate(classes):
            out.setdefault(c, {})[metric] = {"R40": r40[ci, :, 0].tolist(), "R11": r11[ci, :, 0].tolist()}
            if metric == "bbox":
                out[c]["aos"] = {"R40": a40[ci, :, 0].tolist(), "R11": a11[ci, :, 0].tolist()}
    return out


def devkit_ap(gt, dt, classes=("Car", "Pedestrian", "Cyclist"), metrics=("bbox", "bev", "3d"), overlaps=None,
              cuda_sim=False) -> dict:
    """`{cls: {metric: {"R40": [easy, moderate, hard], "R11": [...]}, "aos": {...}}}` from the port."""
    from perception3d.metrics.kitti import MIN_OVERLAP

    overlaps = overlaps or MIN_OVERLAP
    annos_gt, annos_dt = [to_anno(g) for g in gt], [to_anno(d) for d in dt]
    if not cuda_sim:
        return _run(annos_gt, annos_dt, list(classes), list(metrics), overlaps, False)
    payload = {"gt": [{k: v.tolist() for k, v in a.items()} for a in annos_gt],
               "dt": [{k: v.tolist() for k, v in a.items()} for a in annos_dt],
               "classes": list(classes), "metrics": list(metrics), "overlaps": overlaps}
    code = (f"import json, sys, numpy as np; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "import kitti_devkit as k; p = json.load(sys.stdin); "
            "arr = lambda a: {key: np.asarray(v, dtype=object if key == 'name' else float) for key, v in a.items()}; "
            "g = [arr(a) for a in p['gt']]; d = [arr(a) for a in p['dt']]; "
            "[a.update(name=a['name'].astype(str), occluded=a['occluded'].astype(np.int64), "
            "bbox=a['bbox'].reshape(-1, 4), dimensions=a['dimensions'].reshape(-1, 3), "
            "location=a['location'].reshape(-1, 3)) for a in g + d]; "
            "print(json.dumps(k._run(g, d, p['classes'], p['metrics'], p['overlaps'], True)))")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-c", code], input=json.dumps(payload), capture_output=True, text=True,
                       env=env, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"the devkit port failed under the CUDA simulator:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])
