"""Compare evaluated detection runs in one picture and one table.

    p3d compare --out compare.png "SECOND=outputs/second_test1000" \
        "DSVT=outputs/dsvt_test1000" [--cls Car]

Each RUN is LABEL=PATH, PATH a metrics.json written by tools/eval.py or tools/train.py, or the
folder holding one. For the class, the picture shows each run's moderate 3D AP (R40) with its 95%
interval over frames. Prints them as a Markdown table, with a run's difference to the model it was
evaluated against (`eval.baseline`) and its paired interval where it has one, and the highest recall
of its moderate 3D curve (`3d_recall`, in runs evaluated since tools/eval.py reports it: a recall just
below a multiple of 2.5 % costs an R40 position); the last line is one JSON object of the numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from perception3d.errors import DataError


def read_run(spec: str, cls: str) -> dict:
    """One run's numbers for `cls` from `LABEL=PATH`; a bad spec, file or key raises `DataError`."""
    label, sep, path = spec.partition("=")
    if not (sep and label and path):
        raise DataError(f"run {spec!r}: expected LABEL=PATH (PATH a metrics.json or its folder)")
    file = Path(path)
    if file.is_dir():
        file = file / "metrics.json"
    if not file.is_file():
        raise DataError(f"{file}: no such file (expected a metrics.json of tools/eval.py or its folder)")
    try:
        data = json.loads(file.read_text())
        metrics = data.get("metrics")
    except (json.JSONDecodeError, AttributeError) as e:
        metrics = f"{type(e).__name__}: {e}"
    if not isinstance(metrics, dict):
        raise DataError(f"{file}: expected a JSON object with a 'metrics' object, as tools/eval.py writes "
                        f"(got {metrics!r:.80})")
    key = f"{cls}/3d_R40/moderate"
    if key not in metrics:
        present = sorted({k.split("/")[0] for k in metrics if k.endswith("/3d_R40/moderate")})
        raise DataError(f"{file}: no {key!r} (classes with a moderate 3D AP there: {present})")
    if metrics[key] is None:
        raise DataError(f"{file}: {key!r} is null (no moderate {cls} in that run's held-out frames)")

    def get(name: str) -> float | None:  # a diagnostic beside the official AP
        v = metrics.get(f"diag/{cls}/{name}")
        return None if v is None else float(v)

    return {"label": label, "file": str(file), "ap": float(metrics[key]),
            "ap_low": get("3d_R40_interval95/moderate_low"), "ap_high": get("3d_R40_interval95/moderate_high"),
            "minus_baseline": get("3d_R40_minus_baseline/moderate"),
            "minus_baseline_low": get("3d_R40_minus_baseline/moderate_low"),
            "minus_baseline_high": get("3d_R40_minus_baseline/moderate_high"), "recall": get("3d_recall/moderate"),
            "baseline": data.get("baseline")}


def _fmt(v: float | None, sign: bool = False) -> str:
    return "" if v is None else (f"{v:+.1f}" if sign else f"{v:.1f}")


def markdown_table(rows: list[dict], cls: str) -> str:
    lines = [f"| run | {cls} 3D AP (R40, moderate) | 95% interval | minus its eval.baseline | paired 95% interval "
             "| highest recall, % |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        iv = f"{_fmt(r['ap_low'])} to {_fmt(r['ap_high'])}" if r["ap_low"] is not None else ""
        div = (f"{_fmt(r['minus_baseline_low'], True)} to {_fmt(r['minus_baseline_high'], True)}"
               if r["minus_baseline_low"] is not None else "")
        rec = "" if r["recall"] is None else f"{r['recall']:.2f}"
        lines.append(f"| {r['label']} | {_fmt(r['ap'])} | {iv} | {_fmt(r['minus_baseline'], True)} | {div} | {rec} |")
    return "\n".join(lines)


def draw(rows: list[dict], cls: str, out: Path, title: str = "") -> None:
    """Each run's moderate 3D AP with its 95% interval over frames, one row per run, first on top."""
    from detection.viz import plt, save_figure  # viz selects the non-interactive Agg backend

    n = len(rows)
    fig, ax = plt.subplots(figsize=(8, 0.42 * n + 1.3))
    for y, r in zip(range(n - 1, -1, -1), rows):
        err = None if r["ap_low"] is None else [[r["ap"] - r["ap_low"]], [r["ap_high"] - r["ap"]]]
        ax.errorbar(r["ap"], y, xerr=err, fmt="o", color="tab:blue", capsize=3)
        ax.annotate(f"{r['ap']:.1f}", (r["ap"], y), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=8)
    ax.set_yticks(range(n - 1, -1, -1), [r["label"] for r in rows])
    ax.set_ylim(-0.7, n - 0.2)
    ax.set_xlabel(f"{cls} 3D AP (R40, moderate) with its 95% interval over frames")
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, out)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="p3d compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="LABEL=PATH", help="an evaluated run (repeatable)")
    ap.add_argument("--cls", default="Car", help="class to compare (default: Car)")
    ap.add_argument("--out", required=True, metavar="X.png", help="where the picture goes")
    ap.add_argument("--title", default="", help="title above the picture")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows = [read_run(spec, args.cls) for spec in args.runs]
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    draw(rows, args.cls, Path(args.out), args.title)
    print(markdown_table(rows, args.cls))
    print(f"picture: {args.out}")
    print(json.dumps({"cls": args.cls, "picture": str(args.out), "runs": rows}))
    return 0

