"""The Hydra application: `python run.py ...` and `quantbench run ...` are this one function."""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig

from quantbench import schema
from quantbench.paths import ROOT

os.environ.setdefault("QUANTBENCH_ROOT", str(ROOT))  # `paths.root` (conf/config.yaml) reads it
schema.register()  # the config groups' typed schemas, before Hydra composes anything


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="config")
def main(cfg: DictConfig):
    from quantbench import pipeline

    return pipeline.run(cfg)
