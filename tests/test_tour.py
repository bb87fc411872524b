"""The Python tour (docs/tour.md) runs as written (in a temporary working directory)."""
from __future__ import annotations

import re
from pathlib import Path

TOUR = Path(__file__).resolve().parents[1] / "docs" / "tour.md"


def test_tour_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", TOUR.read_text(), flags=re.S)
    assert blocks, "docs/tour.md has no ```python block"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, str(TOUR), "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "voxels ->" in out
    assert (tmp_path / "data_cache" / "tour" / "training" / "velodyne" / "000000.bin").is_file()
    assert "Gaussians, PSNR" in out
    assert (tmp_path / "data_cache" / "tour_views" / "trained.ply").is_file()
    err = float(re.search(r"DSVT onnxruntime vs torch: (\S+)", out).group(1))
    assert err <= 1e-4
