"""Child processes a job starts (the fresh-process artifact check, the vLLM probe), each with a time limit.

Why: a hung library must cost the job, not the sweep. Each child leads its own process group, and on a timeout,
an exception here or Ctrl-C the whole group is killed (a child's own children, e.g. a GPU worker, included), so no
orphan keeps memory or a GPU; the job's run then ends FAILED with the reason. The vLLM engine, which streams its
output, uses `kill_group` the same way (bench/backends/vllm.py).
"""

from __future__ import annotations

import os
import signal
import subprocess


class ChildTimeout(RuntimeError):
    """A child process ran past its time limit and was killed with its process group."""


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group that `proc` leads, then reap `proc`."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run(
    cmd: list[str], *, timeout_s: float | None, what: str, setting: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)` in its own process group, killed as a group on timeout
    (`ChildTimeout`, naming `what` and the `setting` that sets the limit), on an exception or on Ctrl-C."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise ChildTimeout(
            f"{what} did not finish within {timeout_s:g} s ({setting}); it was killed with every "
            f"process it started. Its last output:\n{(out + err)[-2000:]}"
        ) from None
    except BaseException:
        kill_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
