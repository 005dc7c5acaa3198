"""The Hydra application: `python run.py ...` and `quantbench run ...` are this one function."""

from __future__ import annotations

import os
import warnings

import hydra
from omegaconf import DictConfig

from quantbench import schema
from quantbench.paths import ROOT

os.environ.setdefault("QUANTBENCH_ROOT", str(ROOT))  # `paths.root` (conf/config.yaml) reads it
schema.register()  # the config groups' typed schemas, before Hydra composes anything
# conf/hydra/launcher/ray.yaml shadows the Ray plugin's config of the same name on purpose (it takes each job's
# resources from the hardware group) and names the plugin's schema itself; Hydra 1.3 still matches the two by name
# and warns that it will stop doing so in 1.2, a release long past.
warnings.filterwarnings("ignore", message="\n'hydra/launcher/ray' is validated against ConfigStore schema")


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="config")
def main(cfg: DictConfig):
    from quantbench import pipeline

    return pipeline.run(cfg)
