"""The end of a sweep: one table of what every job did, failures included, and no run left RUNNING by a worker
that died.

Hydra's basic sweeper runs every job, then raises the first failure (exit code 1) before `on_multirun_end`, so the
table is printed when the process exits, after the last job, whatever happened. With a launcher that runs jobs
in other processes (Ray, SLURM) `on_job_end` runs there and this table stays empty: the MLflow store has it all.

A job whose worker died (a Ray worker or SLURM job killed, out of memory, a node lost) cannot end its own run. When
the sweep's process exits, every run of this sweep still RUNNING is ended FAILED with that reason, unless it is a
SLURM job that the queue still holds (SLURM jobs outlive the process that submitted them).
"""

from __future__ import annotations

import atexit
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

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


ORPHANED = (
    "its worker ended without ending the run (a Ray worker or SLURM job killed, out of memory, or its node lost), or "
    "the sweep stopped before the job finished; marked FAILED by the sweep's process when the sweep ended"
)


def slurm_job_queued(job_id: str) -> bool:
    """Whether SLURM still holds this job (pending or running); False where squeue is missing or does not know it."""
    if not shutil.which("squeue"):
        return False
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    return out.returncode == 0 and bool(out.stdout.strip())


def end_orphaned_runs(client, experiment: str, sweep_dir: str) -> list[str]:
    """End FAILED this sweep's runs still RUNNING (see the module docstring); the ids of the runs ended."""
    from quantbench.tracking import writer  # imports MLflow: only when a sweep ends, not when Hydra loads this

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []

    def lost(tags: dict[str, str]) -> str | None:
        if tags.get("launcher") == "slurm" and slurm_job_queued(tags.get("slurm.job_id", "")):
            return None
        return f"{tags.get('method', 'job')}: {ORPHANED}"

    return writer.end_orphaned_runs(client, exp.experiment_id, lost, "WorkerLost", f"tags.sweep_dir = '{sweep_dir}'")


class SweepSummary(Callback):
    def __init__(self) -> None:
        self.rows: list[JobRow] = []
        self.store: tuple[str, str, str] | None = None  # (tracking uri, experiment, sweep dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.rows.clear()
        tracking = OmegaConf.to_container(config.tracking, resolve=True)
        self.store = (tracking["uri"], tracking["experiment"], str(Path(config.hydra.sweep.dir)))
        atexit.register(self.end_orphans)  # registered first, so it runs after Ray's own exit handler stops workers
        atexit.register(self.report)

    def end_orphans(self) -> None:
        atexit.unregister(self.end_orphans)
        if self.store is None:
            return
        from mlflow.tracking import MlflowClient

        uri, experiment, sweep_dir = self.store
        try:
            end_orphaned_runs(MlflowClient(uri), experiment, sweep_dir)
        except Exception as exc:  # the store unreachable at exit: say so, do not mask the sweep's own outcome
            log.warning("Could not check the sweep's runs for ones left RUNNING (%s: %s)", type(exc).__name__, exc)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode is None or str(config.hydra.mode) != "RunMode.MULTIRUN":
            return
        from quantbench.paths import LOCATION_PREFIXES

        status, detail = describe(job_return)
        overrides = [o for o in job_return.overrides or [] if not o.startswith(LOCATION_PREFIXES)]
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
