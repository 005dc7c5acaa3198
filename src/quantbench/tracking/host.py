"""Where and what a job ran: the host, its CPU and GPU, the library versions, the git commit, the Ray or SLURM
launcher, and the pid and start stamp that let a later job tell a killed run from a running one."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

from quantbench.children import start_stamp
from quantbench.measure import CPU_ISA_FLAGS, cpu_info
from quantbench.versions import library_version

TRACKED_LIBRARIES = ("torch", "transformers", "lm-eval", "mlflow", "hydra-core")


def git_commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def launcher_tags() -> dict[str, str]:
    """Where a parallel launcher ran this job: the Ray node and worker, or the SLURM job and node."""
    tags = {}
    if "ray" in sys.modules:  # imported by the Ray worker that runs this job, never by us
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            tags |= {"launcher": "ray", "ray.node_id": context.get_node_id(), "ray.worker_id": context.get_worker_id()}
            tags["ray.gpu_ids"] = ",".join(str(g) for g in ray.get_gpu_ids()) or "none"
    if "SLURM_JOB_ID" in os.environ:
        job = os.environ["SLURM_JOB_ID"]
        if "SLURM_ARRAY_JOB_ID" in os.environ:  # a sweep is one job array: <array>_<task>, as squeue shows it
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
        tags |= {"launcher": "slurm", "slurm.job_id": job}
        tags["slurm.node"] = os.environ.get("SLURMD_NODENAME", os.environ.get("SLURM_NODELIST", ""))
    return tags


def environment_tags() -> dict[str, str]:
    import torch

    cpu_model, cpu_flags = cpu_info()
    tags = {f"version.{d}": library_version(d) for d in TRACKED_LIBRARIES}
    tags.update(
        {
            "git_commit": git_commit(),
            "host.name": platform.node(),
            "pid": str(os.getpid()),  # with pid_started: lets a later job tell a killed run from a running one
            "pid_started": start_stamp(os.getpid()) or "",
            "host.platform": platform.platform(),
            "host.cpu_count": str(os.cpu_count()),
            "host.cpu": cpu_model,
            "host.cpu_isa": " ".join(f for f in CPU_ISA_FLAGS if f in cpu_flags)
            or "none of " + ",".join(CPU_ISA_FLAGS),
            "host.gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            # which GPUs this job was given (a launcher sets it per job); "all" where nothing restricted it
            "host.cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "all"),
        }
    )
    return tags | launcher_tags()
