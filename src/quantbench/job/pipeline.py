"""One job, one process: validate -> track -> load+quantize+save -> measure -> evaluate -> benchmark -> log.

The pipeline knows steps, not methods: everything method-specific sits behind `methods.base.Method`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import resource
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from quantbench import measure, paths, schema
from quantbench.job import bench, calibration, evaluation, fingerprint, identity, models, quality, quantized_cache
from quantbench.errors import ConfigError
from quantbench.job.methods.base import Method, linear_kernel, torch_dtype
from quantbench.names import (
    MEM_BASIS_TAG,
    QUALITY_WINDOWS_TAG,
    RESUMED_TAG,
    SEARCH_STUDY_TAG,
    SEARCH_TRIAL_ENV,
    SEARCH_TRIAL_TAG,
)
from quantbench.tracking import writer
from quantbench.tracking.writer import Tracker

log = logging.getLogger(__name__)


@dataclass
class Job:
    """Everything a job needs, checked before any weights are loaded."""

    method: Method
    source: models.SourceModel
    model_config: object
    linear_shapes: dict[str, tuple[int, int]]  # the source model's quantizable layers, for bits per weight
    eval_plan: evaluation.EvalPlan | None
    bench_plan: bench.BenchPlan | None
    quality_plan: quality.QualityPlan | None = None
    quality_ids: torch.Tensor | None = None  # the held-out windows, cut before any weights load


def prepare(cfg: DictConfig, out_dir: Path | None = None) -> Job:
    """Validate every input cheaply, in the order a user would fix them; raise ConfigError on the first problem.
    `out_dir`: where the job will save its model (default: the temporary folder, where a job outside Hydra saves)."""
    schema.check(cfg)
    writer.check(cfg.tracking)
    check_store_for_launcher(str(cfg.tracking.uri), _launcher_target())
    hw = cfg.hardware
    torch_dtype(hw.dtype)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(hw.device)):
        raise ConfigError(f"hardware.device={hw.device!r}: quantbench runs on 'cpu', 'cuda' or 'cuda:<index>'.")
    if hw.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"hardware={hw.name} asks for device {hw.device!r} but no CUDA GPU is visible; "
            f"use hardware=cpu on this machine."
        )
    try:
        method: Method = hydra.utils.instantiate(cfg.method)
    except Exception as exc:
        raise ConfigError(f"method={cfg.method.get('name')}: cannot build it from its config: {exc}") from exc
    bench_plan = bench.plan(cfg.bench)
    bench.check_serving(bench_plan, hw, method.zero_points, method.serving_format, method.quantize_lm_head)
    if method.needs_calibration:
        calibration.check(cfg.calibration)
    if cfg.model.get("trust_remote_code", False):
        raise ConfigError(
            f"model.trust_remote_code=true (model={cfg.model.name}) is refused: quantbench loads the model in several "
            f"places that run no remote code (the quantizers' loaders, the fresh-process artifact check, the HF "
            f"benchmark's reload, vLLM's engine), so the model would run as different code in each, or not at all. "
            f"Use a model whose architecture your transformers version ships, with trust_remote_code=false."
        )
    source = models.resolve(cfg.model, cfg.paths.cache)
    try:
        model_config = source.config()
    except (OSError, ValueError, KeyError) as exc:  # no weights are read: a config.json transformers cannot use
        raise ConfigError(
            f"model.pretrained={source.reference!r}: transformers cannot read its config ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})."
        ) from exc
    method.validate(model_config, hw)
    skeleton = measure.skeleton_of_config(model_config)
    check_disk(cfg, measure.weights_bytes(skeleton, torch_dtype(hw.dtype)), out_dir or Path(tempfile.gettempdir()))
    eval_plan = evaluation.plan(cfg.eval, cfg.paths.cache)
    quality_plan = quality.plan(cfg.quality) if "quality" in cfg else None
    # the windows need only the tokenizer: a num_tokens the text cannot fill is told before any weights load
    quality_ids = quality.windows(source.tokenizer(), quality_plan) if quality_plan else None
    return Job(
        method,
        source,
        model_config,
        measure.linear_shapes(skeleton),
        eval_plan,
        bench_plan,
        quality_plan,
        quality_ids,
    )


def check_disk(cfg: DictConfig, artifact_bytes: int, out_dir: Path) -> None:
    """Refuse a job whose disks cannot hold what it writes after validating (its artifact, MLflow's copy of it under
    tracking.log_model=copy with a local artifact store, compile caches under paths.cache) plus `disk_headroom_gb` on
    each file system, before quantizing: a job that fills the disk mid-way fails in a library's own words, and its
    run may be left RUNNING when MLflow's SQLite store cannot write the failure either. The source model is already
    on disk by then (built or downloaded while resolving it); a copy into the quantized-model cache on another file
    system is not counted, since a cache store that fails leaves the job's results whole."""
    headroom = cfg.get("disk_headroom_gb")
    if headroom is None:
        return
    writes = [(out_dir, artifact_bytes, "the artifact"), (Path(cfg.paths.cache), 0, "caches")]
    if cfg.tracking.get("log_model") == "copy" and cfg.tracking.get("artifact_root"):  # a local folder (writer.py)
        writes.append((Path(cfg.tracking.artifact_root), artifact_bytes, "MLflow's copy of it"))
    free: dict[int, int] = {}
    by_disk: dict[int, list[tuple[Path, int, str]]] = {}
    for folder, size, what in writes:
        dev, free_bytes = measure.file_system(folder)
        free[dev] = free_bytes
        by_disk.setdefault(dev, []).append((folder, size, what))
    for dev, on_disk in by_disk.items():
        total = sum(size for _, size, _ in on_disk)
        if free[dev] < total + float(headroom) * 1e9:
            parts = [f"{what} {size / 1e9:.3g} GB at {folder}" for folder, size, what in on_disk if size]
            raise ConfigError(
                f"disk: {free[dev] / 1e9:.3g} GB free at {on_disk[0][0]}, but this job may write "
                f"{total / 1e9:.3g} GB there "
                f"({'; '.join(parts) or 'nothing but caches'}; the model's weights at 16 bits or wider, the largest "
                f"artifact a method saves) plus disk_headroom_gb={float(headroom):g} for compile caches and logs. "
                f"Free space there (`make clean-cache` removes the quantized-model cache), move the folders "
                f"(hydra.run.dir, hydra.sweep.dir, paths.cache, paths.mlruns), or set disk_headroom_gb=null to skip "
                f"this check."
            )


# Launchers that run a sweep's jobs at the same time, in other processes or on other machines.
PARALLEL_LAUNCHERS = ("hydra_plugins.hydra_ray_launcher", "hydra_plugins.hydra_submitit_launcher",
                      "hydra_plugins.hydra_joblib_launcher")  # fmt: skip


def _launcher_target() -> str:
    from hydra.core.hydra_config import HydraConfig

    return str(HydraConfig.get().launcher.get("_target_", "")) if HydraConfig.initialized() else ""


def check_store_for_launcher(tracking_uri: str, launcher_target: str) -> None:
    """Jobs that run at once must not share a SQLite file: SQLite takes one writer at a time ("database is locked"
    under contention), and a worker on another node cannot reach the file at all. Refused before any work."""
    if tracking_uri.startswith("sqlite:") and launcher_target.startswith(PARALLEL_LAUNCHERS):
        raise ConfigError(
            f"This sweep runs its jobs in parallel ({launcher_target.rsplit('.', 1)[-1]}) but logs to the SQLite file "
            f"{tracking_uri.removeprefix('sqlite:///')}, which takes one writer at a time and which workers on other "
            f"machines cannot reach. Log to a tracking server instead: start one with `make server` (PostgreSQL "
            f"behind `mlflow server`), then add tracking=server and set MLFLOW_TRACKING_URI to its URL "
            f"(default http://127.0.0.1:5000), or point MLFLOW_TRACKING_URI at your team's server."
        )


@dataclass
class Outcome:
    """What a job did: FINISHED (ran now) or SKIPPED (a FINISHED run with its job key was already there: that run,
    `resumed_from`, stands for it)."""

    status: str
    run_id: str
    metrics: dict[str, float]
    resumed_from: str | None = None


IDENTITY_FILE = "identity.json"  # each stage's key, what it hashed and what it logged (metrics, tags, artifacts)
LAYOUT_FILE = "layout.json"  # a mixed-precision method's format per linear layer


@dataclass
class StageResult:
    """What one stage produced. `run` logs it once: params, metrics, tags, then the JSON artifacts."""

    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, object] = field(default_factory=dict)
    params: dict[str, object] = field(default_factory=dict)
    artifacts: dict[str, object] = field(default_factory=dict)  # artifact file -> JSON content
    steps: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # metrics logged at an MLflow step


@dataclass
class Work:
    """A job in progress: its config, its run, its model folder and what the stages have made so far."""

    cfg: DictConfig
    tracker: Tracker
    out_dir: Path  # this job's own: no other job writes or deletes here
    force: bool
    job: Job | None = None
    model: torch.nn.Module | None = None
    tokenizer: object = None
    calib: list[str] | None = None
    cached: quantized_cache.Entry | None = None
    quantize_key: str = ""
    quantize_inputs: dict = field(default_factory=dict)
    probe: list[int] = field(default_factory=list)
    record: dict = field(default_factory=dict)  # identity.json: each stage's key, inputs and outputs
    artifact_key: str = ""  # a hash of the saved files' sha256s (verify): what the folder holds
    metrics: dict[str, float] = field(default_factory=dict)  # everything logged, for the job's summary
    mem_bases: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)  # for job_s

    @property
    def hardware(self) -> DictConfig:
        return self.cfg.hardware

    @property
    def cache_on(self) -> bool:
        """Whether the artifact goes through the quantized-model cache: on, and a method that declares its saved
        folder reloadable as it quantized it (fp16 and bitsandbytes load rather than quantize)."""
        enabled = bool((self.cfg.get("quantized_cache") or {}).get("enabled", False))
        return enabled and self.job is not None and self.job.method.cacheable


def run(cfg: DictConfig, job_dir: Path | None = None) -> Outcome:
    """Run one job, unless the store already has a FINISHED run of it (the same job key, quantbench.job.identity); a
    stage whose results a FINISHED run already has is taken from that run. `force=true` reruns everything."""
    started = time.perf_counter()
    with measure.Stopwatch() as setup:
        tracker = Tracker(cfg.tracking)
        tracker.fail_interrupted_runs()
        key = identity.job_key(cfg)  # once: it hashes the model's files (remembered) and a calibration file
        force = bool(cfg.get("force", False))
        done = None if force else tracker.finished_run("config_hash", key)
    if done is not None:
        return _skip(cfg, tracker, done, key)
    with tracker.run(cfg, run_name=f"{cfg.method.name}-{cfg.model.name}", tags=_run_tags(cfg), key=key):
        work = Work(
            cfg, tracker, Path(job_dir or _job_output_dir()) / f"model-{tracker.run_id}", force, started=started
        )
        try:
            with _stage_time(work, "validate"):
                _log(work, validate(work))
            _log(work, StageResult({"stage_setup_s": setup.seconds}))  # after validate: a refused run logs no metric
            for name, stage in (
                ("quantize", restore_or_quantize),
                ("describe", describe),
                ("verify", verify),
            ):
                with _stage_time(work, name):
                    _log(work, stage(work))
            for name, stage in (("eval", evaluate_stage), ("quality", quality_stage), ("bench", bench_stage)):
                with _stage_time(work, name):
                    if name in work.record and not _reuse(work, name):  # else taken from an earlier run
                        mark = tracker.mark()
                        _log(work, stage(work))
                        work.record[name]["outputs"] = tracker.since(mark)
            _log(work, finish(work))
        finally:
            work.model = None
            _release_memory()
    log.info("Finished %s: %s", cfg.method.name, {k: round(v, 4) for k, v in sorted(work.metrics.items())})
    return Outcome("FINISHED", tracker.run_id, work.metrics)


@contextlib.contextmanager
def _stage_time(work: Work, name: str) -> Iterator[None]:
    """Log `stage_<name>_s`, the wall seconds this job spent in the stage (a reused stage's: the copy), after the
    stage's own outputs, so that a later run reusing them does not take this run's time as its own."""
    cpu = _cpu_seconds()
    with measure.Stopwatch() as took:
        yield
    work.tracker.log_metrics({f"stage_{name}_s": took.seconds})
    work.metrics[f"stage_{name}_s"] = took.seconds
    # CPU seconds beside the wall time: on a shared machine the wall time also counts the other processes
    log.info(
        "Stage %s: %.1f s wall, %.1f s CPU (this process and its children)", name, took.seconds, _cpu_seconds() - cpu
    )


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _log(work: Work, result: StageResult) -> None:
    work.tracker.log_params(result.params)
    work.tracker.log_metrics(result.metrics)
    for step, metrics in result.steps:
        work.tracker.log_metrics(metrics, step=step)
    work.tracker.set_tags(result.tags)
    for name, content in result.artifacts.items():
        work.tracker.log_json(content, name)
    work.metrics |= result.metrics


def _run_tags(cfg: DictConfig) -> dict[str, str]:
    tags = {
        "model": cfg.model.name,
        "hardware": cfg.hardware.name,
        "eval": cfg.eval.name,
        "bench": cfg.bench.name,
        "method": cfg.method.name,
        **_sweep_tags(),
    }
    if models.has_random_weights(str(cfg.model.pretrained)):
        tags["weights"] = "random"  # speed, size and memory are the architecture's; accuracy is chance
    return tags


# -- the stages, in order: each takes the job in progress and returns what it made --------------------------------


def validate(work: Work) -> StageResult:
    """Every input checked before any weights load (`prepare`); a hub model's repo and resolved commit tagged."""
    try:
        work.job = prepare(work.cfg, work.out_dir)
    except ConfigError as exc:
        log.error("Bad input: %s", exc)
        raise
    return StageResult(tags=work.job.method.tags() | work.job.source.tags())


def restore_or_quantize(work: Work) -> StageResult:
    """The quantized model in memory and its folder on disk: from the quantized-model cache when an earlier job
    stored the same quantization (its key: quantbench.job.identity), else quantized now."""
    cfg, job = work.cfg, work.job
    loaded = _calibration(cfg, job, seed=int(cfg.calibration.seed))
    work.calib = loaded.texts if loaded else None
    work.quantize_inputs = identity.quantize_inputs(
        cfg,
        type(job.method),
        identity.model(job.source, Path(cfg.paths.cache)),
        identity.loaded_calibration(loaded.identity) if loaded else None,
    )
    work.quantize_key = identity.key_of(work.quantize_inputs)
    work.record["quantize"] = {"key": work.quantize_key, "inputs": work.quantize_inputs}
    tags: dict[str, object] = {"identity.quantize": work.quantize_key}
    cache_dir = Path(cfg.quantized_cache.dir) if work.cache_on else None
    work.cached = quantized_cache.lookup(cache_dir, work.quantize_key) if cache_dir else None
    with measure.PeakMemory() as mem, measure.Stopwatch() as took:
        if work.cached is not None:
            log.info(
                "Reusing the quantized model from the cache (%s, stored by run %s): no quantization",
                work.cached.folder.parent,
                work.cached.manifest.get("run_id"),
            )
            tags |= _copied_tags(quantized_cache.restore(work.cached, work.out_dir))
            work.model = job.method.load_saved(work.out_dir, job.source, cfg.hardware)
        else:
            log.info("Quantizing %s with %s", job.source.reference, job.method.name)
            target = quantized_cache.discard(work.out_dir)
            work.model = job.method.quantize(job.source, target, cfg.hardware, work.calib)
    work.tokenizer = job.source.tokenizer()
    work.tokenizer.save_pretrained(work.out_dir)
    # from a cache hit, the quantization's own time and peak as measured when it ran (the report compares methods'
    # costs), and what the reuse took beside them
    if work.cached is not None:
        metrics = work.cached.manifest["metrics"] | {"cache_restore_s": took.seconds}
    else:
        metrics = {"quantize_s": took.seconds, "quantize_peak_mem_gb": mem.gb}
    work.mem_bases["quantize_peak_mem_gb"] = mem.basis  # a cache hit's: quantized on this device type
    tags |= {
        "cache": "off" if not work.cache_on else "hit" if work.cached is not None else "miss",
        "cache_key": work.quantize_key if work.cache_on else None,
    }
    return StageResult(metrics, tags, params=loaded.identity if loaded else {})


def describe(work: Work) -> StageResult:
    """The artifact's size and format, and the kernels that run its layers in memory."""
    job = work.job
    metrics = {
        "disk_gb": measure.disk_bytes(work.out_dir) / measure.GB,
        "weight_gb": measure.weight_bytes(work.out_dir) / measure.GB,
        "bits_per_weight": measure.bits_per_weight(work.out_dir, job.linear_shapes),
    }
    # bits_per_weight covers the decoder's linear layers only, as for every method; the head's own figure shows
    # what method.quantize_lm_head changed (none where the head is tied to the embeddings and not stored)
    head = measure.lm_head_bits_per_weight(work.out_dir, job.model_config)
    if head is not None:
        metrics["lm_head_bits_per_weight"] = head
    tags = {
        # some methods name their format only once they know the dtype (fp16: safetensors-bfloat16)
        "quant_format": job.method.quant_format,
        "eval_kernel": linear_kernel(work.model, list(job.linear_shapes)),
    } | _mem_tags(work.mem_bases)
    layout = job.method.layout(list(job.linear_shapes))
    if layout is None:
        return StageResult(metrics, tags)
    # mixed precision (method.keep): what each layer was stored as, which bits_per_weight and disk_gb measure
    tags["layout"] = ", ".join(f"{fmt} x{n}" for fmt, n in Counter(layout.values()).most_common())
    return StageResult(metrics, tags, artifacts={LAYOUT_FILE: layout})


def verify(work: Work) -> StageResult:
    """The saved folder reloaded in a fresh process must give the in-memory model's outputs; only then is it
    stored in the cache, and the later stages' keys (which include the files' sha256s) are known."""
    cfg, job = work.cfg, work.job
    work.probe = fingerprint.input_ids(work.tokenizer, work.calib[0] if work.calib else _probe_text(cfg))
    metrics = fingerprint.verify(
        work.model,
        work.out_dir,
        work.probe,
        cfg.hardware.device,
        loading_attributes=job.method.loading_attributes(),
        timeout_s=(cfg.get("timeouts") or {}).get("artifact_check_s"),
    )
    # the files' sha256s are logged whether or not the files are: registration and users check against them
    artifact = measure.file_sha256(work.out_dir)
    work.artifact_key = identity.key_of(artifact)
    tags: dict[str, object] = {"artifact_verified": "true"}
    if work.cache_on and work.cached is None:  # only a verified artifact is stored
        quantized = {k: work.metrics[k] for k in ("quantize_s", "quantize_peak_mem_gb")}
        tags |= _store(cfg, work.tracker.run_id, work.quantize_key, work.quantize_inputs, work.out_dir, quantized)
    stages = identity.later_stage_inputs(cfg, work.quantize_key, artifact)
    for stage, inputs in stages.items():
        work.record[stage] = {"key": identity.key_of(inputs), "inputs": inputs}
    tags |= {f"identity.{stage}": work.record[stage]["key"] for stage in stages}
    return StageResult(metrics, tags, artifacts={measure.MODEL_SHA256: artifact})


def evaluate_stage(work: Work) -> StageResult:
    """lm-eval on the in-memory model, then the calibration repeats."""
    cfg, job = work.cfg, work.job
    with measure.PeakMemory() as mem, measure.Stopwatch() as took:
        result = evaluation.evaluate(work.model, work.tokenizer, job.eval_plan, seed=int(cfg.seed))
    first = StageResult(
        result.metrics | {"eval_s": took.seconds, "eval_peak_mem_gb": mem.gb},
        _mem_tags({"eval_peak_mem_gb": mem.basis}),
        artifacts={
            evaluation.RESULTS: result.results,
            evaluation.SAMPLES: result.samples,
            evaluation.PER_TASK: result.per_task,
        },
    )
    _log(work, first)  # before the repeats: a repeat that fails leaves the first seed's results logged
    nll = work.metrics["fingerprint_nll"]
    return StageResult(_repeat_accuracy(cfg, job, work.tokenizer, result.metrics, work.tracker, work.probe, nll))


def quality_stage(work: Work) -> StageResult:
    """KL from the baseline, top-1 agreement and perplexity on held-out text."""
    with measure.Stopwatch() as took:
        compared = _quality(work.cfg, work.job, work.model, work.tokenizer)
    return StageResult(
        compared.metrics | {"quality_s": took.seconds},
        {QUALITY_WINDOWS_TAG: quality.windows_id(work.job.quality_ids)},
        artifacts={quality.PER_WINDOW: compared.per_window},
    )


def bench_stage(work: Work) -> StageResult:
    """Tokens/s beside the bandwidth bound, from the backend the plan names."""
    if bench.loads_from_disk(work.job.bench_plan) and work.hardware.device.startswith("cuda"):
        # vLLM serves the saved folder and takes the GPU memory it is given: free the evaluated copy
        work.model = None
        _release_memory()
    # served from a path named after the files, so that vLLM's compile cache (keyed by the path) serves every copy
    model_dir = paths.content_view(work.out_dir, work.artifact_key, Path(work.cfg.paths.cache))
    with measure.PeakMemory() as mem:
        speed = bench.run(work.job.bench_plan, work.model, work.tokenizer, model_dir, work.hardware)
    metrics = speed.metrics | {"bench_peak_mem_gb": mem.gb}
    # what serving the model took: the backend's own figure (vLLM's engine) or this process's bench peak
    serve_basis = speed.tags.pop(f"{MEM_BASIS_TAG}.serve_mem_gb", mem.basis)
    metrics.setdefault("serve_mem_gb", metrics["bench_peak_mem_gb"])
    tags = speed.tags | _mem_tags({"bench_peak_mem_gb": mem.basis, "serve_mem_gb": serve_basis})
    artifacts = {"bench/benchmark.json": speed.detail, **speed.artifacts}
    return StageResult(metrics, tags, artifacts=artifacts, steps=speed.steps)


def finish(work: Work) -> StageResult:
    """The job's peak memory over its stages (each stage's basis, a reused stage's from the run that measured it),
    the identity record, then the model as `tracking.log_model` says: last, so that every metric is linked to it."""
    peaks = [k for k in work.metrics if k.endswith("_peak_mem_gb")]
    run_tags = work.tracker.client.get_run(work.tracker.run_id).data.tags
    bases = {k.split(".", 1)[1]: v for k, v in run_tags.items() if k.startswith(f"{MEM_BASIS_TAG}.")}
    basis = " + ".join(sorted({bases.get(k, "unknown") for k in peaks}))
    # job_s: from the job's start to here; the model's upload below is the one step after it (the run's end time
    # shows it), as the metrics are linked to the model only once they are all logged
    _log(
        work,
        StageResult(
            {"peak_mem_gb": max(work.metrics[k] for k in peaks), "job_s": time.perf_counter() - work.started},
            _mem_tags({"peak_mem_gb": basis}),
            artifacts={IDENTITY_FILE: work.record},
        ),
    )
    work.tracker.log_model(work.out_dir, str(work.cfg.tracking.log_model))
    return StageResult()


def _skip(cfg: DictConfig, tracker: Tracker, done, key: str) -> Outcome:
    """The job is done: its FINISHED run stands for it, and counts as the current sweep's too (report, register and
    recommend read the `resumed_in.<sweep_id>` tag)."""
    run_id = done.info.run_id
    log.info(
        "Skipping %s: run %s of experiment %r already FINISHED with this job's identity (config_hash %s: the same "
        "config, quantbench source, library versions, machine class, model and calibration contents and "
        "tracking.log_model); force=true reruns it",
        cfg.method.name,
        run_id,
        cfg.tracking.experiment,
        key,
    )
    sweep = _sweep_tags()
    if "sweep_id" in sweep:
        tracker.client.set_tag(run_id, f"{RESUMED_TAG}.{sweep['sweep_id']}", sweep["job_num"])
    if SEARCH_TRIAL_TAG in sweep:  # the trial reuses this run: the study's trial number is on it
        tracker.client.set_tag(run_id, f"{SEARCH_TRIAL_TAG}.{sweep[SEARCH_STUDY_TAG]}", sweep[SEARCH_TRIAL_TAG])
    return Outcome("SKIPPED", run_id, dict(done.data.metrics), resumed_from=run_id)


def _reuse(work: Work, stage: str) -> bool:
    """Copy the stage's results from the newest FINISHED run of the experiment with the same stage key (tag
    `<stage>_resumed_from`: the run that measured them); False where there is none (or force=true): run it."""
    tracker, record = work.tracker, work.record
    key = record[stage]["key"]
    source = None if work.force else tracker.finished_run(f"identity.{stage}", key)
    if source is None:
        return False
    try:
        outputs = tracker.read_json(source.info.run_id, IDENTITY_FILE)[stage]["outputs"]
        work.metrics |= tracker.copy_outputs(source, outputs)
    except (MlflowException, OSError, KeyError, TypeError, ValueError) as exc:
        log.warning(
            "Cannot take the %s results of run %s (%s: %s): running the stage again",
            stage,
            source.info.run_id,
            type(exc).__name__,
            exc,
        )
        return False
    origin = source.data.tags.get(f"{stage}_resumed_from", source.info.run_id)
    tracker.set_tags({f"{stage}_resumed_from": origin})
    record[stage] |= {"outputs": outputs, "resumed_from": origin}
    log.info("Reusing the %s results of run %s (the same %s identity %s): not run again", stage, origin, stage, key)
    return True


def _store(cfg: DictConfig, run_id: str, key: str, inputs: dict, out_dir: Path, quantized: dict) -> dict[str, str]:
    """Store the verified artifact in the cache; returns the tags that say how it went. A store that fails (a full
    disk) leaves no entry and does not fail the run, whose results stand: it is logged, and tagged `cache_store`."""
    try:
        entry = quantized_cache.store(Path(cfg.quantized_cache.dir), key, inputs, out_dir, quantized, run_id)
    except OSError as exc:
        log.warning(
            "Could not store the quantized model in the cache %s (%s): nothing was stored, the next job with this "
            "key quantizes again",
            cfg.quantized_cache.dir,
            exc,
        )
        return {"cache_store": f"failed: {exc}"[:500]}
    return {"cache_store": "stored"} | _copied_tags(entry.copied)


def _copied_tags(copied: list[str]) -> dict[str, str]:
    """Where weight shards were copied, not hard-linked, between the job folder and the cache."""
    return {"cache_link": f"copied, not linked: {'; '.join(copied)}"[:500]} if copied else {}


def _calibration(cfg: DictConfig, job: Job, seed: int) -> calibration.Calibration | None:
    """The calibration texts for this seed and the identity of what they were read from (file sha256, hub commit)."""
    if not job.method.needs_calibration:
        return None
    return calibration.load(OmegaConf.merge(cfg.calibration, {"seed": seed}), cfg.paths.cache)


def _quality(cfg: DictConfig, job: Job, model, tokenizer) -> quality.Comparison:
    """KL from the baseline, top-1 agreement and perplexity on held-out text (quantbench.job.quality). The baseline's
    distributions come from the cache, from this model if it is the baseline, or from the unquantized source."""
    plan, hw, ids = job.quality_plan, cfg.hardware, job.quality_ids
    path = quality.baseline_path(cfg.paths.cache, job.source, str(hw.dtype), str(hw.device), ids)
    if path.exists() or job.method.is_baseline:
        base = quality.baseline(model, ids, plan, path)
    else:
        log.info(
            "No baseline distributions for %s on this text yet: computing them with the unquantized model",
            job.source.reference,
        )
        reference = job.source.load(dtype=torch_dtype(hw.dtype), device=hw.device)
        base = quality.baseline(reference, ids, plan, path)
        del reference
        _release_memory()
    return quality.compare(model, ids, base, plan.batch_size)


def _probe_text(cfg: DictConfig) -> str:
    """Text for the artifact fingerprint: the model's own language for the embedded model, English otherwise."""
    if str(cfg.calibration.dataset).startswith(models.EMBEDDED_PREFIX):
        return calibration.texts(cfg.calibration, cfg.paths.cache)[0]
    return calibration.ENGLISH_PROBE


def _repeat_accuracy(
    cfg: DictConfig, job: Job, tokenizer, first: dict[str, float], tracker: Tracker, probe: list[int], first_nll: float
) -> dict[str, float]:
    """Re-quantize with calibration seeds seed+1 .. seed+repeats-1, evaluate each, log mean and spread.

    Only calibrated methods are repeated: re-running a deterministic quantizer and evaluation gives the same
    number again and measures nothing. The artifact, the benchmark and `<task>_acc` stay those of the first seed.
    """
    repeats = int(cfg.get("repeats", 1))
    if repeats < 2 or not job.method.needs_calibration:
        return {}
    accs = {f"{t}_{evaluation.ACCURACY}": [first[f"{t}_{evaluation.ACCURACY}"]] for t in job.eval_plan.tasks}
    tracker.log_metrics({f"{k}_repeat": v[0] for k, v in accs.items()}, step=0)
    # the probe's loss per seed shows that each seed really gave another model (the first is the artifact's)
    tracker.log_metrics({"fingerprint_nll_repeat": first_nll}, step=0)
    base = int(cfg.calibration.seed)
    for r in range(1, repeats):
        log.info("Repeat %d/%d: re-quantizing with calibration seed %d", r + 1, repeats, base + r)
        with tempfile.TemporaryDirectory() as tmp:
            model = job.method.quantize(job.source, Path(tmp), cfg.hardware, _calibration(cfg, job, base + r).texts)
            result = evaluation.evaluate(model, tokenizer, job.eval_plan, seed=int(cfg.seed))
            tracker.log_metrics({"fingerprint_nll_repeat": fingerprint.of_model(model, probe).nll}, step=r)
            del model
            _release_memory()
        for k in accs:
            accs[k].append(result.metrics[k])
        tracker.log_metrics({f"{k}_repeat": result.metrics[k] for k in accs}, step=r)
    out = {"acc_repeats": float(repeats)}
    for k, values in accs.items():
        out[f"{k}_mean"] = statistics.mean(values)
        out[f"{k}_std"] = statistics.stdev(values)
    return out


def _mem_tags(bases: dict[str, str]) -> dict[str, str]:
    """mem_basis.<metric>: what each memory figure measured (measure.MEM_BASES), so that only like is compared."""
    return {f"{MEM_BASIS_TAG}.{name}": basis for name, basis in bases.items()}


def _release_memory() -> None:
    """The jobs of a multirun share one process: free this job's memory before the next starts."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _job_output_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return HydraConfig.get().runtime.output_dir
    return tempfile.mkdtemp(prefix="quantbench-")


def _sweep_tags() -> dict[str, str]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    tags = {"hydra_output_dir": hc.runtime.output_dir}
    if hc.mode == RunMode.MULTIRUN:
        tags |= {
            "sweep_id": Path(hc.sweep.dir).name,
            "sweep_dir": str(hc.sweep.dir),
            "job_num": str(hc.job.num),
            "overrides": " ".join(hc.overrides.task),
        }
        trial = hc.job.env_set.get(SEARCH_TRIAL_ENV)
        if trial is not None:  # a trial of an Optuna search (hydra_plugins/quantbench_optuna_sweeper)
            sampler = str(OmegaConf.select(hc.sweeper, "sampler._target_", default="?")).rsplit(".", 1)[-1]
            tags |= {
                SEARCH_STUDY_TAG: str(hc.sweeper.study_name),
                SEARCH_TRIAL_TAG: str(trial),
                "search_sampler": sampler,
            }
    return tags
