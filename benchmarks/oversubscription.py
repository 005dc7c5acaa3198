"""Several torch processes at once, each with all the cores as OpenMP threads or with an equal share of them.

Why `make test` gives each pytest-xdist worker (and what it starts) OMP_NUM_THREADS = cores / workers
(tests/conftest.py): each process's default is every core, so N workers run N x cores threads that spin at every
barrier. The work is the embedded model's kind: many small matmuls (a 64-token batch through a 256 -> 688 -> 256 MLP).
Prints each layout's wall time for the slowest process and the ratio. Not a test: the numbers belong to this machine.

    .venv/bin/python benchmarks/oversubscription.py                  # 2 processes, 20000 steps
    .venv/bin/python benchmarks/oversubscription.py --processes 4 --steps 5000
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time

log = logging.getLogger("benchmarks.oversubscription")

WORK = """
import sys, torch
x = torch.randn(64, 256); w1 = torch.randn(256, 688); w2 = torch.randn(688, 256)
for _ in range(int(sys.argv[1])):
    x = torch.nn.functional.silu(x @ w1) @ w2 * 0.01 + x
"""


def wall(processes: int, threads: int, steps: int) -> float:
    """Seconds until the last of `processes` concurrent processes of WORK, each with `threads` OpenMP threads, ends."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    children = [subprocess.Popen([sys.executable, "-c", WORK, str(steps)], env=env) for _ in range(processes)]
    if any(child.wait() for child in children):
        raise SystemExit("a worker process failed")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="processes at once (default 2, make test's workers)")
    parser.add_argument("--steps", type=int, default=20000, help="MLP steps per process (default 20000)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cores = len(os.sched_getaffinity(0))
    share = max(1, cores // args.processes)
    every = wall(args.processes, cores, args.steps)
    shared = wall(args.processes, share, args.steps)
    log.info("%d cores, %d processes at once, %d steps each", cores, args.processes, args.steps)
    log.info("  %d thread(s) each (torch's default): %.1f s", cores, every)
    log.info("  %d thread(s) each (cores / processes): %.1f s", share, shared)
    log.info("  ratio: %.2fx", every / shared)


if __name__ == "__main__":
    main()
