"""What a result depends on, one key per stage: resume, reusing a stage of an earlier run and the quantized-model
cache all ask here, so they cannot disagree about when a result is still valid.

  quantize  the source model's content (its files' sha256s, or the hub commit), the method and calibration configs,
            the calibration data (a file's sha256, a hub dataset's revision), dtype, device type, the versions of
            torch, transformers and the quantizing library, and quantbench's own source (a hash of the package's
            files, so an uncommitted edit counts: the AQLM quantizer and upstream/ live there). The quantized-model
            cache's key.
  eval      the quantize key, the artifact's files (their sha256s: the scores are of this very artifact), the eval
            config and its local task files, seed, calibration repeats, dtype and device, lm-eval's version.
  quality   the quantize key, the artifact's files, the quality config, dtype and device.
  bench     the quantize key, the artifact's files, the bench and hardware configs, the serving library's version
            (vLLM where it serves; transformers and torch are in the quantize key) and the machine class: CPU model,
            ISA and cores, or the GPUs' names (what a speed depends on, not the host name).

The job key (the run's `config_hash` tag) is the resolved config minus where things go, plus tracking.log_model (a
run that logged no model cannot stand for one that must) and every dependency above that is known before the job
runs. A FINISHED run with the job key is the job, done: skipped. Otherwise each later stage whose key a FINISHED run
of the experiment already has is taken from that run (tag `<stage>_resumed_from`) instead of being run again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from quantbench import measure
from quantbench.errors import ConfigError
from quantbench.paths import LOCATION_GROUPS
from quantbench.versions import library_version

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parents[1]  # the whole quantbench package
# Where a job writes and logs, and whether it reruns, do not change what it measures: left out of the job key.
NOT_IN_CONFIG_HASH = ("hydra", *LOCATION_GROUPS, "force", "timeouts", "disk_headroom_gb")
QUANTIZE_LIBRARIES = ("torch", "transformers")
EVAL_LIBRARIES = ("lm-eval",)
LATER_STAGES = ("eval", "quality", "bench")


def key_of(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:20]


@functools.cache
def source_code(package: Path = PACKAGE) -> str:
    """A hash of quantbench's own files (each one's path and sha256; bytecode caches aside): the code that ran,
    committed or not."""
    files = sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return key_of({f.relative_to(package).as_posix(): measure.sha256(f) for f in files})


def libraries(*dists: str) -> dict[str, str]:
    return {d: library_version(d) for d in dists}


def serving_libraries(bench_cfg: DictConfig) -> dict[str, str]:
    """What serves the benchmark beyond torch and transformers, as its backend names it (`Backend.libraries`)."""
    from quantbench.job.bench import load_backend

    return load_backend(str(bench_cfg.backend)).libraries()


def machine(device: str) -> dict:
    """The machine class a speed depends on: the CPU's model and ISA, and the GPUs' names on a GPU or the cores this
    process may use on a CPU. Not the host name: two hosts of one class measure the same thing."""
    cpu, flags = measure.cpu_info()
    out: dict = {"cpu": cpu, "cpu_isa": [f for f in measure.CPU_ISA_FLAGS if f in flags]}
    if str(device).startswith("cuda"):
        import torch

        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        out["cpus"] = len(os.sched_getaffinity(0))
    return out


def model(source, cache_dir: Path) -> dict:
    """The source model's content: a hub snapshot by repo and commit (the one models.resolve resolved, also when read
    from a cached snapshot); any other folder (a local model, the embedded ones) by the sha256 of its files."""
    if getattr(source, "hub_commit", None):
        return {"hub": source.reference, "commit": source.hub_commit}
    path = Path(source.path_or_id)
    if not path.is_dir():  # a hub id resolved elsewhere than models.resolve: the commit its revision names now
        from quantbench.job.models import HubAccessError, hub_commit

        try:
            return {"hub": source.path_or_id, "commit": hub_commit(source.path_or_id, source.revision)}
        except HubAccessError as exc:  # the job's own download would fail the same way: say why, before any load
            raise ConfigError(
                f"model.pretrained={source.path_or_id!r}: cannot resolve revision {source.revision or 'main'!r} to a "
                f"commit on the hub ({exc}); without it no earlier result can be matched to this model."
            ) from exc
    if path.parent.name == "snapshots":  # the Hugging Face cache: .../models--org--name/snapshots/<commit>
        return {"hub": source.reference, "commit": path.name}
    return {"files": files_sha256(path, cache_dir)}


def files_sha256(folder: Path, cache_dir: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`, remembered per file (path, inode, size, mtime and
    ctime, so a file rewritten in place is hashed again) in `<cache_dir>/quantbench/file-sha256.json`: an 8B
    folder is hashed once, not per job."""
    from quantbench import atomic

    memo_path = Path(cache_dir) / "quantbench" / "file-sha256.json"
    try:
        memo = json.loads(memo_path.read_text()) if memo_path.exists() else {}
    except ValueError:  # written whole (atomic.write_text); unreadable only if edited by hand: start over
        memo = {}
    files, hashed = {}, False
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        stat = f.stat()
        memo_key = f"{f.resolve()}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"
        if memo_key not in memo:
            memo[memo_key], hashed = measure.sha256(f), True
        files[f.relative_to(folder).as_posix()] = memo[memo_key]
    if hashed:  # every job asks, twice (its key, then its run): rewrite the memo only when it learned something
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(memo_path, json.dumps(memo))
    return files


def calibration_data(calibration_cfg: DictConfig) -> dict:
    """What the calibration texts are read from, known before reading them: a file by its sha256, a hub dataset by
    its id, split and the revision asked for (its resolved commit is known once loaded: `loaded_calibration`)."""
    from quantbench.job import calibration

    src = calibration.source(calibration_cfg)
    if src is None:  # generated by quantbench's own code: its source hash covers it
        return {"embedded": str(calibration_cfg.dataset)}
    if isinstance(src, calibration.LocalFile):
        return {"file_sha256": measure.sha256(src.path), "format": src.builder, "text_column": src.column}
    return {"hub": src.repo_id, "subset": src.subset, "split": src.split, "revision": src.revision}


def loaded_calibration(identity: dict[str, str]) -> dict[str, str]:
    """What a job's calibration was read from (calibration.load's identity: a file's sha256, a hub dataset's
    resolved commit), without where the file lies."""
    return {k: v for k, v in identity.items() if k != "calibration.path"}


def quantize_inputs(cfg: DictConfig, method_cls: type, model_identity: dict, calibration: dict | None) -> dict:
    """Everything the quantized artifact depends on, and nothing about where it is written."""
    out = {
        "model": model_identity,
        "method": OmegaConf.to_container(cfg.method, resolve=True),
        "dtype": str(cfg.hardware.dtype),
        "device_type": str(cfg.hardware.device).split(":")[0],
        "libraries": libraries(*QUANTIZE_LIBRARIES, method_cls.library),
        "quantbench_source": source_code(),
        **method_cls.compute_inputs(cfg.method, cfg.hardware),
    }
    if method_cls.needs_calibration:
        out["calibration"] = OmegaConf.to_container(cfg.calibration, resolve=True)
        out["calibration_data"] = calibration
    return out


def later_stage_inputs(cfg: DictConfig, quantize_key: str, artifact: dict[str, str] | None) -> dict[str, dict]:
    """The inputs of the stages this job runs after quantizing (eval, quality, bench), given the quantize key and the
    artifact's files' sha256s (None before the job has made it)."""
    hw = cfg.hardware
    common = {"quantize": quantize_key, "artifact": artifact}
    stages = {}
    if list(cfg.eval.get("tasks") or []):
        stages["eval"] = common | {
            "eval": OmegaConf.to_container(cfg.eval, resolve=True),
            "task_files": _task_files(cfg),
            "seed": cfg.get("seed"),
            "repeats": cfg.get("repeats", 1),
            "dtype": str(hw.dtype),
            "device": str(hw.device),
            "libraries": libraries(*EVAL_LIBRARIES),
        }
    if "quality" in cfg and cfg.quality.get("dataset") is not None:
        stages["quality"] = common | {
            "quality": OmegaConf.to_container(cfg.quality, resolve=True),
            "dtype": str(hw.dtype),
            "device": str(hw.device),
        }
    if str(cfg.bench.backend) != "none":
        stages["bench"] = common | {
            "bench": OmegaConf.to_container(cfg.bench, resolve=True),
            "hardware": _without_launcher_requests(OmegaConf.to_container(hw, resolve=True)),
            "libraries": serving_libraries(cfg.bench),
            "machine": machine(str(hw.device)),
        }
    return stages


def _task_files(cfg: DictConfig) -> dict[str, str] | None:
    """A local task folder's files (lm-eval's own tasks come with its version)."""
    from quantbench.job.models import EMBEDDED_PREFIX, embedded_root

    include = cfg.eval.get("include_path")
    if not include:
        return None
    folder = (
        embedded_root(str(include), cfg.paths.cache) / "tasks"
        if str(include).startswith(EMBEDDED_PREFIX)
        else Path(str(include))
    )
    if not folder.is_dir():
        return None
    # the task YAMLs name their data files by absolute path: where the folder is (another cache, another machine) is
    # not what is evaluated, so that path is left out of each file's hash
    where = sorted({str(folder).encode(), str(folder.resolve()).encode()}, key=len, reverse=True)

    def content(f: Path) -> bytes:
        data = f.read_bytes()
        for path in where:
            data = data.replace(path, b"<tasks>")
        return data

    return {
        f.relative_to(folder).as_posix(): hashlib.sha256(content(f)).hexdigest()
        for f in sorted(p for p in folder.rglob("*") if p.is_file())
    }


def config_part(cfg: DictConfig) -> dict:
    """The resolved config minus where things go, whether the job reruns and what it asks of a launcher."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    kept = {k: v for k, v in resolved.items() if k not in NOT_IN_CONFIG_HASH}
    if isinstance(kept.get("hardware"), dict):
        kept["hardware"] = _without_launcher_requests(kept["hardware"])
    return kept


def _without_launcher_requests(hardware: dict) -> dict:
    """The hardware group minus hardware.job_* (GPUs, CPUs, memory and time limit asked of Ray or SLURM): a rerun with
    a longer time limit is the same job, and the cores a job really had are in the machine class."""
    return {k: v for k, v in hardware.items() if not k.startswith("job_")}


def job_key(cfg: DictConfig) -> str:
    """The job's identity (tag config_hash): a FINISHED run with it is this job, done."""
    return key_of(
        {
            "config": config_part(cfg),
            "log_model": str((cfg.get("tracking") or {}).get("log_model", "")),
            "depends": known_before_run(cfg),
        }
    )


def known_before_run(cfg: DictConfig) -> dict:
    """Every stage's inputs that are known before the job runs (the artifact is not). Bad input leaves them
    unknown: the job then runs, and fails its validation saying why."""
    import hydra

    from quantbench.job import models

    try:
        try:
            method_cls = hydra.utils.get_class(str(cfg.method._target_))
        except Exception as exc:
            raise ConfigError(f"method._target_={cfg.method.get('_target_')!r}: {exc}") from exc
        source = models.resolve(cfg.model, cfg.paths.cache)
        cal = calibration_data(cfg.calibration) if method_cls.needs_calibration else None
        quantize = quantize_inputs(cfg, method_cls, model(source, Path(cfg.paths.cache)), cal)
        return {"quantize": quantize, **later_stage_inputs(cfg, key_of(quantize), artifact=None)}
    except ConfigError as exc:
        log.info("This job's inputs cannot be identified before it is validated (%s): it is not resumed", exc)
        return {"unresolved": str(exc)}
