"""`python -m quantbench.ops.envcheck`: import every library quantbench drives and print its version.

pip cannot prove that vLLM (installed with --no-deps beside newer transformers and compressed-tensors than
it pins) imports; this does, at install time, and the tests exercise each library for real.
"""

import importlib
import logging
import sys
from importlib import metadata

from quantbench.upstream.vllm_cpu import installed_vllm

MODULES = {
    "torch": "torch",
    "transformers": "transformers",
    "accelerate": "accelerate",
    "hydra": "hydra-core",
    "mlflow": "mlflow",
    "lm_eval": "lm-eval",
    "bitsandbytes": "bitsandbytes",
    "llmcompressor": "llmcompressor",
    "compressed_tensors": "compressed-tensors",
    "auto_round": "auto-round",
    "aqlm": "aqlm",
    "gptqmodel": "gptqmodel",
    "optimum": "optimum",
    "datasets": "datasets",
    "ray": "ray",  # hydra/launcher=ray
    "hydra_plugins.hydra_ray_launcher.ray_launcher": "hydra-ray-launcher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher": "hydra-submitit-launcher",  # submitit_slurm
    "psycopg": "psycopg-binary",  # PostgreSQL: the tracking server's store and postgresql:// tracking URIs (SQLAlchemy 2.1)
    "vllm": None,  # vllm-cpu or vllm, whichever is installed
}


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failed = []
    for module, dist in MODULES.items():
        dist = dist or (installed_vllm() or ("vllm",))[0]
        try:
            importlib.import_module(module)
            logging.info("ok   %-20s %s", dist, metadata.version(dist))
        except Exception as exc:  # report every failure, not just the first
            failed.append(module)
            logging.error("FAIL %-20s %s: %s", dist, type(exc).__name__, exc)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
