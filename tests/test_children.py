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
