"""Start several real processes so that they race: each does its imports, then all are released at once.

A race between two jobs only shows when their critical moments overlap; imports take seconds and vary, so each
process announces that it is ready (a file in a shared folder) and waits until every other one is, then runs its
part. Optionally they wait further for the next whole second, so that timestamps they take are the same second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from quantbench.paths import ROOT

PRELUDE = """
import sys, time
from pathlib import Path
_folder, _me, _n, _second = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
sys.argv = [sys.argv[0], *sys.argv[5:]]
{setup}
(_folder / f"ready-{{_me}}").touch()
while len(list(_folder.glob("ready-*"))) < _n:
    time.sleep(0.001)
if _second:  # released together: every process computes the same next whole second
    time.sleep(int(time.time()) + 1.02 - time.time())
{body}
"""


def run_together(
    parts: list[tuple[str, str, list[str]]],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    same_second: bool = False,
    timeout: int = 1800,
) -> list[subprocess.CompletedProcess]:
    """Run each (setup, body, argv) in its own `python -c` process; the bodies start together. Returns each
    process's result, stdout and stderr merged into stdout."""
    env = {**os.environ, **(env or {})}
    with tempfile.TemporaryDirectory() as folder:
        procs = []
        for i, (setup, body, argv) in enumerate(parts):
            code = PRELUDE.format(setup=setup, body=body)
            cmd = [sys.executable, "-c", code, folder, str(i), str(len(parts)), "1" if same_second else "0", *argv]
            procs.append(
                subprocess.Popen(
                    cmd, env=env, cwd=cwd or ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
            )
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, ""))
    return results
