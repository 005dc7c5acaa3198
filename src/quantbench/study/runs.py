"""Reading a sweep back from MLflow: the one place report, registry and recommend get their runs from.

Every consumer needs the same things: the runs of one sweep (summary runs excluded), one comparable label
per run, the FP16 baseline, and the paired per-task accuracy differences against it. Runs that FAILED, never
finished, or were expected by the sweep but logged nothing stay in the selection as such, so that nothing
downstream can silently turn them into zeros.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from quantbench.study import stats
from quantbench.errors import ConfigError
from quantbench.names import (
    MEM_BASIS_TAG,
    PER_WINDOW,
    QUALITY_WINDOWS_TAG,
    RESUMED_TAG,
    SAMPLES,
    SEARCH_STUDY_TAG,
    SEARCH_TRIAL_TAG,
    stream_label,
)  # noqa: F401  (read from runs too)
from quantbench.paths import LOCATION_PREFIXES, ROOT

log = logging.getLogger(__name__)

SUMMARY_TAG = "quantbench.summary"
ALL_SWEEPS = "all"
DEFAULT_URI = f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}"
_ACC = re.compile(r"^(?P<task>.+)_acc$")
_TPS = re.compile(r"^tokens_per_s_(?P<n>\d+)_streams?$")
# What a run misses when one of its JSON artifacts cannot be read
ARTIFACT_CONSEQUENCE = {
    SAMPLES: "its accuracy differences fall back to unpaired intervals from the two standard errors",
    PER_WINDOW: "its KL interval and its place in the KL separation table are left out",
}


@dataclass
class RunRow:
    """One run of the sweep, or a placeholder for a job the sweep expected but that logged no run."""

    run_id: str | None
    method: str
    status: str  # FINISHED, FAILED, RUNNING, KILLED, SCHEDULED, or MISSING
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifact_uri: str | None = None
    start_time: int = 0
    label: str = ""
    # metrics logged as NaN or infinity: not measurements, so they are not in `metrics` and pass no constraint
    invalid: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_run(cls, run: Run) -> "RunRow":
        tags = dict(run.data.tags)
        method = tags.get("method") or run.data.params.get("method.name") or run.info.run_name or "?"
        logged = dict(run.data.metrics)
        return cls(
            run.info.run_id,
            method,
            run.info.status,
            {k: v for k, v in logged.items() if math.isfinite(v)},
            dict(run.data.params),
            tags,
            run.info.artifact_uri,
            run.info.start_time or 0,
            label=method,
            invalid={k: v for k, v in logged.items() if not math.isfinite(v)},
        )

    def why_missing(self, name: str) -> str:
        """Why the run has no usable `name`: logged as NaN or infinity, or not logged at all."""
        return f"{name} is {self.invalid[name]} (not a measurement)" if name in self.invalid else f"no {name}"

    @property
    def ok(self) -> bool:
        return self.status == "FINISHED"

    @property
    def failure_reason(self) -> str | None:
        return self.tags.get("failure_reason")

    @property
    def status_text(self) -> str:
        """What the tables show instead of numbers a run does not have."""
        if self.status == "FAILED":
            return f"FAILED: {self.failure_reason or 'no reason logged'}"
        if self.status == "MISSING":
            return "MISSING: the sweep expected this job but it logged no run"
        if self.status in ("RUNNING", "SCHEDULED"):
            return f"UNFINISHED ({self.status}: still running, or killed before it could end)"
        return self.status

    def short_status(self, limit: int = 160) -> str:
        """One line for a table cell or a log line: the reason's start and its last line (usually the exception)."""
        text = self.status_text
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if len(text) <= limit and len(lines) <= 1:
            return text
        last = lines[-1][: limit // 2] if len(lines) > 1 else ""
        return " ".join(text[: limit - len(last) - 2].split()) + "… " + last

    @property
    def short_id(self) -> str:
        return self.run_id[:8] if self.run_id else "—"

    @property
    def tasks(self) -> list[str]:
        """The tasks this run was asked to evaluate (config), else those it has accuracies for."""
        try:
            listed = json.loads(self.params.get("eval.tasks", "null"))
        except json.JSONDecodeError:
            listed = None
        if isinstance(listed, list) and listed:
            return [str(t) for t in listed]
        return sorted(m["task"] for k in self.metrics if (m := _ACC.match(k)))

    @property
    def random_weights(self) -> bool:
        """A random-weight architecture (model=llama-3.1-8b-shape): its speed and size count, its accuracy is chance."""
        return self.tags.get("weights") == "random"

    def acc(self, task: str) -> float | None:
        """The task's accuracy; with calibration repeats and no single value, their mean. None for random weights:
        chance-level numbers are not results."""
        if self.random_weights:
            return None
        value = self.metrics.get(f"{task}_acc")
        return value if value is not None else self.metrics.get(f"{task}_acc_mean")

    def mean_acc(self, tasks: list[str] | None = None) -> float | None:
        """Mean accuracy over tasks; None unless every task has one (a partial mean would flatter a run)."""
        values = [self.acc(t) for t in (tasks or self.tasks)]
        if not values or any(v is None for v in values):
            return None
        return sum(values) / len(values)

    def mean_acc_stderr(self, tasks: list[str] | None = None) -> float | None:
        errs = [self.metrics.get(f"{t}_acc_stderr") for t in (tasks or self.tasks)]
        if not errs or any(e is None for e in errs):
            return None
        return sum(e * e for e in errs) ** 0.5 / len(errs)

    @property
    def streams(self) -> list[int]:
        return sorted(int(m["n"]) for k in self.metrics if (m := _TPS.match(k)))

    def tokens_per_s(self, n: int = 1) -> float | None:
        return self.metrics.get(f"tokens_per_s_{stream_label(n)}")

    @property
    def speed_basis(self) -> str:
        """What its tokens/s were measured with: the backend and its version, the machine (and, on a CPU, the threads
        the benchmark ran on), and the benchmark's shape. Throughput compares only within one basis (vLLM against
        transformers' generate, one CPU or thread count against another, 32 prompt tokens against 100, measures the
        backend, the box or the benchmark)."""
        backend = self.tags.get("bench_backend", "no backend")
        if backend in ("vllm", "serving"):
            version = self.tags.get("vllm_version", "vllm version unknown")
        else:
            version = f"transformers {self.tags.get('version.transformers', '?')}, torch {self.tags.get('version.torch', '?')}"
        gpu = self.tags.get("host.gpu", "none")
        machine = gpu if gpu != "none" else self.tags.get("host.cpu", "unknown machine")
        if gpu == "none":
            machine += f", {self.tags.get('bench_threads', '?')} thread(s)"
        shape = f"{self.params.get('bench.prompt_tokens', '?')} prompt + {self.params.get('bench.output_tokens', '?')}"
        return f"{backend} ({version}) on {machine}; {shape} tokens"

    def mem_basis(self, name: str) -> str:
        """What a memory figure measured (`mem_basis.<name>` tag); for runs logged before the tag, what the code that
        logged them measured: vLLM's serving memory read device-wide on a GPU and its engine's RSS on a CPU, CUDA's
        allocator peak for the job's own steps on a GPU, the job process's RSS on a CPU."""
        tagged = self.tags.get(f"{MEM_BASIS_TAG}.{name}")
        if tagged:
            return tagged
        gpu = self.on_gpu
        if name == "serve_mem_gb" and self.tags.get("bench_backend") == "vllm":
            return "cuda_device_used" if gpu else "engine_process_rss"
        return "cuda_allocator" if gpu else "job_process_rss"

    @property
    def quality_windows_id(self) -> str:
        """Which held-out windows its quality figures were measured on: their sha256 (tag), or for older runs the
        settings that chose them. Per-window figures pair only between runs with the same id."""
        tagged = self.tags.get(QUALITY_WINDOWS_TAG)
        if tagged:
            return tagged
        keys = ("quality.dataset", "quality.num_tokens", "quality.seq_len", "quality.seed", "model.pretrained")
        return "settings:" + "|".join(self.params.get(k, "?") for k in keys)

    @property
    def on_gpu(self) -> bool:
        return self.params.get("hardware.device", "").startswith("cuda") or self.tags.get("host.gpu", "none") != "none"


def speed_groups(rows: Iterable[RunRow]) -> dict[str, list[RunRow]]:
    """Runs by speed basis (backend, version, machine, threads, shape), in the order first seen: the sets whose
    tokens/s compare."""
    groups: dict[str, list[RunRow]] = {}
    for row in rows:
        groups.setdefault(row.speed_basis, []).append(row)
    return groups


def mem_groups(rows: Iterable[RunRow], name: str) -> dict[str, list[RunRow]]:
    """Runs by what their memory figure `name` measured, in the order first seen: the sets whose figures compare."""
    groups: dict[str, list[RunRow]] = {}
    for row in rows:
        groups.setdefault(row.mem_basis(name), []).append(row)
    return groups


@dataclass
class Selection:
    """The runs one report, registration or recommendation rests on."""

    experiment: str
    experiment_id: str
    sweep: str
    rows: list[RunRow]
    baseline_method: str
    baseline: RunRow | None = None
    baseline_note: str = ""

    @property
    def finished(self) -> list[RunRow]:
        return [r for r in self.rows if r.ok]

    @property
    def tasks(self) -> list[str]:
        """The tasks of the finished runs (a failed run's config must not add a column nobody measured)."""
        seen: dict[str, None] = {}
        measured = self.finished + ([self.baseline] if self.baseline else [])
        for r in measured or self.rows:
            seen.update(dict.fromkeys(r.tasks))
        return list(seen)

    @property
    def streams(self) -> list[int]:
        return sorted({n for r in self.rows for n in r.streams})

    def is_baseline(self, row: RunRow) -> bool:
        return self.baseline is not None and row.run_id == self.baseline.run_id


def _without_superseded_attempts(rows: list[RunRow]) -> list[RunRow]:
    """Drop a job's failed or interrupted attempts where the same job (config_hash) also has a FINISHED run: a sweep
    rerun into the same folder (same sweep_id) completes the job, and its report shows it once, as finished."""
    done = {r.tags.get("config_hash") for r in rows if r.status == "FINISHED"} - {None}
    return [r for r in rows if r.status == "FINISHED" or r.tags.get("config_hash") not in done]


class Store:
    """An MLflow tracking store, read-mostly."""

    def __init__(self, uri: str = DEFAULT_URI):
        self.uri = uri
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per samples.json is noise
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self._samples: dict[tuple[str, str], dict | None] = {}  # (run id, artifact path) -> its JSON
        # artifacts that were logged but could not be read, each with what the report lost (the report tags them)
        self.problems: list[str] = []

    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            known = [e.name for e in self.client.search_experiments()]
            raise ConfigError(
                f"No experiment {name!r} in {self.uri}; it has: {known or 'none'}. "
                f"Run a sweep first (make run) or pass --experiment/--tracking-uri."
            )
        return exp.experiment_id

    def runs(self, experiment_id: str, filter_string: str | None = None) -> list[RunRow]:
        """Every run of the experiment that matches the filter, newest first, summary runs left out."""
        found = self.client.search_runs(
            [experiment_id],
            filter_string=filter_string or "",
            max_results=10_000,
            order_by=["attributes.start_time DESC"],
        )
        return [RunRow.from_run(r) for r in found if r.data.tags.get(SUMMARY_TAG) != "true"]

    def select(
        self, experiment: str, sweep: str | None = None, filter_string: str | None = None, baseline: str = "fp16"
    ) -> Selection:
        """The runs of one sweep (default: the latest), labelled, with the baseline resolved."""
        exp_id = self.experiment_id(experiment)
        every = self.runs(exp_id, filter_string)
        if sweep is None:
            sweep = next((r.tags["sweep_id"] for r in every if r.tags.get("sweep_id")), ALL_SWEEPS)
        if sweep.startswith(STUDY_PREFIX):  # the trials of an Optuna search, over every sweep that ran them
            rows = [r for r in every if in_study(r.tags, sweep.removeprefix(STUDY_PREFIX))]
        else:
            rows = every if sweep == ALL_SWEEPS else [r for r in every if in_sweep(r.tags, sweep)]
        if not rows:
            raise ConfigError(
                f"No runs for sweep {sweep!r} in experiment {experiment!r}"
                + (f" matching {filter_string!r}" if filter_string else "")
                + "."
            )
        rows = _without_superseded_attempts(rows)
        rows.sort(key=lambda r: (int(r.tags.get(f"{RESUMED_TAG}.{sweep}", r.tags.get("job_num", 10**6))), r.start_time))
        if not filter_string:  # a run the filter left out is not missing
            rows += _missing_jobs([r for r in rows if r.tags.get("sweep_id") == sweep] or rows, rows)
        _label(rows)
        sel = Selection(experiment, exp_id, sweep, rows, baseline)
        sel.baseline, sel.baseline_note = _resolve_baseline(rows, every, baseline)
        return sel

    def samples(self, row: RunRow) -> dict | None:
        """eval/samples.json of a run ({task: [{doc_id, acc}]}; a group's rows also name their `task`), or None."""
        return self._json_artifact(row, SAMPLES)

    def quality_windows(self, row: RunRow) -> dict | None:
        """quality/per_window.json of a run ({kl_mean: [...], ...} per held-out window), or None."""
        return self._json_artifact(row, PER_WINDOW)

    def _json_artifact(self, row: RunRow, path: str) -> dict | None:
        """The artifact's JSON; None when the run did not log it (no evaluation, an older quantbench), or when it
        cannot be read, which is logged at WARNING and kept in `problems`: the report then says what it lost."""
        if row.run_id is None:
            return None
        key = (row.run_id, path)
        if key not in self._samples:
            self._samples[key] = None
            try:
                folder = str(Path(path).parent)
                if path not in {a.path for a in self.client.list_artifacts(row.run_id, folder)}:
                    log.debug("Run %s logged no %s", row.run_id, path)
                    return None
                with tempfile.TemporaryDirectory() as tmp:
                    local = self.client.download_artifacts(row.run_id, path, tmp)
                    self._samples[key] = json.loads(Path(local).read_text())
            except (MlflowException, OSError, json.JSONDecodeError) as exc:
                problem = (
                    f"{path} of run {row.run_id} ({row.label}) could not be read ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200] if str(exc) else ''}), so "
                    f"{ARTIFACT_CONSEQUENCE.get(path, 'it is left out')}"
                )
                log.warning("%s", problem)
                self.problems.append(problem)
        return self._samples[key]

    def compare(self, sel: Selection) -> stats.Comparisons:
        """run_id -> task -> accuracy difference vs the baseline, paired by doc_id where samples allow."""
        out: dict[str, dict[str, stats.Difference]] = {}
        base = sel.baseline
        if base is None or base.random_weights:
            return out
        base_samples = self.samples(base) or {}
        for row in sel.finished:
            if row.run_id == base.run_id or row.random_weights:  # chance against chance compares nothing
                continue
            row_samples = self.samples(row) or {}
            per_task: dict[str, stats.Difference] = {}
            for task in sel.tasks:  # a group's rows pair by subtask and document
                if task in base_samples and task in row_samples:
                    a, b = stats.pair_by_doc(base_samples[task], row_samples[task])
                    if len(a):
                        per_task[task] = stats.paired_bootstrap(a, b)
                        continue
                acc_a, acc_b = base.acc(task), row.acc(task)
                se_a, se_b = base.metrics.get(f"{task}_acc_stderr"), row.metrics.get(f"{task}_acc_stderr")
                if None not in (acc_a, acc_b, se_a, se_b):
                    per_task[task] = stats.unpaired_normal(acc_a, se_a, acc_b, se_b)
            out[row.run_id] = per_task
        return out


def add_store_args(p: argparse.ArgumentParser) -> None:
    """The flags every reader of a sweep shares."""
    p.add_argument("--tracking-uri", default=DEFAULT_URI, help="MLflow tracking URI (default: %(default)s)")
    p.add_argument("--experiment", default="quantbench-tiny", help="experiment name (default: %(default)s)")
    p.add_argument("--sweep", help=f"sweep_id to read, '{STUDY_PREFIX}<name>' for the trials of an Optuna search, or "
                                   f"'{ALL_SWEEPS}' (default: the latest sweep)")  # fmt: skip
    p.add_argument("--filter", help="extra MLflow search filter, e.g. \"tags.hardware = 'cpu'\"")
    p.add_argument("--baseline", default="fp16", help="baseline method (default: %(default)s)")


def _resolve_baseline(rows: list[RunRow], every: list[RunRow], method: str) -> tuple[RunRow | None, str]:
    """The sweep's own finished baseline run; else the latest finished one in the experiment, said so."""
    own = [r for r in rows if r.method == method and r.ok]
    if own:
        return own[-1], ""
    in_sweep = [r for r in rows if r.method == method]
    why = (
        f"the sweep's {method} run is {in_sweep[-1].status_text.split(':')[0]}"
        if in_sweep
        else f"the sweep has no {method} run"
    )
    evals = {r.tags.get("eval") for r in rows if r.run_id}
    older = [r for r in every if r.method == method and r.ok and r.tags.get("eval") in evals]
    if older:
        b = older[0]
        return b, (
            f"{why}; baseline taken from run {b.run_id} (sweep {b.tags.get('sweep_id', 'none')}) "
            f"of the same experiment."
        )
    return None, f"{why} and the experiment has no finished {method} run: no Δ vs baseline."


def _label(rows: list[RunRow]) -> None:
    """Label runs by method; where a method occurs twice, add the overrides that tell them apart (those every run of
    the method shares, such as `experiment=seed_shape`, tell nothing and are left out)."""
    by_method: dict[str, list[RunRow]] = {}
    for r in rows:
        by_method.setdefault(r.method, []).append(r)
    for group in by_method.values():
        if len(group) == 1:
            group[0].label = group[0].method
            continue
        own = [
            [o for o in r.tags.get("overrides", "").split() if not o.startswith(("method=", *LOCATION_PREFIXES))]
            for r in group
        ]
        shared = set.intersection(*(set(o) for o in own))
        for r, overrides in zip(group, own):
            extra = [o for o in overrides if o not in shared]
            r.label = f"{r.method} ({' '.join(extra)})" if extra else f"{r.method} ({r.short_id})"
        if len({r.label for r in group}) < len(group):
            for r in group:
                r.label = f"{r.label} [{r.short_id}]"


STUDY_PREFIX = "study:"  # --sweep study:<name>: the runs of an Optuna search's trials (hydra/sweeper=optuna)


def in_study(tags: dict[str, str], study: str) -> bool:
    """A trial's own run, or a FINISHED run that a trial of the study reused by its config hash."""
    return tags.get(SEARCH_STUDY_TAG) == study or f"{SEARCH_TRIAL_TAG}.{study}" in tags


def in_sweep(tags: dict[str, str], sweep: str) -> bool:
    """A run belongs to the sweep that ran it and to every later sweep that skipped its job as already FINISHED."""
    return tags.get("sweep_id") == sweep or f"{RESUMED_TAG}.{sweep}" in tags


def _missing_jobs(own: list[RunRow], rows: list[RunRow]) -> list[RunRow]:
    """Placeholders for methods the sweep's multirun.yaml asked for but that have no run at all (`own`: the runs the
    sweep itself started, whose sweep_dir holds that file; `rows`: all of the sweep's runs, resumed ones included)."""
    sweep_dirs = {r.tags.get("sweep_dir") for r in own} - {None}
    if len(sweep_dirs) != 1:
        return []
    path = Path(sweep_dirs.pop()) / "multirun.yaml"
    if not path.exists():  # the store was made on another machine (e.g. the GPU results): nothing to compare with
        log.info("No %s here: MISSING jobs of this sweep cannot be listed", path)
        return []
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(path)
        task = [o for o in cfg.hydra.overrides.task if o.split("=", 1)[0] == "method"]
        sweeper = cfg.hydra.get("sweeper", {}).get("params") or {}
        spec = task[0] if task else (f"method={sweeper['method']}" if "method" in sweeper else None)
        if spec is None:
            return []
        override = OverridesParser.create().parse_overrides([spec])[0]
        expected = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
    except Exception as exc:  # the tables still stand without it; say why the MISSING rows do not
        log.warning(
            "Cannot read the sweep's jobs from %s (%s: %s): jobs that never started are not listed as MISSING",
            path,
            type(exc).__name__,
            exc,
        )
        return []
    seen = {r.method for r in rows}
    return [RunRow(None, str(m), "MISSING", label=str(m)) for m in expected if str(m) not in seen]
