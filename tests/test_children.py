"""Child processes run with a time limit, and running over it kills the child and everything it started."""

from __future__ import annotations

import os
import sys
import time

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
