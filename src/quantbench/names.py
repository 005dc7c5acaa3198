"""The names the job writes and the study reads: MLflow artifact files, tags and metric labels. Here, on the ground
floor, so that `report`, `register` and `recommend` name a figure without importing torch, lm-eval or the job."""

from __future__ import annotations

# artifacts of a run
SAMPLES = "eval/samples.json"  # requested name -> [{doc_id, acc, ...}]; a group's rows also name their `task`
PER_TASK = "eval/per_task.json"  # every task and group lm-eval scored, subtasks and subgroups included
RESULTS = "eval/results.json"  # lm-eval's whole results JSON, samples removed
PER_WINDOW = "quality/per_window.json"  # the run artifact the report's paired intervals resample

# tags of a run
RESUMED_TAG = "resumed_in"  # resumed_in.<sweep_id> = the job number a later sweep gave a run it skipped
MEM_BASIS_TAG = "mem_basis"  # mem_basis.<metric> = what a memory figure measured (quantbench.measure.MEM_BASES)
# an Optuna search's trial (hydra_plugins/quantbench_optuna_sweeper): the sweeper hands each job its trial number in
# this environment variable (hydra.job.env_set); the job tags its run with the study and the trial, and a FINISHED run
# that a trial reuses by its config hash gets search_trial.<study> = the trial number
SEARCH_TRIAL_ENV = "QUANTBENCH_TRIAL"
SEARCH_STUDY_TAG = "search_study"
SEARCH_TRIAL_TAG = "search_trial"
QUALITY_WINDOWS_TAG = "quality_windows_sha256"  # the held-out windows' token ids and shape (quantbench.job.quality)


def stream_label(n: int) -> str:
    """`1_stream`, `8_streams`: how a speed metric names its number of concurrent streams."""
    return f"{n}_stream" if n == 1 else f"{n}_streams"
