"""quantbench's Hydra sweeper over Optuna's ask/tell API (`hydra/sweeper=optuna`, conf/search/). Hydra finds it by
scanning the `hydra_plugins` namespace package, as it finds the Ray and SLURM launchers; see sweeper.py for why it
is ours and not hydra-optuna-sweeper."""
