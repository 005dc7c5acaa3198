"""The end of a sweep: one table of what every job did, failures included.

Hydra's basic sweeper runs every job, then raises the first failure (exit code 1) before `on_multirun_end`, so the
table is printed when the process exits, after the last job, whatever happened. With a launcher that runs jobs
in other processes (Ray, SLURM) `on_job_end` runs there and this table stays empty: the MLflow store has it all.
"""

from __future__ import annotations

import atexit
import logging
from dataclasses import dataclass
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


@dataclass
class JobRow:
    num: int
    overrides: str
    status: str
    detail: str


def describe(job_return: JobReturn) -> tuple[str, str]:
    """(status, detail) of one finished job: its run and outcome, or the first line of its error."""
    if job_return.status == JobStatus.FAILED:
        exc = job_return._return_value
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        notes = "; ".join(getattr(exc, "__notes__", []))
        return "FAILED", f"{type(exc).__name__}: {first[:300]}" + (f" ({notes})" if notes else "")
    outcome = job_return._return_value
    status = getattr(outcome, "status", "FINISHED")
    return status, f"run {getattr(outcome, 'run_id', '?')}"


class SweepSummary(Callback):
    def __init__(self) -> None:
        self.rows: list[JobRow] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.rows.clear()
        atexit.register(self.report)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode is None or str(config.hydra.mode) != "RunMode.MULTIRUN":
            return
        from quantbench.runs import LOCATION_KEYS

        status, detail = describe(job_return)
        overrides = [o for o in job_return.overrides or [] if not o.startswith(LOCATION_KEYS)]
        self.rows.append(JobRow(int(config.hydra.job.num), " ".join(overrides), status, detail))

    def report(self) -> None:
        atexit.unregister(self.report)
        if not self.rows:
            return
        counts = {s: sum(r.status == s for r in self.rows) for s in ("FINISHED", "SKIPPED", "FAILED")}
        width = max(len(r.overrides) for r in self.rows)
        lines = [f"{'job':>3}  {'overrides':<{width}}  {'status':<8}  detail"]
        lines += [f"{r.num:>3}  {r.overrides:<{width}}  {r.status:<8}  {r.detail}" for r in self.rows]
        summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        log.info("Sweep summary (%s):\n%s", summary, "\n".join(lines))
