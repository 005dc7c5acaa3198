"""Measured decode throughput against the memory-bandwidth roofline, per method and backend, as a table.

Reads the runs of an MLflow store, or first runs the sweep itself (each method x backend through run.py, eval off):

    .venv/bin/python benchmarks/throughput.py                                   # the project's mlruns/ store
    .venv/bin/python benchmarks/throughput.py --store sqlite:////tmp/x/mlflow.db
    .venv/bin/python benchmarks/throughput.py --run --methods fp16,bnb_nf4 --backends hf,vllm

Not a test: the numbers depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

log = logging.getLogger("benchmarks.throughput")
ROOT = Path(__file__).resolve().parents[1]
TPS = re.compile(r"^tokens_per_s_(?P<n>\d+)_streams?$")


def run_sweep(methods: str, backends: str, mlruns: Path, extra: list[str]) -> str:
    """`python run.py -m method=<methods> bench.backend=<backends> eval=none` into `mlruns`; returns its store URI."""
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        "-m",
        f"method={methods}",
        f"bench.backend={backends}",
        "eval=none",
        "tracking.log_model=none",
        f"paths.mlruns={mlruns}",
        f"hydra.sweep.dir={mlruns}/multirun",
        *extra,
    ]
    log.info("Running %s", " ".join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT)
    return f"sqlite:///{mlruns}/mlflow.db"


def rows(uri: str, experiment: str) -> list[dict[str, str]]:
    """One row per finished run and stream count, oldest run first."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} in {uri}")
    out = []
    for run in client.search_runs(
        [exp.experiment_id], "attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"]
    ):
        m, t = run.data.metrics, run.data.tags
        backend = t.get("bench_backend", "?")
        if t.get("bench_fallback_reason"):
            backend += f" (asked {t.get('bench_requested_backend', 'vllm')})"
        kernel = t.get("vllm_linear_kernel") or t.get("eval_kernel", "?")
        if t.get("slow_kernel_fallback") == "true":
            kernel += "  [SLOW FALLBACK]"
        for key in sorted((k for k in m if TPS.match(k)), key=lambda k: int(TPS.match(k)["n"])):
            label = key.removeprefix("tokens_per_s_")
            out.append(
                {
                    "method": t.get("method", "?"),
                    "backend": backend,
                    "streams": TPS.match(key)["n"],
                    "tokens/s": f"{m[key]:.1f} [{m.get(key + '_min', float('nan')):.1f}-{m.get(key + '_max', float('nan')):.1f}]",
                    "decode tokens/s": f"{m['decode_' + key]:.1f}" if "decode_" + key in m else "-",
                    "roofline": f"{m['roofline_tokens_per_s_' + label]:.1f}"
                    if "roofline_tokens_per_s_" + label in m
                    else "-",
                    "fraction": f"{m['roofline_fraction_' + label]:.3f} ({t.get('roofline_speed_basis', '?')})"
                    if "roofline_fraction_" + label in m
                    else "-",
                    "GB/s": f"{m['memory_bandwidth_gbs']:.1f} {t.get('memory_bandwidth_source', '')}"
                    if "memory_bandwidth_gbs" in m
                    else "-",
                    "kernel": kernel,
                    "run": run.info.run_id[:8],
                }
            )
    return out


def table(records: list[dict[str, str]]) -> str:
    if not records:
        return "(no finished runs with throughput metrics)\n"
    cols = list(records[0])
    width = {c: max(len(c), *(len(r[c]) for r in records)) for c in cols}
    line = lambda r: "  ".join(r[c].ljust(width[c]) for c in cols).rstrip()  # noqa: E731
    return "\n".join([line({c: c for c in cols}), line({c: "-" * width[c] for c in cols}), *map(line, records)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}", help="MLflow tracking URI")
    ap.add_argument("--experiment", default="quantbench-tiny")
    ap.add_argument("--run", action="store_true", help="run the sweep first, into a temporary store")
    ap.add_argument("--methods", default="fp16,bnb_nf4")
    ap.add_argument("--backends", default="hf,vllm")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for --run, e.g. bench=seed")
    args = ap.parse_args(argv)
    uri = args.store
    if args.run:
        uri = run_sweep(
            args.methods, args.backends, Path(tempfile.mkdtemp(prefix="quantbench-throughput-")), args.overrides
        )
    sys.stdout.write(table(rows(uri, args.experiment)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
