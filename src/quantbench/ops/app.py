"""The Hydra application: `python run.py ...` and `quantbench run ...` are this one function."""

from __future__ import annotations

import os
import warnings

import hydra
from omegaconf import DictConfig, OmegaConf

from quantbench import redact, schema
from quantbench.paths import ROOT, job_dirname, unique_suffix

os.environ.setdefault("QUANTBENCH_ROOT", str(ROOT))  # `paths.root` (conf/config.yaml) reads it
schema.register()  # the config groups' typed schemas, before Hydra composes anything
redact.install_log_filter()  # before Hydra logs anything: its launcher logs each job's overrides (a URI's password)
# the run and sweep folders' suffix (conf/hydra/default.yaml); cached, so every use in one config is the same value
OmegaConf.register_new_resolver("quantbench.unique", unique_suffix, use_cache=True, replace=True)
OmegaConf.register_new_resolver("quantbench.dirname", job_dirname, replace=True)  # a sweep job's folder name
# conf/hydra/launcher/{ray,submitit_slurm}.yaml shadow the plugins' configs of the same names on purpose (they take
# each job's resources from the hardware group), as conf/hydra/sweeper/optuna.yaml shows our sweeper's defaults;
# Hydra 1.3 types them with the plugins' schemas, matched by name, and warns that it will stop doing so in 1.2, a
# release long past. (Naming a plugin's schema in the file's defaults instead fails for submitit: Hydra's plugin
# scan reloads its config module, so the two classes differ.)
warnings.filterwarnings(
    "ignore", message="\n'hydra/(launcher/(ray|submitit_slurm)|sweeper/optuna)' is validated against ConfigStore"
)


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="config")
def main(cfg: DictConfig):
    """One job. A tracking store that does not answer fails it in seconds, before the imports below (seconds more);
    SIGTERM or SIGHUP kills its children and ends its run FAILED naming the signal (the process then exits with
    128 + the signal's number)."""
    from quantbench import children, stores

    stores.check_reachable(str(cfg.tracking.uri))
    from quantbench.job import pipeline

    with children.stop_on_signals():
        return pipeline.run(cfg)
