"""tools/compare_runs.py: reads evaluated runs' metrics.json, draws them, tabulates them, and names
the file and field when an input is wrong."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from p3d.compare import main


def _write(folder, metrics, **extra):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"metrics": metrics, **extra}))
    return folder


def test_compare_runs_picture_table_and_json(tmp_path, capsys):
    a = _write(tmp_path / "a", {"Car/3d_R40/moderate": 86.89, "diag/Car/3d_R40_interval95/moderate_low": 86.09,
                                "diag/Car/3d_R40_interval95/moderate_high": 87.70, "Pedestrian/3d_R40/moderate": 80.0})
    b = _write(tmp_path / "b", {"Car/3d_R40/moderate": 80.2, "diag/Car/3d_R40_interval95/moderate_low": 79.08,
                                "diag/Car/3d_R40_interval95/moderate_high": 81.3,
                                "diag/Car/3d_R40_minus_baseline/moderate": -6.69,
                                "diag/Car/3d_R40_minus_baseline/moderate_low": -7.77,
                                "diag/Car/3d_R40_minus_baseline/moderate_high": -5.61,
                                "diag/Car/3d_recall/moderate": 97.3268}, baseline="runs/a/predictions")
    out = tmp_path / "pics" / "cmp.png"
    assert main(["SECOND=" + str(a), f"DSVT={b / 'metrics.json'}", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "| SECOND | 86.9 | 86.1 to 87.7 |  |  |  |" in lines  # no recall in runs evaluated before it
    assert "| DSVT | 80.2 | 79.1 to 81.3 | -6.7 | -7.8 to -5.6 | 97.33 |" in lines
    result = json.loads(lines[-1])
    assert [r["ap"] for r in result["runs"]] == [86.89, 80.2]
    assert [r["recall"] for r in result["runs"]] == [None, 97.3268]
    assert result["runs"][1]["baseline"] == "runs/a/predictions" and result["runs"][0]["baseline"] is None
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 500 and im.height > 100
    assert [p.name for p in out.parent.iterdir()] == ["cmp.png"]  # no temporary file left


def test_compare_runs_other_class(tmp_path, capsys):
    a = _write(tmp_path / "a", {"Car/3d_R40/moderate": 86.9, "Pedestrian/3d_R40/moderate": 58.75})
    assert main([f"A={a}", "--cls", "Pedestrian", "--out", str(tmp_path / "p.png")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"][0]["ap"] == 58.75


@pytest.mark.parametrize("case, message", [
    ("no_equals", "expected LABEL=PATH"),
    ("missing", "nowhere: no such file"),
    ("not_json", "expected a JSON object with a 'metrics' object"),
    ("no_metrics", "expected a JSON object with a 'metrics' object"),
    ("no_class", "no 'Cyclist/3d_R40/moderate' (classes with a moderate 3D AP there: ['Car', 'Pedestrian'])"),
    ("null_ap", "'Pedestrian/3d_R40/moderate' is null (no moderate Pedestrian"),
])
def test_compare_runs_bad_input(tmp_path, capsys, case, message):
    good = _write(tmp_path / "good", {"Car/3d_R40/moderate": 86.9, "Pedestrian/3d_R40/moderate": None})
    spec = {"no_equals": str(good), "missing": f"X={tmp_path / 'nowhere'}", "no_class": f"X={good}",
            "null_ap": f"X={good}"}.get(case)
    if case in ("not_json", "no_metrics"):
        bad = tmp_path / "bad.json"
        bad.write_text("{not json" if case == "not_json" else json.dumps({"pictures": []}))
        spec = f"X={bad}"
    out = tmp_path / "never.png"
    argv = [spec, "--out", str(out)] + {"no_class": ["--cls", "Cyclist"], "null_ap": ["--cls", "Pedestrian"]}.get(case, [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
