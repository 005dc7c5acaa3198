"""`make report`: the seed's three tables (memory, accuracy, throughput), its decision matrix and a Pareto plot,
rebuilt from the runs of one sweep in MLflow and logged back as a summary run.

Accuracy differences come with a paired-bootstrap CI over the documents both runs scored, so "−0.3 pp" is
called noise when it is noise. Runs that FAILED, never finished or never ran are listed as such; a missing
number is shown as "—", never as 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from quantbench.errors import ConfigError
from quantbench.study import recommend
from quantbench.study.report import serving
from quantbench.study.report.plot import pareto_plot, plot_points
from quantbench.study.report.summary import log_summary, page
from quantbench.study.report.tables import (
    QUALITY,
    accuracy_table,
    matrix_table,
    memory_table,
    quality_table,
    separation_table,
    throughput_table,
)
from quantbench.study.runs import ROOT, Selection, Store, add_store_args

log = logging.getLogger(__name__)


def build(store: Store, sel: Selection, out: Path) -> list[Path]:
    """Write report.md, one CSV per table, pareto.png and (for bench=serving runs) serving.png into `out`; return the
    files written."""
    out.mkdir(parents=True, exist_ok=True)
    comparisons = store.compare(sel)
    tables = [
        memory_table(sel),
        accuracy_table(sel, comparisons),
        throughput_table(sel),
        matrix_table(recommend.decision_matrix(sel, comparisons)),
    ]
    if any(k in r.metrics for r in sel.rows for k in QUALITY):
        windows = {r.run_id: w["kl_mean"] for r in sel.finished if (w := store.quality_windows(r)) and r.run_id}
        separation = separation_table(sel, windows)
        tables[2:2] = [quality_table(sel, windows)] + ([separation] if separation else [])
    drawn = serving.curves(store, sel)  # runs of bench=serving: their latency-throughput curves
    if drawn:
        tables.append(serving.goodput_table(sel))
    files = [t.write_csv(out / f"{t.name}.csv") for t in tables]
    plotted = plot_points(sel)
    files.append(pareto_plot(sel, plotted, out / "pareto.png"))
    if drawn:
        files.append(serving.curve_plot(drawn, out / "serving.png"))
    (out / "report.md").write_text(page(store, sel, tables, plotted.kind, serving_plot=bool(drawn)))
    files.insert(0, out / "report.md")
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="quantbench report", description=__doc__.split("\n\n")[0])
    add_store_args(p)
    p.add_argument("--out", type=Path, help="output folder (default: reports/<experiment>/ under the repo root)")
    p.add_argument("--no-log", action="store_true", help="write the files only, no summary run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    store = Store(args.tracking_uri)
    try:
        sel = store.select(args.experiment, args.sweep, args.filter, args.baseline)
    except ConfigError as exc:  # no such experiment or sweep: the paragraph, exit 1
        print(exc, file=sys.stderr)
        return 1
    out = args.out or ROOT / "reports" / args.experiment
    files = build(store, sel, out)
    sys.stdout.write((out / "report.md").read_text() + "\n")
    log.info("Wrote %s", ", ".join(str(f) for f in files))
    if not args.no_log:
        run_id = log_summary(store, sel, files)
        log.info("Logged them to summary run %s (report-%s) in experiment %s.", run_id, sel.sweep, sel.experiment)
    return 0
