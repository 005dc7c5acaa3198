"""Typed schemas of the config groups and of the root config, registered in Hydra's ConfigStore: each group's YAML
files start from their schema (`defaults: [<group>_schema, _self_]`) and conf/config.yaml from the root's
(`quantbench_schema`), so Hydra itself refuses an unknown key or a value of the wrong type, naming the key, before
any job starts. Every numeric knob also carries its range (`knob(..., ge=/gt=/lt=)`), checked by `check` inside the
job before any weights load, so nonsense ends as a FAILED run that says why. Checks that need the model or the
machine stay in the modules that own them (`bench.plan`, `evaluation.plan`, `calibration.check`, ...).

The method group has no schema here: each method's knobs are its class's constructor arguments (`_target_`), and
Hydra's instantiate refuses an unknown one; each method's `validate()` checks their ranges. The bench group's numbers
are checked by `bench.plan` (only where a benchmark runs: bench=none leaves them at 0).
"""

from __future__ import annotations

import math
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from quantbench.job import bench
from quantbench.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """What a numeric knob accepts: bounds (None: unbounded), whole numbers only or not, null allowed or not."""

    ge: float | None = None
    gt: float | None = None
    lt: float | None = None

    def problem(self, value: Any) -> str | None:
        """Why `value` is out of range (None when it is fine). NaN and infinities are never fine."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, not {value!r}"
        if not math.isfinite(value):
            return "must be a finite number"
        if self.ge is not None and value < self.ge:
            return f"must be >= {self.ge:g}"
        if self.gt is not None and value <= self.gt:
            return f"must be > {self.gt:g}"
        if self.lt is not None and value >= self.lt:
            return f"must be < {self.lt:g}"
        return None


def knob(default: Any = NO_DEFAULT, **bounds: float) -> Any:
    """A dataclass field with its range: `count: int = knob(1, ge=1)`. Null stays allowed where the type allows it."""
    return field(default=default, metadata={"range": Range(**bounds)})


SEED_RANGE = dict(ge=0, lt=2**32)  # numpy's (lm-eval seeds numpy with it): a negative seed fails inside lm-eval


@dataclass(frozen=True)
class Limit(Range):
    """lm-eval's `limit`: a whole number of documents per task (>= 1), or a fraction of them in (0, 1)."""

    def problem(self, value: Any) -> str | None:
        why = Range(gt=0).problem(value)
        if why is None and value is not None and value >= 1 and value != int(value):
            why = "must be a whole number of documents (>= 1) or a fraction in (0, 1)"
        return why and f"{why} (documents per task: a count >= 1, a fraction in (0, 1), or null for all)"


@dataclass
class ModelConfig:
    name: str = MISSING
    pretrained: str = MISSING  # embedded:<name>, a local folder, or a hub id
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass
class EvalConfig:
    name: str = MISSING
    tasks: list[str] = field(default_factory=list)
    include_path: str | None = None  # a folder of lm-eval task YAMLs, or embedded:tiny
    num_fewshot: int = knob(0, ge=0)
    batch_size: int = knob(1, ge=1)
    # documents per task: a count (>= 1), a fraction in (0, 1), or null for all
    limit: float | None = field(default=None, metadata={"range": Limit()})


@dataclass
class QualityConfig:
    name: str = MISSING
    dataset: str | None = None  # null: no quality metrics
    num_tokens: int = knob(2048, ge=8)
    seq_len: int = knob(128, ge=8)
    batch_size: int = knob(8, ge=1)
    seed: int = knob(0, **SEED_RANGE)


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: str = "cpu"  # cpu, cuda or cuda:<index>
    dtype: str = "bfloat16"
    memory_gb: float | None = knob(None, gt=0)
    memory_bandwidth_gbs: float | None = knob(None, gt=0)  # datasheet; null: measured on the device once and cached
    eval_batch_size: int = knob(16, ge=1)
    # What one job asks of a parallel launcher (hydra/launcher=ray or submitit_slurm): the launcher, not quantbench,
    # then places each job on a GPU and node.
    job_gpus: int | None = knob(None, ge=0)  # null: no GPU to ask for (CPU jobs)
    job_cpus: int = knob(1, ge=1)
    job_mem_gb: int | None = knob(None, ge=1)  # null: no memory reservation (SLURM: the partition's default)
    # SLURM's time limit per job (one job array per sweep, so one limit for all its jobs); null: the longest that
    # any of the sweep's methods needs (quantbench.slurm.time_limit_min)
    job_time_min: int | None = knob(None, ge=1)
    # What an hour of this hardware costs (any currency; the report names none): cost per million output tokens under
    # bench=serving. null: no cost figure (tag cost_unavailable)
    cost_per_hour: float | None = knob(None, ge=0)


@dataclass
class BenchCommon:
    """The bench group's keys that every backend reads; BenchConfig adds `bench.<name>` for each backend's knobs."""

    name: str = MISSING
    backend: str = "hf"  # a backend's name (quantbench.job.bench.backend_names()), or none
    prompt_tokens: int = 32
    output_tokens: int = 32
    streams: list[int] = field(default_factory=lambda: [1, 8])
    warmup: int = 1
    repeats: int = 3


# Each backend's knobs (its Knobs dataclass: bench.vllm, bench.hf, ...) come from the backend, so a new backend
# touches no schema; named BenchConfig, the name Hydra's errors show ("Key 'x' not in 'BenchConfig'").
BenchConfig = make_dataclass(
    "BenchConfig",
    [(name, b.Knobs, field(default_factory=b.Knobs)) for name, b in bench.registry().items()],
    bases=(BenchCommon,),
)
BenchConfig.__module__ = __name__


@dataclass
class CalibrationConfig:
    name: str = MISSING
    dataset: str = MISSING  # embedded:tiny, a local file, or a hub dataset id
    subset: str | None = None
    split: str | None = None
    revision: str | None = None
    text_column: str = "text"
    num_samples: int = knob(64, ge=1)
    seq_len: int = knob(128, ge=8)
    seed: int = knob(0, **SEED_RANGE)


@dataclass
class TrackingConfig:
    name: str = MISSING
    uri: str = MISSING
    artifact_root: str | None = None
    experiment: str = MISSING
    # copy: the model folder is logged as the run's artifact (over HTTP to a server); reference: only its location
    # and its files' sha256s (tag model_location), for workers that share storage with whoever loads the model (a
    # 16 GB folder is then not copied); none: neither (the sha256s are still logged)
    log_model: str = "copy"


@dataclass
class PolicyConfig:
    """`quantbench register`'s selection policy (quantbench.study.policy says how each key is applied)."""

    registered_name: str | None = None  # the Model Registry entry; null: quantbench-<the winning run's model>
    alias: str = "champion"  # moved to the winning version on every registration
    baseline: str = "fp16"  # the method accuracy drops are measured against
    max_disk_gb: float | None = knob(None, gt=0)
    max_serve_mem_gb: float | None = knob(None, gt=0)  # GPU memory to serve it (policy.memory_need), else weights
    max_peak_mem_gb: float | None = knob(None, gt=0)  # the maximum over quantize, eval and bench
    min_tokens_per_s: float | None = knob(None, ge=0)  # at `streams` streams (alias: min_tokens_per_s_1_stream)
    streams: int = knob(1, ge=1)
    # bench=serving: p99 TTFT / ITL limits (ms) at `users` concurrent users, e.g. p99 TTFT <= 200 ms at 16 users;
    # rank_by=serve_goodput_cost_per_million_tokens (or serve_cost_per_million_tokens_c<users>) for the least cost
    max_p99_ttft_ms: float | None = knob(None, gt=0)
    max_p99_itl_ms: float | None = knob(None, gt=0)
    users: int = knob(1, ge=1)
    min_accuracy: float | None = knob(None, ge=0)  # mean accuracy over the tasks, a fraction
    max_kl_mean: float | None = knob(None, ge=0)  # quality_kl_mean: nats per token from the baseline's distribution
    max_acc_drop_points: float | None = knob(2.0, ge=0)
    reject_significantly_worse: bool = False
    prefer_within_noise: bool = False  # rank only runs within noise of the baseline on every task, if any are
    backend: str | None = None  # only runs benchmarked by this backend (hf, vllm)
    fine_tune: bool = False  # only QLoRA-ready bases (bitsandbytes)
    rank_by: str = "mean accuracy"  # "mean accuracy" (over the eval tasks, in %) or a run metric name
    tie_tolerance: float = knob(0.5, ge=0)
    tie_break: str | None = "tokens_per_s_1_stream"
    rank_across_backends: bool = False  # let a speed or memory metric rank runs measured on different bases


@dataclass
class PathsConfig:
    root: str = MISSING
    cache: str = MISSING
    mlruns: str = MISSING


@dataclass
class QuantizedCacheConfig:
    enabled: bool = True
    dir: str = MISSING


@dataclass
class TimeoutsConfig:
    # the fresh-process reload and fingerprint of the saved model; null: no limit
    artifact_check_s: float | None = knob(1800.0, gt=0)


@dataclass
class RootConfig:
    """conf/config.yaml's own keys, and the groups it composes (each also typed by its group schema)."""

    method: Any = MISSING  # typed by the method class's constructor (Hydra's instantiate)
    model: ModelConfig = MISSING
    eval: EvalConfig = MISSING
    quality: QualityConfig = MISSING
    hardware: HardwareConfig = MISSING
    bench: BenchConfig = MISSING
    calibration: CalibrationConfig = MISSING
    tracking: TrackingConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = knob(0, **SEED_RANGE)
    force: bool = False
    quantized_cache: QuantizedCacheConfig = field(default_factory=QuantizedCacheConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    repeats: int = knob(1, ge=1)
    disk_headroom_gb: float | None = knob(2.0, ge=0)


SCHEMAS = {"model": ModelConfig, "eval": EvalConfig, "quality": QualityConfig, "hardware": HardwareConfig,
           "bench": BenchConfig, "calibration": CalibrationConfig, "tracking": TrackingConfig,
           "policy": PolicyConfig}  # fmt: skip
ROOT_SCHEMA = "quantbench_schema"  # conf/config.yaml's first default
SLURM_TIME_RESOLVER = "quantbench.slurm_time_min"  # conf/hydra/launcher/submitit_slurm.yaml's timeout_min


def register() -> None:
    """Store every schema as `<group>/<group>_schema` (what each group's YAML files name in their defaults) and the
    root's as `quantbench_schema`; register the SLURM time-limit resolver. The launcher configs (conf/hydra/launcher/)
    are typed by their plugins' own schemas, which Hydra matches by name."""
    cs = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema)
    cs.store(name=ROOT_SCHEMA, node=RootConfig)
    OmegaConf.register_new_resolver(SLURM_TIME_RESOLVER, slurm_time_min, replace=True)


def check(cfg: DictConfig) -> None:
    """Refuse what Hydra let in around the schemas, in one paragraph (ConfigError), before any weights load:
    keys added with `+key=value` (Hydra 1.3 lifts the struct flag for `+`, so a typo would be ignored silently), and
    every numeric value outside its range (`knob`). Called inside the job (pipeline.prepare), so the run ends FAILED
    with that reason. A job config (one with a `method`) is checked whole; a policy alone (conf/register.yaml) too."""
    groups = {g: s for g, s in SCHEMAS.items() if g in cfg}
    for group, schema in groups.items():
        _refuse_added_keys(cfg[group], schema, group)
    if "method" in cfg:
        root = {k: v for k, v in cfg.items() if k != "hydra"}
        extra = sorted(set(root) - {f.name for f in fields(RootConfig)})
        if extra:
            raise ConfigError(
                f"unknown top-level key(s) {extra}: nothing reads them. The config's keys are: "
                f"{', '.join(f.name for f in fields(RootConfig))}."
            )
        problems = _out_of_range(cfg, RootConfig, "")
    else:
        problems = [p for group, schema in groups.items() for p in _out_of_range(cfg[group], schema, f"{group}.")]
    if problems:
        raise ConfigError("Nonsensical values, refused before any work: " + "; ".join(problems) + ".")


def _refuse_added_keys(node: DictConfig, schema: type, group: str) -> None:
    try:
        OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(node))  # a plain copy: `+` opened it
    except OmegaConfBaseException as exc:
        keys = ", ".join(f.name for f in fields(schema))
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"{group}: {msg}. The {group} group's keys are: {keys}.") from exc


def _out_of_range(node: DictConfig, schema: type, prefix: str) -> list[str]:
    """`key=value (why)` for every value of `node` outside the range its schema field declares, nested groups
    included (the bench group is left to bench.plan)."""
    out = []
    for f in fields(schema):
        if f.name not in node or OmegaConf.is_missing(node, f.name) or f.name == "bench":
            continue
        value = node[f.name]
        if isinstance(value, DictConfig):
            nested = (SCHEMAS.get(f.name) if schema is RootConfig else None) or _dataclass_of(schema, f.name)
            if nested is not None:
                out += _out_of_range(value, nested, f"{prefix}{f.name}.")
            continue
        rule = f.metadata.get("range")
        why = rule.problem(value) if rule else None
        if why:
            out.append(f"{prefix}{f.name}={value} ({why})")
    return out


def _dataclass_of(schema: type, name: str) -> type | None:
    """The dataclass a field holds (field types are strings under `from __future__ import annotations`)."""
    default = next(f for f in fields(schema) if f.name == name).default_factory
    made = default() if callable(default) else None
    return type(made) if is_dataclass(made) else None


# How long one job of a method needs at most, by the `time_limit_min` its class declares (methods/base.py): one
# calibration seed of Llama 3.1 8B on one GPU, evaluation and benchmark included. SLURM runs a sweep as one job
# array with one time limit, so the sweep gets its slowest method's, times `repeats` (each seed re-quantizes and
# re-evaluates; uncalibrated methods run once, so this is an upper bound for them).
def slurm_time_min(job_time_min: int | None, repeats: int, task_overrides: Any, sweep_methods: Any) -> int:
    """`hardware.job_time_min` when set; else the longest time any method of the sweep needs (`-m method=a,b` on the
    command line, else the sweep's `hydra.sweeper.params.method`), times `repeats`."""
    if job_time_min is not None:
        return int(job_time_min)
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.utils import get_class

    from quantbench.paths import ROOT

    spec = next((o for o in task_overrides or [] if str(o).split("=", 1)[0] == "method"), None)
    if spec is None:
        spec = f"method={sweep_methods}" if sweep_methods else "method=fp16"
    override = OverridesParser.create().parse_overrides([str(spec)])[0]
    names = list(override.sweep_string_iterator()) if override.is_sweep_override() else [str(override.value())]
    needs = []
    for name in names:
        chain = []  # the method's YAML, then the one it extends (`defaults: [aqlm_2bit, _self_]`), ...
        while name and (ROOT / "conf" / "method" / f"{name}.yaml").exists() and len(chain) < 8:
            chain.append(OmegaConf.load(ROOT / "conf" / "method" / f"{name}.yaml"))
            name = next((d for d in chain[-1].get("defaults", []) if isinstance(d, str) and d != "_self_"), None)
        knobs = OmegaConf.to_container(OmegaConf.merge(*reversed(chain))) if chain else {}
        if "_target_" not in knobs:
            continue  # an unknown method: Hydra names it itself, when it composes that job
        needs.append(get_class(knobs["_target_"]).time_limit_for(knobs) * max(1, int(repeats)))
    return max(needs, default=90)
