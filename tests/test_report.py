"""HTML reports: written beside metrics.json by every training and evaluation, self-contained, and
shown by a real headless browser (Chromium's screenshot of the page, read back as pixels)."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perception3d.engine.report import Report, format_value

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# as root, without a GPU and with the machine's network closed (scripts/install.sh installs Chromium)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def browser_screenshot(page: Path, out: Path, size=(1100, 1400)) -> np.ndarray:
    if CHROMIUM is None:
        pytest.fail("Chromium is not installed: scripts/install.sh installs it (Debian package chromium)")
    r = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={out.parent / 'chromium-profile'}",
                        f"--window-size={size[0]},{size[1]}", f"--screenshot={out}", page.resolve().as_uri()],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and out.is_file(), r.stderr[-2000:]
    shot = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert shot.shape == (size[1], size[0], 3)
    return shot


def embedded_images(html: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB"))
            for b in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def near(shot: np.ndarray, rgb, tol: int = 12) -> int:
    return int((np.abs(shot - np.asarray(rgb)).max(-1) <= tol).sum())


def test_format_value():
    assert [format_value(v) for v in (None, float("nan"), 3, 2.0, 0.123456, 12345.678, 1e6 + 0.5, True, "x")] == \
        ["n/a", "n/a", "3", "2", "0.1235", "1.235e+04", "1,000,000", "True", "x"]


def test_report_is_one_self_contained_file(tmp_path):
    r = Report("A <title>", "sub")
    r.heading("Numbers")
    r.table(["name", "value"], [["psnr", 30.123456], ["n", 7]])
    r.image(np.full((4, 6, 3), 200, np.uint8), "grey")
    page = r.save(tmp_path / "report.html")
    text = page.read_text()
    assert "A &lt;title&gt;" in text and "<td>30.12</td>" in text and "<td>7</td>" in text
    assert not re.search(r'(src|href)="(?!data:)', text)  # nothing loaded from elsewhere
    assert embedded_images(text)[0].shape == (4, 6, 3)
    assert not list(tmp_path.glob(".*"))  # written through a temporary file, renamed into place


def test_detection_and_splatting_reports_in_a_browser(tmp_path):
    """`p3d eval` of the shipped SECOND on 3 generated frames and a short splatting training: each
    writes report.html beside metrics.json, and Chromium shows its tables and figures."""
    ev = tmp_path / "eval"
    cmd = ["p3d", "eval", "--config", "configs/quickstart.yaml", "--ckpt", "weights/second.safetensors", "--out",
           str(ev), "--set", f"data.root={tmp_path / 'kitti'}", "--set", "data.synthetic.frames=3", "--set",
           "data.synthetic.val_fraction=1.0", "--set", "eval.num_pictures=1", "--set", "eval.real_kitti_root=null"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((ev / "metrics.json").read_text())
    assert result["report"] == str(ev / "report.html")
    html = (ev / "report.html").read_text()
    car = result["metrics"]["Car/3d_R40/moderate"]
    assert f"<td>{format_value(car)}</td>" in html  # the official number in the KITTI table
    images = embedded_images(html)
    assert len(images) == 2  # the precision-recall figure and the picture
    shot = browser_screenshot(ev / "report.html", tmp_path / "detection.png")
    # the precision-recall figure as the browser drew it: matplotlib's first colour (Car's curve)
    assert near(shot, (31, 119, 180)) > 150
    assert (shot.sum(-1) < 300).sum() > 2000  # table text and rules drawn dark on white

    run = tmp_path / "splat"
    cmd = ["p3d", "train", "--config", "configs/splatting/3dgs_quickstart.yaml", "--out", str(run), "--set",
           f"data.root={tmp_path / 'views'}", "--set", "data.synthetic.num_views=8", "--set", "data.synthetic.width=48",
           "--set", "data.synthetic.height=36", "--set", "data.synthetic.num_points=300", "--set", "train.max_steps=60",
           "--set", "train.log_every=10", "--set", "train.progress=false", "--set", "eval.num_renders=1"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    html = (run / "report.html").read_text()
    psnr = json.loads((run / "metrics.json").read_text())["metrics"]["psnr"]
    assert f"<td>{format_value(psnr)}</td>" in html
    loss_plot, row = embedded_images(html)
    assert row.shape == (36, 4 * 48, 3)  # render | ground truth | depth | error
    render_dir = run / "renders" / "step_00000060"
    render = np.asarray(Image.open(next(p for p in render_dir.glob("*.png") if "_" not in p.stem)))
    assert (row[:, :96] == render).all()
    shot = browser_screenshot(run / "report.html", tmp_path / "splatting.png")
    assert near(shot, (31, 119, 180)) > 150  # the loss curve
    depth = row[:, 96:144].reshape(-1, 3)
    covered = depth[depth.sum(-1) > 0]
    assert len(covered) > 0.5 * len(depth)
    # the depth image, shown 5x larger (pixelated): its most common colour covers many screen pixels
    colours, counts = np.unique(covered, axis=0, return_counts=True)
    assert near(shot, colours[counts.argmax()], tol=3) >= 25 * counts.max() * 0.8

