"""Benchmark a saved model folder with quantbench's bench step only (no quantization, no MLflow run), e.g. one
artifact under two vLLM kernels. Prints the metrics and tags as JSON.

    python benchmarks/gpu/serve_folder.py MODEL_DIR [hydra overrides, e.g. bench=seed hardware=h100]
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from transformers import AutoTokenizer

from quantbench import schema
from quantbench.job import bench

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    folder, overrides = Path(sys.argv[1]).resolve(), sys.argv[2:]  # vLLM reads a relative path as a hub id
    schema.register()  # the groups' typed schemas, as run.py registers them before Hydra composes
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    result = bench.run(bench.plan(cfg.bench), None, AutoTokenizer.from_pretrained(folder), folder, cfg.hardware)
    print(json.dumps({"metrics": result.metrics, "tags": result.tags}))


if __name__ == "__main__":
    main()
