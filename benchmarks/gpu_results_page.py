"""Every GPU speed in the committed stores (benchmarks/results/*/**.db), on one basis, as one page: decode-only
tokens/s over the bound of the bandwidth measured on that machine's session (benchmarks/gpu/bandwidth.py), the
datasheet's bound beside it, with the dtype, the artifact and the kernel of each figure. Generated, never edited:

    python benchmarks/gpu_results_page.py            # writes docs/gpu-figures.md
    python benchmarks/gpu_results_page.py --check    # exit 1 if docs/gpu-figures.md is not what the stores give

A run's roofline (quantbench.job.bench.roofline) is the bytes one decode step reads at a bandwidth: the bandwidth it was
computed with is its `memory_bandwidth_gbs` metric, so the bound at any other bandwidth is the same bytes at that one.
The stores are read with sqlite3, read-only: the committed files are never opened by MLflow, which may migrate them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from quantbench.names import stream_label

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "gpu-figures.md"
STREAMS = (1, 8)


@dataclass
class Figure:
    store: str
    run: str  # the run id's first 8 characters, as the page shows it
    gpu: str
    method: str
    model: str
    artifact: str
    dtype: str
    kernel: str
    streams: int
    decode: float
    measured_gbs: float | None
    measured_from: str
    datasheet_gbs: float | None
    bound_measured: float | None
    bound_datasheet: float | None


def stores() -> list[Path]:
    """The MLflow stores under benchmarks/results (a search's Optuna study, optuna.db, sits beside its store), in the
    order their last run started: a stretch whose store was seeded with an earlier one's comes after it."""
    found = [p for p in RESULTS.rglob("*.db") if _is_mlflow_store(p)]
    return sorted(found, key=lambda p: (_last_start(p), str(p)))


def _last_start(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return db.execute("SELECT COALESCE(MAX(start_time), 0) FROM runs").fetchone()[0]


def once_per_run(all_figures: list[Figure]) -> list[Figure]:
    """Each run's figures from the first store that has it: a seeded store holds copies of the earlier one's runs
    (matched on the id's first 8 characters, as the page shows them)."""
    first: dict[str, str] = {}
    for f in all_figures:
        first.setdefault(f.run, f.store)
    return [f for f in all_figures if first[f.run] == f.store]


def _is_mlflow_store(path: Path) -> bool:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'runs'").fetchone() is not None


def _measured_bandwidth(store: Path, gpu: str) -> tuple[float | None, str]:
    """The read bandwidth bandwidth.py measured on this GPU model in the store's results folder (or its parent)."""
    for folder in (store.parent, store.parent.parent):
        path = folder / "bandwidth.json"
        if path.is_file() and folder.is_relative_to(RESULTS):
            data = json.loads(path.read_text())
            if data.get("device") == gpu:
                return float(data["read_gb_s"]), str(path.relative_to(ROOT))
    return None, ""


def _datasheet(hardware: str) -> float | None:
    path = ROOT / "conf" / "hardware" / f"{hardware}.yaml"
    value = yaml.safe_load(path.read_text()).get("memory_bandwidth_gbs") if path.is_file() else None
    return float(value) if value else None


def figures(store: Path) -> list[Figure]:
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    out = []
    for (run_id,) in db.execute("SELECT run_uuid FROM runs WHERE status = 'FINISHED' ORDER BY start_time"):
        metrics = dict(db.execute("SELECT key, value FROM latest_metrics WHERE run_uuid = ?", (run_id,)))
        tags = dict(db.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)))
        params = dict(db.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,)))
        if not str(params.get("hardware.device", "")).startswith("cuda") or "memory_bandwidth_gbs" not in metrics:
            continue
        gpu = tags.get("host.gpu", "?")
        used = metrics["memory_bandwidth_gbs"]
        if tags.get("memory_bandwidth_source") == "measured":
            measured, measured_from = used, "measured in the run"
        else:
            measured, measured_from = _measured_bandwidth(store, gpu)
        datasheet = _datasheet(params.get("hardware.name", ""))
        dtype = params.get("bench.vllm.dtype", "auto")
        dtype = params.get("hardware.dtype", "?") if dtype in ("auto", None) else dtype
        backend = tags.get("bench_backend", "?")
        kernel = tags.get("vllm_linear_kernel") if backend == "vllm" else tags.get("bench_path", "")
        for n in STREAMS:
            label = stream_label(n)
            decode, roofline = (
                metrics.get(f"decode_tokens_per_s_{label}"),
                metrics.get(f"roofline_tokens_per_s_{label}"),
            )
            if decode is None or roofline is None:
                continue
            out.append(
                Figure(
                    store=str(store.relative_to(RESULTS)),
                    run=run_id[:8],
                    gpu=gpu,
                    method=tags.get("method", "?"),
                    model=tags.get("model", "?"),
                    artifact=f"{tags.get('quant_format', '?')}, {metrics.get('disk_gb', float('nan')):.2f} GB",
                    dtype=dtype,
                    kernel=f"{backend}: {kernel}" if kernel else backend,
                    streams=n,
                    decode=decode,
                    measured_gbs=measured,
                    measured_from=measured_from,
                    datasheet_gbs=datasheet,
                    bound_measured=roofline * measured / used if measured else None,
                    bound_datasheet=roofline * datasheet / used if datasheet else None,
                )
            )
    db.close()
    return out


def _num(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def page(all_figures: list[Figure]) -> str:
    lines = [
        "# Every GPU figure, on one basis",
        "",
        "Generated from the committed stores by `python benchmarks/gpu_results_page.py` (do not edit by hand). One row",
        "per FINISHED run on CUDA and stream count. **Decode-only** tokens/s (the generation after the first token) over",
        "the bound of the **bandwidth measured on that machine** (`benchmarks/gpu/bandwidth.py`'s read bandwidth, in the",
        "run or in `bandwidth.json` of the same results folder; — where none was measured), and the datasheet's bound",
        "(`conf/hardware/`) beside it. A bound is the bytes one decode step reads (quantbench.job.bench.roofline) at that",
        "bandwidth. Runs of a results folder may share a GPU with other jobs: its README says where a figure is not a",
        "clean measurement (e.g. `2026-12-06-h100`: three jobs on one card, vLLM eager).",
        "",
        "| store | run | GPU | method | model | artifact | dtype | backend: kernel | streams | decode tok/s "
        "| measured GB/s | bound (measured) | of measured | datasheet GB/s | bound (datasheet) | of datasheet |",
        "|---|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in all_figures:
        lines.append(
            f"| {f.store} | {f.run} | {f.gpu} | {f.method} | {f.model} | {f.artifact} | {f.dtype} "
            f"| {f.kernel.replace('|', '/')} | {f.streams} | {f.decode:.1f} | {_num(f.measured_gbs)} "
            f"| {_num(f.bound_measured)} | {_num(f.bound_measured and f.decode / f.bound_measured, 2)} "
            f"| {_num(f.datasheet_gbs, 0)} | {_num(f.bound_datasheet)} "
            f"| {_num(f.bound_datasheet and f.decode / f.bound_datasheet, 2)} |"
        )
    sources = sorted(
        {f.measured_from for f in all_figures if f.measured_from and f.measured_from != "measured in the run"}
    )
    lines += ["", "Measured bandwidths read from: " + (", ".join(f"`{s}`" for s in sources) or "none") + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed page differs from the stores'")
    parser.add_argument("--out", type=Path, default=PAGE)
    args = parser.parse_args(argv)
    text = page(once_per_run([f for store in stores() for f in figures(store)]))
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"{args.out} is not what the stores give: run python benchmarks/gpu_results_page.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
