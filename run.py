"""quantbench entry point: `python run.py [-m] method=awq,gptq model=tiny ...` (see `python run.py --help`)."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("QUANTBENCH_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict[str, float]:
    from quantbench import pipeline

    return pipeline.run(cfg)


if __name__ == "__main__":
    main()
