"""Child processes a job starts (the fresh-process artifact check, the vLLM probe and engine, the tracking server's
MLflow and PostgreSQL), and how none of them outlives the job however it ends.

Why: a hung library must cost the job, not the sweep, and a child that survives its job keeps memory or a GPU that
the next job then counts. Every child is started by `spawn` under a guard, `python -m quantbench.children <job pid>
-- <command>`, which leads the child's process group (the command, and whatever it starts, e.g. vLLM's engine core
and GPU workers, are in it) and kills that whole group:
- on a timeout, an exception or Ctrl-C in the job (`kill_group`);
- when the job gets SIGTERM or SIGHUP (a SLURM cancel, a Ray worker kill, a closed terminal): `stop_on_signals`
  kills every live group at once and ends the job with `Stopped`, so its run ends FAILED naming the signal;
- when the job dies without running any handler (SIGKILL, the OOM killer): the kernel sends the guard SIGTERM
  (PR_SET_PDEATHSIG), and the guard kills its group. The guard does nothing but wait, so it handles that at once,
  where a busy child (a GPU engine in a long benchmark) might not.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_live: set[int] = set()  # the process groups (= guard pids) of the children running now


class ChildTimeout(RuntimeError):
    """A child process ran past its time limit and was killed with its process group."""


class Stopped(SystemExit):
    """The job got SIGTERM or SIGHUP: its children are killed, its run ends FAILED with this reason, and the process
    exits with 128 + the signal's number (as a shell reports a process killed by it)."""

    def __init__(self, signum: int):
        self.failure_type = signal.Signals(signum).name
        super().__init__(
            f"The job was stopped by {self.failure_type} (signal {signum}) sent to its process (pid {os.getpid()}): "
            f"a scheduler's cancel or time limit (SLURM, Ray), a kill, or a closed terminal. Its child processes were "
            f"killed with everything they started."
        )
        self.code = 128 + signum


def spawn(cmd: list[str], **popen_kwargs) -> subprocess.Popen:
    """`subprocess.Popen(cmd, **popen_kwargs)` under a guard that leads the child's process group and kills it when
    this process dies (see the module's docstring). `proc.pid` is the guard's: the group to kill. Children must be
    started from a thread that outlives them (the main thread): the kernel ties PR_SET_PDEATHSIG to the thread."""
    guard = [sys.executable, "-m", "quantbench.children", str(os.getpid()), "--", *cmd]
    proc = subprocess.Popen(guard, start_new_session=True, **popen_kwargs)
    _live.add(proc.pid)
    return proc


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group that `proc` leads, then reap `proc`."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    _live.discard(proc.pid)


def run(
    cmd: list[str], *, timeout_s: float | None, what: str, setting: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)` as a guarded child (`spawn`), killed as a group on timeout
    (`ChildTimeout`, naming `what` and the `setting` that sets the limit), on an exception or on Ctrl-C."""
    proc = spawn(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
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
    _live.discard(proc.pid)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now, for a child server (the tracking server and its database,
    vLLM's server under bench=serving, a test cluster)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_stamp(pid: int) -> str | None:
    """When process `pid` started, in a form no change of the wall clock alters; None if it is gone.

    Why: psutil's create_time() is the start since boot plus the boot time, and Linux derives the boot time from the
    wall clock, so an NTP step moves it. A job or server that ran through a step then looked like another process,
    and was left running, or marked interrupted, while alive. On Linux the stamp is this boot's id and the start in
    clock ticks since boot (/proc/PID/stat, field 22); elsewhere create_time()."""
    import psutil

    boot_id = Path("/proc/sys/kernel/random/boot_id")
    if not boot_id.exists():
        try:
            return repr(psutil.Process(pid).create_time())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and ')': fields 3.. follow its last ')'
    return f"{boot_id.read_text().strip()}:{fields[22 - 3]}"


def same_process(pid: int, stamp: str | None) -> bool:
    """Whether `pid` still runs and is the process stamped `stamp` by start_stamp (a reused pid is not; None: any).
    A bare number is an older quantbench's create_time(), compared as it was, within a second."""
    now = start_stamp(pid)
    if now is None or stamp is None:
        return now is not None
    try:
        recorded = float(stamp)
    except ValueError:
        return now == stamp
    import psutil

    with contextlib.suppress(psutil.Error):
        return abs(psutil.Process(pid).create_time() - recorded) < 1.0
    return False


def describe_exit(code: int) -> str:
    """'exited with 3' or 'was killed by SIGKILL' for a Popen return code."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with {code}"


def kill_live_groups() -> None:
    """SIGKILL every child group that is running now."""
    for pgid in list(_live):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """For one job: on SIGTERM or SIGHUP kill every live child group at once, then raise `Stopped` in the job's main
    thread (the job's run ends FAILED with it). A second signal during the cleanup only kills children again, so that
    the run can still be marked. Outside the main thread (where Python cannot take signals) this does nothing; a signal
    that is ignored (SIGHUP under nohup) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping: list[int] = []

    def on_signal(signum, frame):
        kill_live_groups()
        if not stopping:
            stopping.append(signum)
            raise Stopped(signum)

    # a signal the job was started to ignore (`nohup` ignores SIGHUP) stays ignored
    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS if signal.getsignal(s) != signal.SIG_IGN}
    try:
        yield
    except Stopped as exc:
        log.error("%s", exc)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _guard(job_pid: int, cmd: list[str]) -> int:
    """Run `cmd` in this process group (which this process leads) and return its exit status; kill the group when
    the job dies (PR_SET_PDEATHSIG) or when this guard gets SIGTERM or SIGHUP."""

    def kill_group_now(signum, frame):
        os.killpg(0, signal.SIGKILL)

    for s in STOP_SIGNALS:
        signal.signal(s, kill_group_now)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != job_pid:  # the job died before the kernel could be told: nothing would kill us
        return 1
    child = subprocess.Popen(cmd)
    code = child.wait()
    if code < 0:  # end as the child did, so that the job sees the same status
        if -code in STOP_SIGNALS:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


if __name__ == "__main__":
    job, separator, *command = sys.argv[1:]
    assert separator == "--", sys.argv
    sys.exit(_guard(int(job), command))
