"""One job, one process: validate -> track -> load+quantize+save -> measure -> evaluate -> benchmark -> log.

The pipeline knows steps, not methods: everything method-specific sits behind `methods.base.Method`.
"""

from __future__ import annotations

import gc
import logging
import re
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from quantbench import (
    bench,
    calibration,
    evaluation,
    fingerprint,
    identity,
    measure,
    models,
    quality,
    quantized_cache,
    schema,
    tracking,
)
from quantbench.errors import ConfigError
from quantbench.methods.base import Method, linear_kernel, torch_dtype
from quantbench.runs import MEM_BASIS_TAG, QUALITY_WINDOWS_TAG, RESUMED_TAG
from quantbench.tracking import Tracker

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


def prepare(cfg: DictConfig) -> Job:
    """Validate every input cheaply, in the order a user would fix them; raise ConfigError on the first problem."""
    schema.check(cfg)
    tracking.check(cfg.tracking)
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
    bench.check_serving(bench_plan, hw, method.zero_points)
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
    eval_plan = evaluation.plan(cfg.eval, cfg.paths.cache)
    quality_plan = quality.plan(cfg.quality) if "quality" in cfg else None
    # the windows need only the tokenizer: a num_tokens the text cannot fill is told before any weights load
    quality_ids = quality.windows(source.tokenizer(), quality_plan) if quality_plan else None
    return Job(
        method,
        source,
        model_config,
        measure.linear_shapes_of_config(model_config),
        eval_plan,
        bench_plan,
        quality_plan,
        quality_ids,
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


def run(cfg: DictConfig, job_dir: Path | None = None) -> Outcome:
    """Run one job, unless the store already has a FINISHED run of it (the same job key, quantbench.identity); a
    stage whose results a FINISHED run already has is taken from that run. `force=true` reruns everything."""
    job_dir = Path(job_dir or _job_output_dir())
    tracker = Tracker(cfg.tracking)
    tracker.fail_interrupted_runs()
    key = identity.job_key(cfg)  # once: it hashes the model's files (remembered) and a calibration file
    force = bool(cfg.get("force", False))
    if not force:
        done = tracker.finished_run("config_hash", key)
        if done is not None:
            return _skip(cfg, tracker, done, key)
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
    metrics: dict[str, float] = {}
    with tracker.run(cfg, run_name=f"{cfg.method.name}-{cfg.model.name}", tags=tags, key=key):
        out_dir = job_dir / f"model-{tracker.run_id}"  # this job's own: no other job writes or deletes here
        try:
            job = prepare(cfg)
        except ConfigError as exc:
            log.error("Bad input: %s", exc)
            raise
        tracker.set_tags(job.method.tags() | job.source.tags())  # a hub model's repo and resolved commit
        model = None
        try:
            loaded = _calibration(cfg, job, seed=int(cfg.calibration.seed))
            calib = loaded.texts if loaded else None
            if loaded:
                tracker.log_params(loaded.identity)  # what the texts were read from: file sha256, hub commit
            quantize_inputs = identity.quantize_inputs(
                cfg,
                type(job.method),
                identity.model(job.source, Path(cfg.paths.cache)),
                identity.loaded_calibration(loaded.identity) if loaded else None,
            )
            quantize_key = identity.key_of(quantize_inputs)
            record = {"quantize": {"key": quantize_key, "inputs": quantize_inputs}}
            tracker.set_tags({"identity.quantize": quantize_key})
            cache_on = _cacheable(cfg, job)
            cached = quantized_cache.lookup(Path(cfg.quantized_cache.dir), quantize_key) if cache_on else None
            with measure.PeakMemory() as mem, measure.Stopwatch() as quantize_time:
                if cached is not None:
                    log.info(
                        "Reusing the quantized model from the cache (%s, stored by run %s): no quantization",
                        cached.folder.parent,
                        cached.manifest.get("run_id"),
                    )
                    _tag_copied(tracker, quantized_cache.restore(cached, out_dir))
                    model = job.method.load_saved(out_dir, job.source, cfg.hardware)
                else:
                    log.info("Quantizing %s with %s", job.source.reference, job.method.name)
                    model = job.method.quantize(job.source, quantized_cache.discard(out_dir), cfg.hardware, calib)
            tokenizer = job.source.tokenizer()
            tokenizer.save_pretrained(out_dir)
            # from a cache hit, the quantization's own time and peak as measured when it ran (the report compares
            # methods' costs); what the reuse took beside them
            quantized = (
                cached.manifest["metrics"]
                if cached is not None
                else {"quantize_s": quantize_time.seconds, "quantize_peak_mem_gb": mem.gb}
            )
            mem_bases = {"quantize_peak_mem_gb": mem.basis}  # a cache hit's: quantized on this device type
            metrics |= quantized | {
                "disk_gb": measure.disk_bytes(out_dir) / measure.GB,
                "weight_gb": measure.weight_bytes(out_dir) / measure.GB,
                "bits_per_weight": measure.bits_per_weight(out_dir, job.linear_shapes),
            }
            if cached is not None:
                metrics["cache_restore_s"] = quantize_time.seconds
            # some methods name their format only once they know the dtype (fp16: safetensors-bfloat16)
            tracker.set_tags({"quant_format": job.method.quant_format})
            tracker.set_tags(
                {
                    "cache": "off" if not cache_on else "hit" if cached is not None else "miss",
                    "cache_key": quantize_key if cache_on else None,
                }
            )
            tracker.log_metrics(metrics)
            tracker.set_tags(_mem_tags(mem_bases))
            tracker.set_tags({"eval_kernel": linear_kernel(model, list(job.linear_shapes))})

            probe = fingerprint.input_ids(tokenizer, calib[0] if calib else _probe_text(cfg))
            metrics |= fingerprint.verify(
                model,
                out_dir,
                probe,
                cfg.hardware.device,
                loading_attributes=job.method.loading_attributes(),
                timeout_s=(cfg.get("timeouts") or {}).get("artifact_check_s"),
            )
            tracker.log_metrics(metrics)
            tracker.set_tags({"artifact_verified": "true"})
            # the files' sha256s are logged whether or not the files are: registration and users check against them
            artifact = measure.file_sha256(out_dir)
            tracker.log_json(artifact, measure.MODEL_SHA256)
            if cache_on and cached is None:  # only a verified artifact is stored
                _store(cfg, tracker, quantize_key, quantize_inputs, out_dir, quantized)

            stages = identity.later_stage_inputs(cfg, quantize_key, artifact)
            for stage, inputs in stages.items():
                record[stage] = {"key": identity.key_of(inputs), "inputs": inputs}
            tracker.set_tags({f"identity.{stage}": record[stage]["key"] for stage in stages})

            for stage in stages:  # eval, quality, bench, in order; each taken from an earlier run that has its key
                reused = _reused(tracker, record, stage, force)
                if reused is not None:
                    metrics |= reused
                    continue
                if (
                    stage == "bench"
                    and bench.loads_from_disk(job.bench_plan)
                    and cfg.hardware.device.startswith("cuda")
                ):
                    # vLLM serves the saved folder and takes the GPU memory it is given: free the evaluated copy.
                    model = None
                    _release_memory()
                mark = tracker.mark()
                if stage == "eval":
                    metrics |= _evaluate(cfg, job, tracker, model, tokenizer, probe, metrics["fingerprint_nll"])
                elif stage == "quality":
                    metrics |= _measure_quality(cfg, job, tracker, model, tokenizer)
                else:
                    metrics |= _benchmark(cfg, job, tracker, model, tokenizer, out_dir)
                record[stage]["outputs"] = tracker.since(mark)

            peaks = [k for k in metrics if k.endswith("_peak_mem_gb")]
            metrics["peak_mem_gb"] = max(metrics[k] for k in peaks)
            # each stage tagged what its figures measured (a reused stage: the run that measured it)
            tags = tracker.client.get_run(tracker.run_id).data.tags
            mem_bases |= {k.split(".", 1)[1]: v for k, v in tags.items() if k.startswith(f"{MEM_BASIS_TAG}.")}
            mem_bases["peak_mem_gb"] = " + ".join(sorted({mem_bases.get(k, "unknown") for k in peaks}))
            tracker.log_metrics({"peak_mem_gb": metrics["peak_mem_gb"]})
            tracker.set_tags(_mem_tags(mem_bases))
            tracker.log_json(record, IDENTITY_FILE)
            tracker.log_model(out_dir, str(cfg.tracking.log_model))
        finally:
            del model
            _release_memory()
    log.info("Finished %s: %s", cfg.method.name, {k: round(v, 4) for k, v in sorted(metrics.items())})
    return Outcome("FINISHED", tracker.run_id, metrics)


def _evaluate(cfg: DictConfig, job: Job, tracker: Tracker, model, tokenizer, probe: list[int], nll: float) -> dict:
    """lm-eval on the in-memory model, then the calibration repeats; logged, and returned."""
    with measure.PeakMemory() as mem, measure.Stopwatch() as eval_time:
        result = evaluation.evaluate(model, tokenizer, job.eval_plan, seed=int(cfg.seed))
    metrics = result.metrics | {"eval_s": eval_time.seconds, "eval_peak_mem_gb": mem.gb}
    tracker.log_metrics(metrics)
    tracker.set_tags(_mem_tags({"eval_peak_mem_gb": mem.basis}))
    tracker.log_json(result.results, evaluation.RESULTS)
    tracker.log_json(result.samples, evaluation.SAMPLES)
    tracker.log_json(result.per_task, evaluation.PER_TASK)
    return metrics | _repeat_accuracy(cfg, job, tokenizer, result.metrics, tracker, probe, nll)


def _measure_quality(cfg: DictConfig, job: Job, tracker: Tracker, model, tokenizer) -> dict:
    with measure.Stopwatch() as quality_time:
        compared = _quality(cfg, job, model, tokenizer)
    metrics = compared.metrics | {"quality_s": quality_time.seconds}
    tracker.log_metrics(metrics)
    tracker.set_tags({QUALITY_WINDOWS_TAG: quality.windows_id(job.quality_ids)})
    tracker.log_json(compared.per_window, quality.PER_WINDOW)
    return metrics


def _benchmark(cfg: DictConfig, job: Job, tracker: Tracker, model, tokenizer, out_dir: Path) -> dict:
    with measure.PeakMemory() as mem:
        speed = bench.run(job.bench_plan, model, tokenizer, out_dir, cfg.hardware)
    metrics = speed.metrics | {"bench_peak_mem_gb": mem.gb}
    # what serving the model took: the backend's own figure (vLLM's engine) or this process's bench peak
    serve_basis = speed.tags.pop(f"{MEM_BASIS_TAG}.serve_mem_gb", mem.basis)
    metrics.setdefault("serve_mem_gb", metrics["bench_peak_mem_gb"])
    tracker.log_metrics(metrics)
    tracker.set_tags(speed.tags | _mem_tags({"bench_peak_mem_gb": mem.basis, "serve_mem_gb": serve_basis}))
    tracker.log_json(speed.detail, "bench/benchmark.json")
    return metrics


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
    return Outcome("SKIPPED", run_id, dict(done.data.metrics), resumed_from=run_id)


def _reused(tracker: Tracker, record: dict, stage: str, force: bool) -> dict[str, float] | None:
    """The stage's results copied from the newest FINISHED run of the experiment with the same stage key (tag
    `<stage>_resumed_from`: the run that measured them), or None where there is none (or force=true): run it."""
    key = record[stage]["key"]
    source = None if force else tracker.finished_run(f"identity.{stage}", key)
    if source is None:
        return None
    try:
        outputs = tracker.read_json(source.info.run_id, IDENTITY_FILE)[stage]["outputs"]
        metrics = tracker.copy_outputs(source, outputs)
    except (MlflowException, OSError, KeyError, TypeError, ValueError) as exc:
        log.warning(
            "Cannot take the %s results of run %s (%s: %s): running the stage again",
            stage,
            source.info.run_id,
            type(exc).__name__,
            exc,
        )
        return None
    origin = source.data.tags.get(f"{stage}_resumed_from", source.info.run_id)
    tracker.set_tags({f"{stage}_resumed_from": origin})
    record[stage] |= {"outputs": outputs, "resumed_from": origin}
    log.info("Reusing the %s results of run %s (the same %s identity %s): not run again", stage, origin, stage, key)
    return metrics


def _cacheable(cfg: DictConfig, job: Job) -> bool:
    """Whether this job's artifact goes through the quantized-model cache: not where it is off or where quantizing is
    loading (fp16, bitsandbytes: `load_saved` not implemented)."""
    qc = cfg.get("quantized_cache") or {}
    return bool(qc.get("enabled", False)) and type(job.method).load_saved is not Method.load_saved


def _store(cfg: DictConfig, tracker: Tracker, key: str, inputs: dict, out_dir: Path, quantized: dict) -> None:
    """Store the verified artifact in the cache. A store that fails (a full disk) leaves no entry and does not fail
    the run, whose results stand: it is logged, and tagged `cache_store`."""
    try:
        entry = quantized_cache.store(Path(cfg.quantized_cache.dir), key, inputs, out_dir, quantized, tracker.run_id)
    except OSError as exc:
        log.warning(
            "Could not store the quantized model in the cache %s (%s): nothing was stored, the next job with this "
            "key quantizes again",
            cfg.quantized_cache.dir,
            exc,
        )
        tracker.set_tags({"cache_store": f"failed: {exc}"[:500]})
        return
    tracker.set_tags({"cache_store": "stored"})
    _tag_copied(tracker, entry.copied)


def _tag_copied(tracker: Tracker, copied: list[str]) -> None:
    """Say on the run where weight shards were copied, not hard-linked, between the job folder and the cache."""
    if copied:
        tracker.set_tags({"cache_link": f"copied, not linked: {'; '.join(copied)}"[:500]})


def _calibration(cfg: DictConfig, job: Job, seed: int) -> calibration.Calibration | None:
    """The calibration texts for this seed and the identity of what they were read from (file sha256, hub commit)."""
    if not job.method.needs_calibration:
        return None
    return calibration.load(OmegaConf.merge(cfg.calibration, {"seed": seed}), cfg.paths.cache)


def _quality(cfg: DictConfig, job: Job, model, tokenizer) -> quality.Comparison:
    """KL from the baseline, top-1 agreement and perplexity on held-out text (quantbench.quality). The baseline's
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
    tracker.log_metrics(out)
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
    return tags
