"""A Hydra sweeper that searches with Optuna: `python run.py -m search=<name>` (conf/search/*.yaml).

Why our own: hydra-optuna-sweeper 1.3.0, the latest release, requires optuna<3, and Optuna 2.10's database storage
fails on the SQLAlchemy 2 that MLflow needs (creating a study in a SQLite file raises AssertionError in
get_current_version); its port to Optuna 4 is unreleased. This plugin keeps its search-space syntax
(`choice(...)`, `range(...)`, `interval(...)`, `tag(log, interval(...))` in `hydra.sweeper.params`) over Optuna's
ask/tell API, and adds what a quantization search needs:

- objectives are metrics of the job's outcome (`quantbench.job.pipeline.Outcome.metrics`: what the run logged, or
  for a job skipped by its config hash, what its FINISHED run logged), each with a direction;
- constraints (`quality_kl_mean <= 0.02`) are set on each trial (Optuna's `Trial.set_constraint`, which the
  samplers and `best_trials` read): a violating trial is COMPLETE with its values and marked infeasible, never
  dropped; a job that fails is a FAILED trial;
- the study lives in a database (default: optuna.db beside the MLflow SQLite file) with heartbeats, so a search
  killed with kill -9 and started again continues: finished trials stay, a trial left RUNNING is failed once its
  heartbeat is stale and retried with the same parameters (its job is skipped if its run had FINISHED), and
  several sweeper processes can share one study.

Each trial's job gets `hydra.job.env_set.QUANTBENCH_TRIAL=<number>`; the pipeline tags its run with the trial number,
the study and the sampler (the config hash ignores hydra.*, so resume by config hash applies to trials).
"""

import contextlib
import logging
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from quantbench.names import SEARCH_TRIAL_ENV
from quantbench.stores import import_optuna, optuna_storage, study_storage

log = logging.getLogger(__name__)
# Heartbeats and stale-trial retries are what make a killed search resumable; Optuna marks them experimental and
# warns that heartbeats are meant for Study.optimize, which an ask/tell loop over Hydra's launcher cannot use.
QUIET = ".*(is experimental|experimental feature|Heartbeat of storage)"

CONSTRAINT = re.compile(r"^\s*([\w.]+)\s*(<=|>=)\s*(-?[\d.eE+-]+)\s*$")
RESULTS_FILE = "optimization_results.yaml"


# Plain typing (no `from __future__ import annotations`): Hydra's plugin scan imports this module outside
# sys.modules, where a dataclass cannot resolve string annotations; OmegaConf reads these types.
@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.quantbench_optuna_sweeper.sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sampler is built by the sweeper, with the constraints
    study_name: str = "quantbench"
    # an Optuna storage URL; null: sqlite optuna.db beside the MLflow SQLite file (a tracking server: name one)
    storage: Optional[str] = None
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": 0})
    objectives: Dict[str, str] = field(default_factory=dict)  # metric: minimize | maximize, in order
    constraints: List[str] = field(default_factory=list)  # "metric <= bound" or "metric >= bound"
    n_trials: int = 8  # trials in the study, over every run of the sweep and every worker
    n_jobs: int = 1  # trials handed to the launcher at once (Ray: run in parallel)
    heartbeat_interval_s: int = 30
    grace_period_s: int = 120  # a RUNNING trial without a heartbeat this long is failed and retried
    params: Optional[Dict[str, str]] = None  # the search space and fixed overrides, Hydra's override syntax


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="quantbench")


def distribution(override: Override):
    """The Optuna distribution of a sweep override, or its value as a string for a fixed one."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if override.is_choice_sweep() or (isinstance(value, RangeSweep) and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if isinstance(value, RangeSweep):
        if any(isinstance(x, float) for x in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, value.stop, step=value.step)
        return IntDistribution(int(value.start), int(value.stop) - int(value.step), step=int(value.step))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    assert not isinstance(value, ChoiceSweep)
    raise ValueError(f"hydra.sweeper.params: {override.input_line} is no search space Optuna can sample")


def search_space(params: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(distributions, fixed overrides) of `key=value` strings."""
    space, fixed = {}, {}
    for override in OverridesParser.create().parse_overrides(params):
        value = distribution(override)
        (fixed if isinstance(value, str) else space)[override.get_key_element()] = value
    return space, fixed


def parse_constraints(constraints: list[str]) -> list[tuple[str, str, float]]:
    parsed = []
    for text in constraints:
        m = CONSTRAINT.match(text)
        if not m:
            raise ValueError(f"hydra.sweeper.constraints: {text!r} is not 'metric <= bound' or 'metric >= bound'")
        parsed.append((m[1], m[2], float(m[3])))
    return parsed


def constraint_values(constraints: list[tuple[str, str, float]], metrics: dict[str, float]) -> list[float]:
    """Optuna's convention: <= 0 is feasible. A metric the run did not log violates its constraint."""
    out = []
    for name, op, bound in constraints:
        if name not in metrics:
            out.append(float("inf"))
        else:
            out.append(metrics[name] - bound if op == "<=" else bound - metrics[name])
    return out


def default_storage(tracking_uri: str) -> str:
    """optuna.db beside the MLflow SQLite file; a tracking server's study needs a storage named explicitly."""
    storage = optuna_storage(tracking_uri)
    if storage is None:
        raise ValueError(
            f"hydra.sweeper.storage is not set and the runs go to {tracking_uri}, not a SQLite file: name the "
            f"database the sweepers of this study share, e.g. hydra.sweeper.storage=postgresql://user:pass@host/optuna "
            f"(a database of its own: Optuna and MLflow would both keep an alembic_version table in one)"
        )
    Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)  # before the MLflow store is
    return storage


class OptunaSweeper(Sweeper):
    def __init__(self, **conf: Any) -> None:
        self.conf = OmegaConf.create(conf)
        self.config: DictConfig | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def study(self):
        """The study, created or loaded, with heartbeats and the retry of stale trials."""
        import hydra.utils

        optuna = import_optuna()

        conf = self.conf
        if not conf.objectives:
            raise ValueError("hydra.sweeper.objectives is empty: name the metrics to optimize, e.g. disk_gb: minimize")
        url = conf.storage or default_storage(str(self.config.tracking.uri))
        storage = study_storage(  # workers that start together race to create the schema: the losers retry
            url,
            heartbeat_interval=int(conf.heartbeat_interval_s),
            grace_period=int(conf.grace_period_s),
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
        )
        study = optuna.create_study(
            study_name=conf.study_name,
            storage=storage,
            sampler=hydra.utils.instantiate(conf.sampler),
            directions=list(conf.objectives.values()),
            load_if_exists=True,
        )
        names = list(conf.objectives)
        if study.user_attrs.get("objectives", names) != names:
            raise ValueError(
                f"study {conf.study_name!r} optimizes {study.user_attrs['objectives']}, not {names}: name a new "
                f"study (hydra.sweeper.study_name) for other objectives"
            )
        study.set_user_attr("objectives", names)  # `quantbench search` names the values with them
        return study

    def sweep(self, arguments: list[str]) -> None:
        optuna = import_optuna()
        from optuna.trial import TrialState

        warnings.filterwarnings("ignore", message=QUIET)  # here: a job's setup may reset the filters at import
        conf = self.conf
        params = [f"{k}={v}" for k, v in (conf.params or {}).items()] + list(arguments)
        space, fixed = search_space(params)
        constraints = parse_constraints(list(conf.constraints))
        study = self.study()
        objectives = list(conf.objectives)
        sampler_name = type(study.sampler).__name__
        log.info("Study %r (%s, %s): %s over %s", study.study_name, sampler_name, dict(conf.objectives),
                 conf.n_trials, list(space))  # fmt: skip
        while True:
            optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            retried = {optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials}
            counted = [t for t in trials if t.state != TrialState.WAITING and t.number not in retried]
            slots = int(conf.n_trials) - len(counted)
            if slots <= 0:
                if not any(t.state == TrialState.RUNNING for t in counted):
                    break
                time.sleep(float(conf.heartbeat_interval_s))  # another worker's trial, or a stale one
                continue
            batch = [study.ask(space) for _ in range(min(slots, int(conf.n_jobs)))]
            overrides = [
                tuple(f"{k}={v}" for k, v in ({**t.params, **fixed}).items())
                + (f"+hydra.job.env_set.{SEARCH_TRIAL_ENV}={t.number}",)
                for t in batch
            ]
            for t in batch:
                t.set_user_attr("sampler", sampler_name)
            with heartbeats(study, batch):
                returns = self.launcher.launch(overrides, initial_job_idx=batch[0].number)
            for trial, ret in zip(batch, returns):
                tell(study, trial, ret, objectives, constraints)
        write_results(study, objectives, Path(str(self.config.hydra.sweep.dir)))


@contextlib.contextmanager
def heartbeats(study, trials):
    """Optuna's heartbeat thread for each trial in flight, so that a killed sweeper's trials go stale."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    threads = [get_heartbeat_thread(t._trial_id, study._storage) for t in trials]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for thread in threads:
            thread.join()


_tell_lock = threading.Lock()


def tell(study, trial, ret: JobReturn, objectives: list[str], constraints) -> None:
    """The job's outcome to the study: COMPLETE with its objectives (constraints stored for the sampler), or FAIL
    with why. The run id, the run's status and every objective metric are user attributes."""
    from optuna.trial import TrialState

    if ret.status == JobStatus.FAILED:
        exc = ret._return_value
        trial.set_user_attr("failed", f"{type(exc).__name__}: {str(exc).strip()[:500]}")
        study.tell(trial, state=TrialState.FAIL)
        log.warning("Trial %d failed: %s", trial.number, trial.user_attrs.get("failed"))
        return
    outcome = ret.return_value
    metrics = dict(getattr(outcome, "metrics", None) or {})
    trial.set_user_attr("run_id", getattr(outcome, "run_id", None))
    trial.set_user_attr("run_status", getattr(outcome, "status", None))
    missing = [m for m in objectives if m not in metrics]
    if missing:
        trial.set_user_attr("failed", f"the run logged no {', '.join(missing)}")
        study.tell(trial, state=TrialState.FAIL)
        log.warning("Trial %d failed: its run %s logged no %s", trial.number, getattr(outcome, "run_id", "?"), missing)
        return
    for name in {*objectives, *(c[0] for c in constraints)} & set(metrics):
        trial.set_user_attr(name, float(metrics[name]))
    if constraints:
        values = constraint_values(constraints, metrics)
        for (name, op, bound), value in zip(constraints, values):
            trial.set_constraint(f"{name} {op} {bound:g}", value)
        trial.set_user_attr("feasible", all(v <= 0 for v in values))
    with _tell_lock:
        study.tell(trial, [float(metrics[m]) for m in objectives])


def write_results(study, objectives: list[str], sweep_dir: Path) -> None:
    """The Pareto front (feasible trials only), as hydra-optuna-sweeper writes it, in the sweep folder."""
    front = [
        {"number": t.number, "params": t.params, "values": dict(zip(objectives, t.values)),
         "run_id": t.user_attrs.get("run_id")}
        for t in study.best_trials
    ]  # fmt: skip
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create({"name": "optuna", "study": study.study_name, "front": front}),
                   sweep_dir / RESULTS_FILE)  # fmt: skip
    log.info("Pareto front of %r: %d trial(s): %s", study.study_name, len(front), [f["number"] for f in front])
