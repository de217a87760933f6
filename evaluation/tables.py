"""The paper's two tables from ``xmgie eval`` results: Table 1 (dataset x IS, FID, LPIPS,
SSIM, PSNR, AA, IPS) and Table 2 (ablation variant x the same metrics, one column group
per dataset, on CUB-200-2011 and CelebA-HQ), each written as CSV, Markdown and LaTeX with
the direction of every metric and the number of items behind every cell.

The tables are read from the ``table.json`` that ``xmgie eval`` writes (``RUN/eval/`` or
its ``--out``); nothing is recomputed here, so a table is exactly the evaluation it cites.
A run without one gets an error naming the ``xmgie eval`` command to run first.

Cells: Markdown and LaTeX show ``0.8120 (n=200)``; CSV keeps the value and its count in
two columns (``AA ↑`` and ``n (AA)``). A metric an evaluation did not compute is ``n/a``
(``--`` in LaTeX), with the evaluation's reason listed under the Markdown table.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

from . import metrics as M
from .evaluate import EvalError
from .report import _arrow, _write_text, format_value

TABLE_METRICS = ("is", "fid", "lpips", "ssim", "psnr", "aa", "ips")
EVAL_FILE = "table.json"
# The paper's names for the datasets the adapters read (others keep their kind).
DATASET_LABELS = {"cub-200-2011": "CUB-200-2011", "oxford-102": "Oxford-102",
                  "ms-coco": "MS-COCO", "coco": "MS-COCO", "celeba-hq": "CelebA-HQ",
                  "celebamask-hq": "CelebA-HQ", "stanford-cars": "Stanford Cars",
                  "deepfashion": "DeepFashion"}


@dataclasses.dataclass
class Evaluation:
    """One ``xmgie eval`` result as the tables read it."""

    label: str
    file: Path
    rows: list[dict]               # table.json's rows: variant, description, values, n
    reasons: dict[str, str]        # metric -> why it is missing (errors and skips)
    notes: list[str] = dataclasses.field(default_factory=list)

    def row(self, variant: str | None = None) -> dict:
        if variant is None:
            return self.rows[0]
        for row in self.rows:
            if row["variant"] == variant:
                return row
        raise EvalError(f"{self.file}: no row '{variant}' (it has "
                        f"{', '.join(r['variant'] for r in self.rows)}); pick one of them "
                        "with --variant")


def _eval_file(path: Path) -> Path:
    path = Path(path)
    for candidate in (path, path / EVAL_FILE, path / "eval" / EVAL_FILE):
        if candidate.is_file():
            return candidate
    raise EvalError(f"{path} has no evaluation ({path / 'eval' / EVAL_FILE} is missing); "
                    f"run `xmgie eval {path}` first (add --variants V.json for Table 2), or "
                    "name the folder that `xmgie eval --out` wrote")


def load_evaluation(spec: str | Path) -> Evaluation:
    """``RUN``, ``RUN/eval``, a ``table.json`` or ``LABEL=`` any of those. The label
    defaults to the dataset's name (the adapter that read it) or the run folder's name."""
    text = str(spec)
    label = None
    if "=" in text and not Path(text).exists():
        label, text = text.split("=", 1)
    file = _eval_file(Path(text))
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        rows = data["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        raise EvalError(f"{file} is not a table.json written by xmgie eval (no 'rows'); "
                        "rerun xmgie eval") from None
    if not rows:
        raise EvalError(f"{file} has no rows; rerun xmgie eval")
    if label is None:
        kind = (data.get("dataset") or {}).get("kind")
        run = Path(data.get("run") or file.parent.parent)
        label = DATASET_LABELS.get(kind or "", None) or \
            (kind if kind not in (None, "manifest", "pie-bench") else run.name)
    reasons = {**(data.get("skipped") or {}), **(data.get("errors") or {})}
    return Evaluation(label=label, file=file, rows=rows, reasons=reasons,
                      notes=list(data.get("notes") or []))


# --- cells -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Cell:
    value: float | None
    n: int | None

    @classmethod
    def of(cls, row: dict, metric: str) -> Cell:
        value = (row.get("values") or {}).get(metric)
        if value in ("inf", "-inf"):
            value = math.inf if value == "inf" else -math.inf
        n = (row.get("n") or {}).get(metric)
        if n is None and value is not None and metric not in ("fid", "is", "aa_ceiling"):
            n = row.get("n_items")  # tables written before the counts were recorded
        return cls(None if value is None else float(value), n)

    def text(self) -> str:
        if self.value is None:
            return "n/a"
        return format_value(self.value) + (f" (n={self.n})" if self.n is not None else "")

    def latex(self) -> str:
        if self.value is None:
            return "--"
        if math.isinf(self.value):
            value = "$\\infty$" if self.value > 0 else "$-\\infty$"
        else:
            value = format_value(self.value)
        return value + (f" {{\\scriptsize (n={self.n})}}" if self.n is not None else "")


def header(metric: str) -> str:
    return f"{M.LABELS.get(metric, metric)} {_arrow(metric)}"


def _latex_escape(text: str) -> str:
    out = []
    for ch in str(text):
        out.append({"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                    "\\": r"\textbackslash{}"}.get(ch, ch))
    return "".join(out)


def _latex_header(metric: str) -> str:
    arrow = "$\\uparrow$" if M.HIGHER_IS_BETTER.get(metric, True) else "$\\downarrow$"
    return f"{_latex_escape(M.LABELS.get(metric, metric))} {arrow}"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _missing(pairs: Sequence[tuple[Evaluation, str]]) -> list[str]:
    """'Not computed' lines ('- CUB-200-2011, AA: why') for (evaluation, metric) pairs."""
    if not pairs:
        return []
    lines = ["Not computed:", ""]
    for ev, metric in pairs:
        why = " ".join(ev.reasons.get(metric, "not in the evaluation").split())
        lines.append(f"- {ev.label}, {M.LABELS.get(metric, metric)}: {why}")
    return lines + [""]


# --- Table 1 ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Table:
    name: str
    csv: str
    markdown: str
    latex: str

    def write(self, out_dir: Path) -> list[Path]:
        out_dir = Path(out_dir)
        return [_write_text(out_dir / f"{self.name}.csv", self.csv),
                _write_text(out_dir / f"{self.name}.md", self.markdown),
                _write_text(out_dir / f"{self.name}.tex", self.latex)]


def _check_metrics(metrics: Sequence[str]) -> list[str]:
    from .evaluate import ALL_METRICS

    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise EvalError(f"--metrics: unknown {', '.join(unknown)}; expected some of "
                        f"{', '.join(ALL_METRICS)}")
    return list(metrics)


def _unique_labels(evaluations: Sequence[Evaluation]) -> None:
    labels = [ev.label for ev in evaluations]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise EvalError(f"two evaluations are both labelled {repeated[0]!r}; name them "
                        "LABEL=RUN on the command line")


def table1(evaluations: Sequence[Evaluation], metrics: Sequence[str] = TABLE_METRICS,
           variant: str | None = None) -> Table:
    """One row per dataset (each evaluation's first row, or ``variant``), one column per
    metric."""
    metrics = _check_metrics(metrics)
    _unique_labels(evaluations)
    cells = {(ev.label, m): Cell.of(ev.row(variant), m) for ev in evaluations for m in metrics}

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["dataset"] + [h for m in metrics
                                   for h in (header(m), f"n ({M.LABELS.get(m, m)})")])
    for ev in evaluations:
        row = [ev.label]
        for m in metrics:
            cell = cells[(ev.label, m)]
            row += [format_value(cell.value), "" if cell.n is None else cell.n]
        writer.writerow(row)

    md = ["# Table 1: every dataset", "",
          "Arrows: ↑ higher is better, ↓ lower is better. n: the items behind each value "
          "(FID and IS: the result images of the set).", "",
          _md_row(["Dataset"] + [header(m) for m in metrics]),
          "|" + "|".join(["---"] + ["---:"] * len(metrics)) + "|"]
    for ev in evaluations:
        md.append(_md_row([ev.label] + [cells[(ev.label, m)].text() for m in metrics]))
    md.append("")
    md += _ceilings(evaluations, variant)
    md += _missing([(ev, m) for ev in evaluations for m in metrics
                    if cells[(ev.label, m)].value is None])
    md += [f"Sources: {', '.join(f'`{ev.file}`' for ev in evaluations)}.", ""]

    tex = [r"% Table 1 (xmgie table1): n = items behind each value",
           r"\begin{tabular}{l" + "r" * len(metrics) + "}", r"\toprule",
           " & ".join(["Dataset"] + [_latex_header(m) for m in metrics]) + r" \\", r"\midrule"]
    for ev in evaluations:
        tex.append(" & ".join([_latex_escape(ev.label)]
                              + [cells[(ev.label, m)].latex() for m in metrics]) + r" \\")
    tex += [r"\bottomrule", r"\end{tabular}", ""]
    return Table("table1", buf.getvalue(), "\n".join(md), "\n".join(tex))


def _ceilings(evaluations: Sequence[Evaluation], variant: str | None) -> list[str]:
    """AA is read against the classifier's accuracy on the unedited images."""
    lines = []
    for ev in evaluations:
        cell = Cell.of(ev.row(variant), "aa_ceiling")
        others = Cell.of(ev.row(variant), "aa_others")
        if cell.value is not None:
            kept = f"; other attributes kept {others.text()}" if others.value is not None else ""
            lines.append(f"- {ev.label}: classifier on the unedited photos "
                         f"{format_value(cell.value)} (n={cell.n} annotated photo-attribute "
                         f"pairs){kept}")
    if lines:
        lines = ["AA's ceiling and the share of other attributes kept:", ""] + lines + [""]
    return lines


# --- Table 2 ---------------------------------------------------------------------------------

def table2(evaluations: Sequence[Evaluation], metrics: Sequence[str] = TABLE_METRICS) -> Table:
    """One row per ablation variant (in the order the evaluations list them), one column
    group per dataset, one column per metric in each group."""
    metrics = _check_metrics(metrics)
    _unique_labels(evaluations)
    variants: dict[str, str] = {}
    for ev in evaluations:
        for row in ev.rows:
            variants.setdefault(row["variant"], row.get("description") or "")
    by_variant = {(ev.label, row["variant"]): row for ev in evaluations for row in ev.rows}

    def cell(ev: Evaluation, variant: str, metric: str) -> Cell:
        row = by_variant.get((ev.label, variant))
        return Cell.of(row, metric) if row is not None else Cell(None, None)

    def name(variant: str) -> str:
        return f"{variant} ({variants[variant]})" if variants[variant] else variant

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["variant", "description"] + [
        h for ev in evaluations for m in metrics
        for h in (f"{ev.label} {header(m)}", f"{ev.label} n ({M.LABELS.get(m, m)})")])
    for variant, description in variants.items():
        row = [variant, description]
        for ev in evaluations:
            for m in metrics:
                c = cell(ev, variant, m)
                row += [format_value(c.value), "" if c.n is None else c.n]
        writer.writerow(row)

    md = ["# Table 2: ablations", "",
          "Rows: variants of the workflow, each run over the same items and seeds. Arrows: "
          "↑ higher is better, ↓ lower is better. n: the items behind each value.", ""]
    for ev in evaluations:
        md += [f"## {ev.label}", "",
               _md_row(["Variant"] + [header(m) for m in metrics]),
               "|" + "|".join(["---"] + ["---:"] * len(metrics)) + "|"]
        for variant in variants:
            md.append(_md_row([name(variant)] + [cell(ev, variant, m).text() for m in metrics]))
        md.append("")
    md += _missing([(ev, m) for ev in evaluations for m in metrics
                    if all(cell(ev, v, m).value is None for v in variants)])
    md += [f"Sources: {', '.join(f'`{ev.file}`' for ev in evaluations)}.", ""]

    k = len(metrics)
    tex = [r"% Table 2 (xmgie table2): n = items behind each value",
           r"\begin{tabular}{l" + ("|" + "r" * k) * len(evaluations) + "}", r"\toprule",
           " & ".join([""] + [f"\\multicolumn{{{k}}}{{c}}{{{_latex_escape(ev.label)}}}"
                              for ev in evaluations]) + r" \\",
           " ".join(f"\\cmidrule(lr){{{2 + i * k}-{1 + (i + 1) * k}}}"
                    for i in range(len(evaluations))),
           " & ".join(["Variant"] + [_latex_header(m) for _ in evaluations for m in metrics])
           + r" \\", r"\midrule"]
    for variant in variants:
        tex.append(" & ".join([_latex_escape(name(variant))] + [
            cell(ev, variant, m).latex() for ev in evaluations for m in metrics]) + r" \\")
    tex += [r"\bottomrule", r"\end{tabular}", ""]
    return Table("table2", buf.getvalue(), "\n".join(md), "\n".join(tex))
