"""The same sweep twice, one job after another and then with `hydra/launcher=ray`, against one tracking server;
prints both wall times and their ratio (issue 10 asks for at most 0.6 with two jobs on two GPUs).

    python benchmarks/parallel_sweep.py --hardware h200 --jobs method=fp16,bnb_nf4 -- experiment=seed_shape
    python benchmarks/parallel_sweep.py --hardware cpu --jobs method=fp16,rtn -- eval=none bench=none quality=none

Fair to both sweeps:
* every job reruns (force=true) and quantizes from scratch (quantized_cache.enabled=false);
* the sweep's base model (an embedded one is built on first use) is built before either sweep is timed;
* each sweep has its own empty compile caches (vLLM's torch.compile, Inductor, Triton), so neither finds graphs
  the other compiled;
* Ray gets as many GPUs (or, on CPU, cores) as the jobs ask for in all: hardware.job_gpus (job_cpus) per job.
`--mode serial` and `--mode ray` time one sweep each, for a machine whose commands are too short for both: the
figures accumulate in --out, and the ratio is printed once both are there. The tracking server is PostgreSQL-backed
(`--store sqlite` where PostgreSQL is not installed: the server is then the only writer of its SQLite file).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from quantbench.ops import server  # noqa: E402
from quantbench.job.models import EMBEDDED_PREFIX, embedded_root  # noqa: E402
from quantbench.paths import cache_root  # noqa: E402

log = logging.getLogger("parallel_sweep")
COMPILE_CACHES = ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def sweep(overrides: list[str], env: dict[str, str], log_file: Path) -> float:
    """Wall seconds of `python run.py -m <overrides>`; raises if the sweep failed."""
    started = time.perf_counter()
    with log_file.open("w") as out:
        code = subprocess.call(
            [sys.executable, str(ROOT / "run.py"), "-m", *overrides], stdout=out, stderr=out, env=env
        )
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"the sweep exited {code}; its log: {log_file}")
    return seconds


def build_base_model(overrides: list[str]) -> None:
    """Build an embedded base model now, so that the first sweep timed does not pay for it."""
    models = [o.split("=", 1)[1] for o in overrides if o.startswith("model=")]
    experiments = [o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")]
    for name in experiments:  # an experiment may choose the model in its defaults list
        for entry in OmegaConf.load(ROOT / "conf" / "experiment" / f"{name}.yaml").get("defaults", []):
            if isinstance(entry, dict) or OmegaConf.is_dict(entry):
                models += [v for k, v in dict(entry).items() if k.endswith("/model")]
    ref = str(OmegaConf.load(ROOT / "conf" / "model" / f"{(models or ['tiny'])[-1]}.yaml").pretrained)
    if ref.startswith(EMBEDDED_PREFIX):
        log.info("building %s before the sweeps are timed", ref)
        embedded_root(ref, cache_root())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hardware", default="cpu", help="hardware group (default: %(default)s)")
    p.add_argument("--jobs", default="method=fp16,rtn", help="the sweep's swept key (default: %(default)s)")
    p.add_argument("--mode", choices=("both", "serial", "ray"), default="both", help="which sweeps to time")
    p.add_argument("--store", choices=("postgresql", "sqlite"), default="postgresql", help="the server's store")
    p.add_argument("--out", type=Path, default=None, help="read and write the figures as JSON here")
    p.add_argument("overrides", nargs="*", help="more overrides for every job (after --)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    n_jobs = len(args.jobs.split("=", 1)[1].split(","))
    gpu = args.hardware != "cpu"
    build_base_model(args.overrides)
    work = Path(tempfile.mkdtemp(dir=cache_root(), prefix="parallel-sweep-"))
    work.chmod(0o755)  # PostgreSQL runs as the postgres user when we are root
    url = server.start_detached(work / "mlruns", server.free_port(), args.store, server.free_port())
    common = [args.jobs, f"hardware={args.hardware}", "tracking=server", "force=true", "quantized_cache.enabled=false"]
    common += [f"hydra.sweep.dir={work}/multirun/${{now:%H-%M-%S}}", *args.overrides]
    ray_tmp = Path(tempfile.mkdtemp(prefix="qbray", dir="/tmp"))  # Ray's socket paths must stay short
    ray = ["hydra/launcher=ray", f"+hydra.launcher.ray.init.num_{'gpus' if gpu else 'cpus'}={n_jobs}"]
    ray += [f"+hydra.launcher.ray.init._temp_dir={ray_tmp}"]
    figures = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
    figures.update(hardware=args.hardware, jobs=args.jobs, overrides=args.overrides, host=platform.node())
    try:
        for mode in ("serial", "ray") if args.mode == "both" else (args.mode,):
            caches = {name: str(work / f"{mode}-cache" / name.lower()) for name in COMPILE_CACHES}
            env = {**os.environ, **caches, "MLFLOW_TRACKING_URI": url, "RAY_AUTH_MODE": "disabled"}
            seconds = sweep(common + (ray if mode == "ray" else []), env, work / f"{mode}.log")
            log.info("%-6s: %d jobs in %.1f s", mode, n_jobs, seconds)
            figures[f"{mode}_s"] = seconds
            figures[f"{mode}_logs"] = str(work)
    finally:
        server.stop(work / "mlruns")
    if "serial_s" in figures and "ray_s" in figures:
        figures["ratio"] = figures["ray_s"] / figures["serial_s"]
        log.info("ratio ray / serial: %.2f", figures["ratio"])
    log.info("%s", json.dumps(figures))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
