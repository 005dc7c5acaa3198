"""One command for everything: `quantbench run|report|register|recommend|ui`, each with --help, the same code as
`python run.py` and the `make` targets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def quantbench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantbench", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_command_and_an_unknown_one_is_refused():
    out = quantbench("--help")
    assert out.returncode == 0
    for command in ("run", "report", "register", "recommend", "ui", "server"):
        assert f"\n  {command} " in out.stdout
    bad = quantbench("reprot")
    assert bad.returncode == 2 and "unknown command 'reprot'" in bad.stderr


def test_the_console_script_is_installed_with_the_package():
    script = Path(sys.executable).parent / "quantbench"
    assert script.exists(), "reinstall the package (make install) to get the `quantbench` console script"
    assert subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120).returncode == 0


@pytest.mark.parametrize(
    "command, needle",
    [
        ("run", "== Configuration groups =="),
        ("report", "--sweep"),
        ("register", "policy=<name>"),
        ("recommend", "--gpu-memory-gb"),
        ("ui", "--port"),
        ("server", "--mlruns"),
    ],
)
def test_each_command_has_its_own_help(command, needle):
    out = quantbench(command, "--help")
    assert out.returncode == 0 and needle in out.stdout, out.stdout + out.stderr


def test_run_composes_the_same_config_as_run_py():
    out = quantbench("run", "--cfg", "job", "method=gptq")
    assert out.returncode == 0 and "_target_: quantbench.job.methods.gptq.GPTQ" in out.stdout


@pytest.mark.e2e
def test_report_register_and_recommend_work_on_the_default_sweep(default_sweep, tmp_path):
    uri = ["--tracking-uri", default_sweep.uri]
    report = quantbench("report", *uri, "--out", str(tmp_path), "--no-log")
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    assert "## (b3) What the KL divergence separates: fp16 < " in (tmp_path / "report.md").read_text()
    recommend = quantbench("recommend", *uri)
    assert recommend.returncode == 0 and "Recommendation: " in recommend.stdout, recommend.stdout[-3000:]
    register = quantbench("register", *uri, "registered_name=quantbench-cli-test")
    assert register.returncode == 0, register.stdout[-3000:] + register.stderr[-3000:]
    version = default_sweep.client.get_model_version_by_alias("quantbench-cli-test", "champion")
    assert version.run_id in register.stdout
