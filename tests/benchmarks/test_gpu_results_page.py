"""docs/gpu-figures.md is generated from the committed stores (benchmarks/gpu_results_page.py), on one basis."""

from __future__ import annotations

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_results_page  # noqa: E402


def test_the_committed_page_is_what_the_stores_give():
    assert gpu_results_page.main(["--check"]) == 0, "run: python benchmarks/gpu_results_page.py"


def test_every_bound_is_the_runs_bytes_at_the_measured_and_the_datasheet_bandwidth():
    store = ROOT / "benchmarks" / "results" / "2026-12-05-h100" / "mlflow.db"
    marlin = [f for f in gpu_results_page.figures(store) if "MarlinLinearKernel" in f.kernel and f.streams == 1]
    (f,) = marlin  # AWQ on Marlin, as that folder's README reports it: 280.7 decode-only, bound 642.5 at 3024 GB/s
    assert (round(f.decode, 1), f.measured_gbs, round(f.bound_measured, 1)) == (280.7, 3024.0, 642.5)
    assert f.measured_from.endswith("2026-12-05-h100/bandwidth.json") and f.datasheet_gbs == 3350.0
    assert round(f.bound_datasheet, 1) == 711.8  # the same bytes at the datasheet's 3350 GB/s


def test_a_run_with_no_measured_bandwidth_in_its_session_shows_none(tmp_path):
    h200 = ROOT / "benchmarks" / "results" / "2026-12-01-h200" / "mlflow.db"
    rows = gpu_results_page.figures(h200)
    assert rows and all(f.measured_gbs is None and f.bound_measured is None for f in rows)
    assert "| — | — | — |" in gpu_results_page.page(rows)


def test_a_run_copied_into_a_later_stretchs_seeded_store_is_listed_once_from_its_first():
    # 2026-12-07-h100-eve's store was seeded with 2026-12-07-h100-pm's: the afternoon's search trials are in both
    order = [p.parent.name for p in gpu_results_page.stores()]
    assert order.index("2026-12-07-h100-pm") < order.index("2026-12-07-h100-eve")
    figures = gpu_results_page.once_per_run([f for s in gpu_results_page.stores() for f in gpu_results_page.figures(s)])
    trials = [f for f in figures if f.run in ("6444323b", "2537216d")]
    assert len(trials) == 4 and {f.store.split("/")[0] for f in trials} == {"2026-12-07-h100-pm"}
