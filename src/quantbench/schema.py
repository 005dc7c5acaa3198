"""Typed schemas of the config groups, registered in Hydra's ConfigStore: each group's YAML files start from their
schema (`defaults: [<group>_schema, _self_]`), so Hydra itself refuses an unknown key or a value of the wrong type,
naming the key, before any job starts. Checks that need the model or the machine stay in the modules that own them
(`bench.plan`, `evaluation.plan`, `calibration.check`, ...), which run inside the job and so leave a FAILED run.

The method group has no schema here: each method's knobs are its class's constructor arguments (`_target_`), and
Hydra's instantiate refuses an unknown one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from quantbench.bench import HfKnobs, VllmKnobs
from quantbench.errors import ConfigError


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
    num_fewshot: int = 0
    batch_size: int = 1
    limit: Any = None  # documents per task: a count, a fraction below 1, or null for all


@dataclass
class QualityConfig:
    name: str = MISSING
    dataset: str | None = None  # null: no quality metrics
    num_tokens: int = 2048
    seq_len: int = 128
    batch_size: int = 8
    seed: int = 0


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: str = "cpu"
    dtype: str = "bfloat16"
    memory_gb: float | None = None
    memory_bandwidth_gbs: float | None = None  # datasheet; null: measured on the device once and cached
    eval_batch_size: int = 16
    # What one job asks of a parallel launcher (hydra/launcher=ray or submitit_slurm): the launcher, not quantbench,
    # then places each job on a GPU and node.
    job_gpus: int | None = None  # null: no GPU to ask for (CPU jobs)
    job_cpus: int = 1
    job_mem_gb: int | None = None  # null: no memory reservation (SLURM: the partition's default)
    job_time_min: int = 60  # SLURM's time limit per job


@dataclass
class BenchConfig:
    name: str = MISSING
    backend: str = "hf"  # a module of quantbench.bench.backends, or none
    prompt_tokens: int = 32
    output_tokens: int = 32
    streams: list[int] = field(default_factory=lambda: [1, 8])
    warmup: int = 1
    repeats: int = 3
    vllm: VllmKnobs = field(default_factory=VllmKnobs)
    hf: HfKnobs = field(default_factory=HfKnobs)


@dataclass
class CalibrationConfig:
    name: str = MISSING
    dataset: str = MISSING  # embedded:tiny, a local file, or a hub dataset id
    subset: str | None = None
    split: str | None = None
    revision: str | None = None
    text_column: str = "text"
    num_samples: int = 64
    seq_len: int = 128
    seed: int = 0


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
    """`quantbench register`'s selection policy (quantbench.policy says how each key is applied)."""

    registered_name: str = "quantbench-tiny"  # the Model Registry entry
    alias: str = "champion"  # moved to the winning version on every registration
    baseline: str = "fp16"  # the method accuracy drops are measured against
    max_disk_gb: float | None = None
    max_serve_mem_gb: float | None = None  # what serving took (the vLLM engine's GPU memory, or the bench's RSS)
    max_peak_mem_gb: float | None = None  # the maximum over quantize, eval and bench (quantizing may need far more)
    min_tokens_per_s_1_stream: float | None = None
    max_kl_mean: float | None = None  # quality_kl_mean: nats per token from the baseline's next-token distribution
    max_acc_drop_points: float | None = 2.0
    reject_significantly_worse: bool = False
    rank_by: str = "mean accuracy"  # "mean accuracy" (over the eval tasks, in %) or any run metric name
    tie_tolerance: float = 0.5
    tie_break: str | None = "tokens_per_s_1_stream"
    rank_across_backends: bool = False  # let a speed metric rank runs benchmarked by different backends or machines


SCHEMAS = {"model": ModelConfig, "eval": EvalConfig, "quality": QualityConfig, "hardware": HardwareConfig,
           "bench": BenchConfig, "calibration": CalibrationConfig, "tracking": TrackingConfig,
           "policy": PolicyConfig}  # fmt: skip


def register() -> None:
    """Store every schema as `<group>/<group>_schema` (what each group's YAML files name in their defaults). The
    launcher configs (conf/hydra/launcher/) are typed by their plugins' own schemas, which Hydra matches by name."""
    cs = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema)


def check(cfg) -> None:
    """Refuse keys that Hydra let in around the schemas: `+group.key=value` adds a key even to a typed group (Hydra
    1.3 lifts the struct flag for `+`), where it would be ignored silently. Raises ConfigError naming the key and the
    group's valid keys. Called inside the job (pipeline.prepare), so the run ends FAILED with that reason."""
    for group, schema in SCHEMAS.items():
        if group not in cfg:
            continue
        try:
            OmegaConf.merge(
                OmegaConf.structured(schema), OmegaConf.to_container(cfg[group])
            )  # a plain copy: `+` left the node open
        except OmegaConfBaseException as exc:
            keys = ", ".join(f.name for f in fields(schema))
            msg = str(exc).splitlines()[0]
            raise ConfigError(f"{group}: {msg}. The {group} group's keys are: {keys}.") from exc
