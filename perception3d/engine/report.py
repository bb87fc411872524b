"""Self-contained HTML reports: one `report.html` beside each run's or evaluation's `metrics.json`.

A `Report` collects sections (tables, matplotlib figures, images, notes) and writes one HTML file
with everything inline (PNG images as data URLs, CSS in the page): it opens in any browser, offline,
and can be mailed or attached as it is. The tasks decide what goes in (detection/report.py,
splatting/report.py); this module knows nothing of either. `loss_figure` draws the training curves
of a run's `log.jsonl` (`engine.logger.RunLogger` writes it).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from perception3d.io.atomic import atomic_write_text

__all__ = ["Report", "loss_figure", "format_value"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1200px;
       color: #1b1b1f; background: #fff; padding: 0 16px; }
h1 { font-size: 1.5em; margin-bottom: 2px; } h2 { font-size: 1.15em; margin-top: 28px; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; } .note { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 3px 9px; text-align: right; } th { background: #f3f3f6; }
td:first-child, th:first-child { text-align: left; }
figure { margin: 10px 0; } figure img { max-width: 100%; border: 1px solid #eee; image-rendering: pixelated; }
figcaption { color: #555; font-size: 0.9em; } details { margin: 10px 0; } summary { cursor: pointer; }
"""


def format_value(v) -> str:
    """A number as a table shows it: 4 significant digits, integers whole, missing values `n/a`."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e15):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def _png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class Report:
    """An HTML report built section by section, then written with `save`."""

    def __init__(self, title: str, subtitle: str = ""):
        self.title, self.subtitle = title, subtitle
        self._parts: list[str] = []

    def heading(self, text: str) -> None:
        self._parts.append(f"<h2>{html.escape(text)}</h2>")

    def note(self, text: str) -> None:
        self._parts.append(f'<p class="note">{html.escape(text)}</p>')

    def table(self, header: Sequence[str], rows: Sequence[Sequence], caption: str = "",
              collapsed: bool = False) -> None:
        """A table; cells are formatted with `format_value`. `collapsed`: inside a closed <details>."""
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(format_value(c))}</td>" for c in row) + "</tr>"
                       for row in rows)
        table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        if collapsed:
            table = f"<details><summary>{html.escape(caption or 'table')}</summary>{table}</details>"
        elif caption:
            table = f'<p class="note">{html.escape(caption)}</p>' + table
        self._parts.append(table)

    def image(self, image, caption: str = "", width: int | None = None) -> None:
        """An image: a PNG file, PNG bytes, or an `uint8 [H, W, 3]` array; embedded in the page."""
        if isinstance(image, (str, Path)):
            png = Path(image).read_bytes()
        elif isinstance(image, bytes):
            png = image
        else:
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
            png = buf.getvalue()
        style = f' style="width:{int(width)}px"' if width else ""
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self._parts.append(f'<figure><img src="{_png_data_url(png)}" alt="{html.escape(caption)}"{style}>{cap}</figure>')

    def figure(self, fig, caption: str = "") -> None:
        """A matplotlib figure (closed after it is drawn)."""
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        self.image(buf.getvalue(), caption)

    def html(self) -> str:
        sub = f'<p class="sub">{html.escape(self.subtitle)}</p>' if self.subtitle else ""
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>'
                f"<style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>{sub}"
                + "\n".join(self._parts) + "</body></html>\n")

    def save(self, path: str | Path) -> Path:
        """Write the page (atomically: a reader never sees half a report)."""
        path = Path(path)
        atomic_write_text(path, self.html())
        return path


def _read_log(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: the rest of the log still draws
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def loss_figure(log_path: str | Path, keys: Sequence[str] | None = None):
    """The training curves of a run's log.jsonl (every logged `loss*` scalar by default, log scale),
    with the evaluations logged during training on a second axis; None when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log_path = Path(log_path)
    if not log_path.is_file():
        return None
    rows = _read_log(log_path)
    train = [r for r in rows if r.get("split", "train") == "train"]
    keys = keys or sorted({k for r in train for k in r if k.startswith("loss")})  # those logged are drawn
    series = {k: [(r["step"], r[k]) for r in train if isinstance(r.get(k), (int, float)) and r[k] > 0] for k in keys}
    series = {k: v for k, v in series.items() if len(v) >= 2}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for k, pts in series.items():
        steps, values = zip(*pts)
        ax.plot(steps, values, label=k, lw=2.2 if k == "loss" else 1.1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    evals = [r for r in rows if r.get("split") == "eval"]
    metric = next((k for k in ("psnr", "Car/3d_R40/moderate") if any(k in r for r in evals)), None)
    if metric:
        ax2 = ax.twinx()
        pts = [(r["step"], r[metric]) for r in evals if isinstance(r.get(metric), (int, float))]
        ax2.plot(*zip(*pts), "k--o", ms=3, lw=1, label=f"held-out {metric}")
        ax2.set_ylabel(f"held-out {metric}")
        ax2.legend(fontsize=7, loc="upper center")
    fig.tight_layout()
    return fig
