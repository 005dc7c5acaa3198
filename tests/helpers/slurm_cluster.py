"""A real single-node SLURM cluster for the tests: Debian's munged, slurmctld and slurmd on this machine, with a
configuration of their own in a temporary folder (no system paths but munge's key), started and stopped here.
`make slurm` installs the packages; the daemons need root (slurmd starts jobs as their users)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from quantbench.children import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")


def unavailable_reason() -> str | None:
    """Why no cluster can start here, or None."""
    missing = [d for d in DAEMONS if not shutil.which(d) and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing: `make slurm` installs Debian's slurm-wlm)"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs, and these tests are not root"
    return None


def _munged() -> subprocess.Popen | None:
    """munged as the munge user, unless one answers already (then it is left alone); None if reused."""
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return None
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    proc = subprocess.Popen(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--foreground"])
    deadline = time.monotonic() + 30
    while subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
        assert proc.poll() is None and time.monotonic() < deadline, "munged did not start"
        time.sleep(0.2)
    return proc


@contextlib.contextmanager
def running(folder: Path, cpus: int = 2):
    """Yield the environment (SLURM_CONF) under which sbatch/squeue reach a one-node cluster with `cpus` CPUs in
    partition `debug`; shut the daemons down afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool", "log"):
        (folder / sub).mkdir(exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=quantbench-test",
                "SlurmctldHost=localhost(127.0.0.1)",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                f"StateSaveLocation={folder}/state",
                f"SlurmdSpoolDir={folder}/spool",
                f"SlurmctldPidFile={folder}/slurmctld.pid",
                f"SlurmdPidFile={folder}/slurmd.pid",
                f"SlurmctldLogFile={folder}/log/slurmctld.log",
                f"SlurmdLogFile={folder}/log/slurmd.log",
                f"SlurmctldPort={free_port()}",
                f"SlurmdPort={free_port()}",
                "ProctrackType=proctrack/linuxproc",  # no cgroups needed
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "ReturnToService=2",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "MpiDefault=none",
                f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN",
                "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    munged = _munged()
    try:
        subprocess.run(["/usr/sbin/slurmctld", "-f", str(conf)], check=True, env=env)
        subprocess.run(["/usr/sbin/slurmd", "-f", str(conf), "-N", "localhost"], check=True, env=env)
        deadline = time.monotonic() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env).stdout:
            logs = "".join(p.read_text(errors="replace")[-2000:] for p in (folder / "log").glob("*.log"))
            assert time.monotonic() < deadline, f"the SLURM node did not come up:\n{logs}"
            time.sleep(0.5)
        yield env
    finally:
        # A job's step tells slurmctld it is complete only after the launcher has read its results: shut down before
        # that and the step (slurmstepd) retries forever, outliving the test session. Let the queue drain first.
        deadline = time.monotonic() + 60
        while (
            time.monotonic() < deadline
            and subprocess.run(["squeue", "-h"], capture_output=True, text=True, env=env).stdout.strip()
        ):
            time.sleep(0.5)
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True)
        deadline = time.monotonic() + 30
        while any((folder / f"{d}.pid").exists() and _alive(folder / f"{d}.pid") for d in ("slurmctld", "slurmd")):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        _kill_steps_in(folder)  # whatever still outlived the drain (a step stuck past the deadline)
        if munged is not None:
            munged.terminate()
            munged.wait(timeout=30)


def _kill_steps_in(folder: Path) -> None:
    """SIGKILL the slurmstepd processes of this cluster (their working folder is inside `folder`); those of any
    other cluster on the machine are left alone."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "comm").read_text().strip() == "slurmstepd" and (proc / "cwd").resolve().is_relative_to(
                folder.resolve()
            ):
                os.kill(int(proc.name), 9)
        except (OSError, ValueError):  # gone meanwhile, or not ours to read
            continue


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text().split()[0]), 0)
        return True
    except (ProcessLookupError, ValueError, FileNotFoundError):
        return False
