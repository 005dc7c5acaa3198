"""Child processes run with a time limit, and running over it kills the child and everything it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantbench import children


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_child_that_runs_over_its_limit_is_killed_with_the_processes_it_started(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(g.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    started = time.monotonic()
    with pytest.raises(children.ChildTimeout, match=r"The test child did not finish within 2 s \(a.knob\)"):
        children.run([sys.executable, "-c", script], timeout_s=2, what="The test child", setting="a.knob")
    assert time.monotonic() - started < 30
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # SIGKILL is delivered at once, the reaping by init may take a moment
        if not alive(grandchild):
            break
        time.sleep(0.1)
    assert not alive(grandchild)


def test_a_child_within_its_limit_returns_its_output_and_exit_code():
    done = children.run(
        [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
        timeout_s=60,
        what="x",
        setting="y",
    )
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")


def test_a_test_session_stopped_with_sigterm_still_tears_down_its_fixtures(tmp_path):
    """So that `kill`ing `make test` stops the servers its fixtures started (tests/helpers/sigterm.py)."""
    (tmp_path / "test_held.py").write_text(
        "import pathlib, time, pytest\n"
        "@pytest.fixture(scope='session')\n"
        "def server():\n"
        f"    yield pathlib.Path({str(tmp_path)!r}, 'started').touch()\n"
        f"    pathlib.Path({str(tmp_path)!r}, 'stopped').touch()\n"
        "def test_waits(server):\n"
        "    time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    session = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "helpers.sigterm", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    session.send_signal(signal.SIGTERM)
    out = session.communicate(timeout=60)[0]
    assert (tmp_path / "stopped").exists(), out


# A job that runs one child, which starts a grandchild (as vLLM's engine starts its engine core) and writes both pids.
JOB = """
import os, sys, subprocess
from quantbench import children
child = (
    "import subprocess, sys, time, os\\n"
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\\n"
    f"open({sys.argv[1]!r}, 'w').write(f'{{os.getpid()}} {{g.pid}}')\\n"
    "time.sleep(120)\\n"
)
if sys.argv[2] == "plain":  # no handlers: what SIGKILL leaves of a job
    children.run([sys.executable, "-c", child], timeout_s=300, what="The test child", setting="a.knob")
else:
    with children.stop_on_signals():
        children.run([sys.executable, "-c", child], timeout_s=300, what="The test child", setting="a.knob")
"""


def _start_job(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, list[int]]:
    """The job above, once its child and grandchild run: (the job, [child pid, grandchild pid])."""
    pids = tmp_path / "pids"
    job = subprocess.Popen(
        [sys.executable, "-c", JOB, str(pids), mode], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 60
    while not (pids.exists() and len(pids.read_text().split()) == 2):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0]
        time.sleep(0.1)
    return job, [int(p) for p in pids.read_text().split()]


def _gone(pids: list[int], timeout_s: float = 20) -> list[int]:
    """The pids still alive (not zombies) after up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = [p for p in pids if alive(p) and "State:\tZ" not in _status(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""


def test_a_job_killed_with_sigkill_takes_its_child_and_grandchild_with_it(tmp_path):
    """SIGKILL runs no handler in the job: the guard, told by the kernel that the job died, kills the child's group."""
    job, pids = _start_job(tmp_path, "plain")
    job.kill()
    job.wait()
    left = _gone(pids)
    for pid in left:  # what the assertion below reports must not outlive the test either
        os.kill(pid, signal.SIGKILL)
    assert left == [], "processes outlived the job killed with SIGKILL"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_job_stopped_by_a_signal_kills_its_children_and_exits_naming_it(tmp_path, signum):
    job, pids = _start_job(tmp_path, "handlers")
    job.send_signal(signum)
    out = job.communicate(timeout=60)[0]
    assert job.returncode == 128 + signum, out
    assert f"stopped by {signal.Signals(signum).name} (signal {int(signum)})" in out
    assert _gone(pids, timeout_s=1) == [], "the children were not killed at once"


def test_a_guarded_child_reports_the_exit_status_of_its_command():
    """The guard ends as its command did, so that callers see the same status (a signal as a negative code)."""
    done = children.run([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"], timeout_s=60, what="x",
                        setting="y")  # fmt: skip
    assert done.returncode == -signal.SIGKILL
    assert children.describe_exit(done.returncode) == "was killed by SIGKILL"
    assert children.describe_exit(3) == "exited with 3"


def test_a_signal_the_job_was_started_to_ignore_stays_ignored():
    """`nohup python run.py ...` ignores SIGHUP: closing the terminal must not stop the job."""
    code = (
        "import os, signal\n"
        "from quantbench import children\n"
        "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "with children.stop_on_signals():\n"
        "    os.kill(os.getpid(), signal.SIGHUP)\n"
        "    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL\n"
        "assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN\n"
        "print('still running')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "still running" in out.stdout, out.stderr


@pytest.mark.skipif(not Path("/proc/sys/kernel/random/boot_id").exists(), reason="the boot-relative stamp is Linux's")
def test_a_process_keeps_its_start_stamp_when_the_wall_clock_steps(monkeypatch):
    """psutil's create_time() is the boot time plus the start since boot, and Linux derives the boot time from the
    wall clock: an NTP step moves it. The stamp must not move, or a server or job that ran through a step is taken
    for another process (left running by `server stop`, or marked interrupted while it runs)."""
    import psutil
    from psutil import _pslinux

    me = os.getpid()
    stamp, before = children.start_stamp(me), psutil.Process(me).create_time()
    stepped = _pslinux.boot_time() + 5.0
    monkeypatch.setattr(_pslinux, "boot_time", lambda: stepped)
    assert psutil.Process(me).create_time() - before > 4  # the seam: psutil now sees a clock 5 s ahead
    assert children.start_stamp(me) == stamp
    assert children.same_process(me, stamp)


def test_a_start_stamp_tells_a_reused_or_finished_pid_from_the_process_it_was_taken_of():
    import psutil

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs, mine = children.start_stamp(other.pid), children.start_stamp(os.getpid())
        assert theirs and mine and theirs != mine
        assert children.same_process(other.pid, theirs) and not children.same_process(other.pid, mine)
        assert children.same_process(other.pid, None)
        # an older quantbench's stamp: create_time() as a number, within a second
        created = psutil.Process(other.pid).create_time()
        assert children.same_process(other.pid, repr(created)) and not children.same_process(other.pid, "12345.0")
    finally:
        other.kill()
        other.wait()
    assert children.start_stamp(other.pid) is None
    assert not children.same_process(other.pid, theirs) and not children.same_process(other.pid, None)
