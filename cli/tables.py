"""The ``xmgie table1`` and ``xmgie table2`` commands: the paper's tables from the
results of ``xmgie eval`` (:mod:`xmgie.evaluation.tables`).

    xmgie table1 [LABEL=]RUN ... [--out DIR] [--metrics is,fid,...] [--variant NAME]
    xmgie table2 [LABEL=]RUN ... [--out DIR] [--metrics is,fid,...]

Each RUN is a run folder that ``xmgie eval`` has evaluated (or the folder its ``--out``
named, or that folder's ``table.json``). Table 1 takes one run per dataset, Table 2 the
runs evaluated with ``--variants`` (CUB-200-2011 and CelebA-HQ in the paper).

Exit status: 0 the tables were written; 1 a run has no evaluation or it cannot be read;
2 bad usage.
"""

from __future__ import annotations

import sys
from pathlib import Path

COMMANDS = ("table1", "table2")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parsers(commands) -> None:
    helps = {
        "table1": ("Table 1: dataset x IS, FID, LPIPS, SSIM, PSNR, AA, IPS",
                   "one run per dataset; its first row (the run itself, or the 'full' "
                   "variant listed first), or --variant NAME"),
        "table2": ("Table 2: ablation variant x metrics, a column group per dataset",
                   "runs evaluated with xmgie eval --variants (the paper: CUB-200-2011 "
                   "and CelebA-HQ)"),
    }
    for name, (what, runs) in helps.items():
        p = commands.add_parser(
            name, help=what.lower(),
            description=f"{what}, from the results of xmgie eval, written as CSV, Markdown "
                        "and LaTeX with the direction of each metric and the number of "
                        "items behind each value.",
            epilog="Exit status: 0 written; 1 a run has no evaluation (run xmgie eval "
                   "first) or it cannot be read; 2 bad usage.")
        p.add_argument("runs", nargs="+", metavar="[LABEL=]RUN",
                       help=f"evaluated run folders ({runs}); LABEL names the dataset "
                            "(default: the dataset the run read)")
        p.add_argument("--out", type=Path, default=Path("output") / "tables", metavar="DIR",
                       help=f"where {name}.csv, {name}.md and {name}.tex go "
                            "(default output/tables)")
        p.add_argument("--metrics", default=None,
                       help="comma-separated metrics, in column order (default "
                            "is,fid,lpips,ssim,psnr,aa,ips)")
        if name == "table1":
            p.add_argument("--variant", default=None, metavar="NAME",
                           help="the row of each evaluation to report (default its first)")


def main(args) -> int:
    from ..evaluation import tables
    from ..mgie_core.errors import XMGIEError

    metrics = tables.TABLE_METRICS
    if args.metrics:
        metrics = tuple(m.strip().lower() for m in args.metrics.split(",") if m.strip())
    try:
        evaluations = [tables.load_evaluation(run) for run in args.runs]
        if args.command == "table1":
            table = tables.table1(evaluations, metrics, variant=args.variant)
        else:
            table = tables.table2(evaluations, metrics)
        files = table.write(args.out)
    except XMGIEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE if str(exc).startswith("--metrics") else EXIT_FAILED
    except OSError as exc:         # an unreadable result or an unwritable --out
        print(f"error: {exc.strerror or exc}: {exc.filename or args.out}", file=sys.stderr)
        return EXIT_FAILED
    print(table.markdown.split("\n\n", 1)[1].split("\nSources:")[0].rstrip())
    print(f"Wrote {', '.join(str(f) for f in files)}.")
    return EXIT_OK
