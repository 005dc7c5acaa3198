"""What the quantized-model cache saves: a sweep of the calibrated methods, then the identical sweep again (`force=true`,
or resume would skip every job), each job of the second finding its model in the cache.

    .venv/bin/python benchmarks/quantized_cache.py                       # gptq, awq, autoround_sym, rtn, aqlm_2bit
    .venv/bin/python benchmarks/quantized_cache.py --methods gptq,rtn

Prints, per method, the first sweep's quantization time, the second's cache restore (copy + load) and their ratio,
and exits non-zero if a job of the second sweep did not hit the cache. Evaluation, quality and the benchmark are
off: only quantizing is compared. Not a test: the times depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

log = logging.getLogger("benchmarks.quantized_cache")
ROOT = Path(__file__).resolve().parents[1]


def sweep(methods: str, work: Path, *extra: str) -> None:
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", f"method={methods}", "eval=none", "quality=none", "bench=none",
           f"paths.mlruns={work}/mlruns", f"hydra.sweep.dir={work}/multirun/{len(list(work.glob('multirun/*')))}",
           f"quantized_cache.dir={work}/quantized", *extra]  # fmt: skip
    log.info("%s", " ".join(cmd))
    subprocess.run(cmd, check=True, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="gptq,awq,autoround_sym,rtn,aqlm_2bit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    with tempfile.TemporaryDirectory(prefix="quantbench-cache-bench-") as tmp:
        work = Path(tmp)
        sweep(args.methods, work)
        sweep(args.methods, work, "force=true")
        client = MlflowClient(f"sqlite:///{work}/mlruns/mlflow.db")
        exp = client.get_experiment_by_name("quantbench-tiny")
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
        first = {r.data.tags["method"]: r for r in runs if r.data.tags.get("cache") == "miss"}
        second = {r.data.tags["method"]: r for r in runs if r.data.tags.get("cache") == "hit"}
        log.info("\n%-14s %12s %16s %8s", "method", "quantize (s)", "cache restore (s)", "ratio")
        total_q = total_r = 0.0
        for method in args.methods.split(","):
            if method not in first or method not in second:
                log.error("%-14s no %s run", method, "first" if method not in first else "cache-hit")
                continue
            q, r = first[method].data.metrics["quantize_s"], second[method].data.metrics["cache_restore_s"]
            total_q, total_r = total_q + q, total_r + r
            log.info("%-14s %12.1f %16.2f %8.3f", method, q, r, r / q)
        if total_q:
            log.info("%-14s %12.1f %16.2f %8.3f", "all", total_q, total_r, total_r / total_q)
        return 0 if set(second) == set(args.methods.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
