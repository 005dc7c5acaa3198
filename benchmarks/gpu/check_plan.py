"""Check a GPU stretch's plan on this machine before a GPU runs it: every `job` line, and every `step` that runs
`python run.py`, composes with Hydra as it will there and passes the checks a job makes before any work (the schema's
keys and ranges, the method's knobs against the model's architecture where no weights are needed for it (the
embedded random-weight shapes), the benchmark's plan); a `seed` folder holds the store it names.

Why: device time is short (30 minutes a session) and a plan's typo (`bench.vllm.kv_cache_gbb=2`, `bench.streams=[0]`)
otherwise shows only when its job fails on the GPU, minutes into the stretch. What needs the GPU itself (its compute
capability, vLLM's kernels there) is not checked here.

    .venv/bin/python benchmarks/gpu/check_plan.py                      # the newest plan in benchmarks/gpu/plans/
    .venv/bin/python benchmarks/gpu/check_plan.py PLAN --hardware h200
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLANS = ROOT / "benchmarks" / "gpu" / "plans"
FIELD, RECORD = "\x1f", "\x1e"
# The plan is sourced by bash as queue.sh sources it, with its three words defined to print their arguments instead.
RECORDER = f"""
set -euo pipefail
W=/tmp/qb-queue
record() {{ printf '%s{FIELD}' "$@"; printf '{RECORD}'; }}
job() {{ record job "$@"; }}
step() {{ record step "$@"; }}
seed() {{ record seed "$@"; }}
source "$1"
"""

log = logging.getLogger("benchmarks.gpu.check_plan")


@dataclass
class Line:
    word: str  # job, step or seed
    name: str
    args: list[str]

    def overrides(self, hardware: str) -> list[str] | None:
        """The Hydra overrides this line hands run.py on the GPU machine; None where it does not run run.py."""
        if self.word == "job":  # benchmarks/gpu/seed_shape.sh METHOD OVERRIDES...
            method, *rest = self.args
            return ["experiment=seed_shape", f"method={method}", f"hardware={hardware}", *rest]
        if self.word == "step" and len(self.args) > 1 and Path(self.args[0]).name.startswith("python"):
            if self.args[1] == "run.py":
                return [a for a in self.args[2:] if not a.startswith("-")]
        return None


def lines_of(plan: Path, hardware: str) -> list[Line]:
    """The plan's job, step and seed lines, with its variables and arrays expanded by bash."""
    out = subprocess.run(
        ["bash", "-c", RECORDER, "check_plan", str(plan)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "QB_HARDWARE": hardware},
        timeout=60,
    )
    if out.returncode != 0:
        raise SystemExit(f"{plan}: bash could not read it (exit {out.returncode}):\n{out.stderr[-2000:]}")
    lines = []
    for record in out.stdout.split(RECORD)[:-1]:
        word, *args = record.split(FIELD)[:-1]
        name = args.pop(0) if word in ("job", "step") else word
        lines.append(Line(word, name, args))
    return lines


def problem(overrides: list[str]) -> str | None:
    """What a job with these overrides would refuse before any work, or None."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from quantbench import schema
    from quantbench.job import bench

    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
        schema.check(cfg)
        method = instantiate(cfg.method)
        architecture = shape_config(str(cfg.model.pretrained))
        if architecture is not None:
            method.validate(architecture, cfg.hardware)  # bits, group size against the widths, a tied head
        bench.plan(cfg.bench)
    except Exception as exc:  # Hydra's override and composition errors, ConfigError, a method's refusal
        return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return None


def shape_config(reference: str):
    """The config of an embedded random-weight shape (`embedded:llama-3.1-8b-shape`), from its fields alone; None for
    any other model, whose config would need its folder or the hub."""
    from transformers import LlamaConfig

    from quantbench.embedded import random_shape
    from quantbench.job.models import EMBEDDED_PREFIX, has_random_weights

    if not has_random_weights(reference):
        return None
    shape = reference.removeprefix(EMBEDDED_PREFIX).removesuffix(random_shape.SUFFIX)
    return LlamaConfig(**random_shape.SHAPES[shape])


def check(plan: Path, hardware: str) -> list[str]:
    """One message per line that would fail on the GPU machine for a reason this machine can see."""
    from quantbench import schema

    schema.register()  # as run.py does: the groups' typed schemas
    failures = []
    for line in lines_of(plan, hardware):
        if line.word == "seed":
            folder = ROOT / line.args[0]
            why = None if (folder / "mlflow.db").is_file() else f"no {folder / 'mlflow.db'}"
        else:
            overrides = line.overrides(hardware)
            if overrides is None:
                log.info("%-28s not run.py: not checked", line.name)
                continue
            why = problem(overrides)
        log.info("%-28s %s", line.name, why or "ok")
        if why:
            failures.append(f"{line.name}: {why}")
    return failures


def newest_plan() -> Path:
    """The plan the next GPU stretch runs: the latest by its dated name."""
    return max(PLANS.glob("*.sh"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("plan", nargs="?", type=Path, default=newest_plan(), help="a plan (default: %(default)s)")
    p.add_argument("--hardware", default="h100", help="conf/hardware option the GPU machine gets (default: h100)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    failures = check(args.plan.resolve(), args.hardware)
    for failure in failures:
        log.error("FAILS: %s", failure)
    log.info("%s: %s", args.plan, f"{len(failures)} line(s) would fail" if failures else "every checked line composes")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
