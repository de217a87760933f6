"""The evaluation's files: the table as CSV, JSON and Markdown, per-item values, and the
pictures (an image grid per item: source, mask, each row's result; a bar chart per
metric across rows), all referenced from ``report.md``. Every file is written to a
temporary name and renamed into place."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics as M

PICTURES = "pictures"


def format_value(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def _json_value(value: float | None) -> Any:
    if value is None or math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def table_json(result) -> dict:
    return {
        "run": str(result.run_dir),
        "dataset": result.dataset,
        "items": result.items,
        "metrics": result.metrics,
        "labels": {m: M.LABELS.get(m, m) for m in result.metrics},
        "higher_is_better": {m: M.HIGHER_IS_BETTER.get(m, True) for m in result.metrics},
        "rows": [{"variant": row.name, "description": row.description,
                  "run_dir": str(row.run_dir), "n_items": len(row.per_item),
                  "values": {m: _json_value(row.values.get(m)) for m in result.metrics},
                  "n": {m: row.counts[m] for m in result.metrics if m in row.counts},
                  **({"attribute_accuracy": row.attributes} if row.attributes else {})}
                 for row in result.rows],
        "errors": {m: why for m, why in result.errors.items()},
        "skipped": dict(result.skipped),
        "notes": result.notes,
    }


def table_csv(result) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["variant", "n_items"] + result.metrics)
    for row in result.rows:
        writer.writerow([row.name, len(row.per_item)] +
                        [format_value(row.values.get(m)) for m in result.metrics])
    return buf.getvalue()


def items_csv(result) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    per_item = [m for m in result.metrics if m not in ("fid", "is")]
    writer.writerow(["variant", "item"] + per_item)
    for row in result.rows:
        for item_id, values in row.per_item.items():
            writer.writerow([row.name, item_id] + [format_value(values.get(m)) for m in per_item])
    return buf.getvalue()


def _arrow(metric: str) -> str:
    return "↑" if M.HIGHER_IS_BETTER.get(metric, True) else "↓"


def table_markdown(result, pictures: list[tuple[str, Path]], grids: list[tuple[str, Path]]
                   ) -> str:
    out_dir = result.out_dir
    lines = ["# Evaluation", "",
             f"Run: `{result.run_dir}`. {len(result.items)} item(s), the same in every row; "
             "each row is a variant of the workflow run over the same dataset and seeds.", ""]
    header = ["Variant"] + [f"{M.LABELS.get(m, m)} {_arrow(m)}" for m in result.metrics]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * len(result.metrics)) + "|")
    for row in result.rows:
        name = f"{row.name}" + (f" ({row.description})" if row.description else "")
        lines.append("| " + " | ".join([name] + [format_value(row.values.get(m))
                                                for m in result.metrics]) + " |")
    lines.append("")
    if result.errors:
        lines += ["## Not computed", ""]
        for metric, why in result.errors.items():
            text = " ".join(why.split())
            lines.append(f"- **{M.LABELS.get(metric, metric)}**: {text}")
        lines.append("")
    if result.skipped:
        lines += ["## Skipped", ""]
        for metric, why in result.skipped.items():
            lines.append(f"- **{M.LABELS.get(metric, metric)}**: {why}")
        lines.append("")
    if result.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    if pictures:
        lines += ["## Metrics across variants", ""]
        for metric, path in pictures:
            rel = path.relative_to(out_dir).as_posix()
            lines.append(f"![{M.LABELS.get(metric, metric)}]({rel})")
        lines.append("")
    if grids:
        lines += ["## Results per item", "",
                  "Columns: source, mask, then each variant's result.", ""]
        for item_id, path in grids:
            lines += [f"### {item_id}", "", f"![{item_id}]({path.relative_to(out_dir).as_posix()})",
                      ""]
    lines += ["Files: `table.csv`, `table.json`, `items.csv` (per-item values).", ""]
    return "\n".join(lines)


# --- pictures ---------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def bar_chart(result, metric: str, path: Path) -> Path | None:
    values = [result.rows[i].values.get(metric) for i in range(len(result.rows))]
    finite = [v if v is not None and math.isfinite(v) else np.nan for v in values]
    if all(np.isnan(v) for v in finite):
        return None
    plt = _pyplot()
    names = [row.name for row in result.rows]
    fig, ax = plt.subplots(figsize=(max(3.0, 1.1 * len(names) + 1.5), 3.0))
    bars = ax.bar(names, [0 if np.isnan(v) else v for v in finite], color="#4c72b0")
    for bar, raw in zip(bars, values):
        ax.annotate(format_value(raw), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    better = "higher" if M.HIGHER_IS_BETTER.get(metric, True) else "lower"
    ax.set_title(f"{M.LABELS.get(metric, metric)} ({better} is better)", fontsize=10)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.margins(y=0.15)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _thumb(path: Path | None, size: int = 256, mode: str = "RGB") -> np.ndarray:
    from PIL import Image

    if path is None or not Path(path).is_file():
        return np.full((size, size, 3), 0.5, dtype=np.float32)
    with Image.open(path) as im:
        im = im.convert(mode)
        im.thumbnail((size, size))
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return arr


def item_grid(result, item_id: str, path: Path) -> Path:
    plt = _pyplot()
    panels = [("source", _thumb(result.sources.get(item_id))),
              ("mask", _thumb(result.masks.get(item_id), mode="L"))]
    panels += [(row.name, _thumb(row.results.get(item_id))) for row in result.rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.5))
    for ax, (title, image) in zip(np.atleast_1d(axes), panels):
        ax.imshow(image)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(item_id, fontsize=10)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def write_all(result, pictures: bool = True) -> None:
    out = result.out_dir
    files = []
    charts: list[tuple[str, Path]] = []
    grids: list[tuple[str, Path]] = []
    if pictures:
        for metric in result.metrics:
            made = bar_chart(result, metric, out / PICTURES / f"bar_{metric}.png")
            if made is not None:
                charts.append((metric, made))
        for item_id in result.items:
            grids.append((item_id, item_grid(result, item_id,
                                             out / PICTURES / f"grid_{item_id}.png")))
    files += [p for _, p in charts] + [p for _, p in grids]
    files.append(_write_text(out / "table.csv", table_csv(result)))
    files.append(_write_text(out / "table.json",
                             json.dumps(table_json(result), indent=1, ensure_ascii=False) + "\n"))
    files.append(_write_text(out / "items.csv", items_csv(result)))
    files.append(_write_text(out / "report.md", table_markdown(result, charts, grids)))
    result.files = files
