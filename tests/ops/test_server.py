"""`quantbench server --store postgresql`: a real `mlflow server` on 127.0.0.1 serving artifacts from a PostgreSQL
cluster of its own (tests/conftest.py starts and stops it with the CLI), writers logging to it at the same time, and
what keeps it closed: password auth, loopback only, no shell, a pid file that never names a stranger."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import world_enterable_folder
from quantbench import children
from quantbench.children import free_port
from quantbench.ops import server

WRITER = """
import sys, tempfile, pathlib
from omegaconf import OmegaConf
from quantbench.tracking.writer import Tracker
n = int(sys.argv[2])
tracker = Tracker(OmegaConf.create({"uri": sys.argv[1], "experiment": "concurrent-writers", "artifact_root": None}))
with tracker.run(OmegaConf.create({"writer": n}), f"writer-{n}", {"writer": str(n)}, key=f"k{n}"):
    for step in range(40):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "step_seen": step}, step=step)
    folder = pathlib.Path(tempfile.mkdtemp())
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 4096)
    tracker.log_folder(folder, "model")
"""


@pytest.mark.e2e
def test_four_writers_at_once_lose_nothing_on_the_postgresql_server(postgres_server):
    url, folder = postgres_server
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, url, str(n)], stderr=subprocess.PIPE, text=True)
               for n in range(4)]  # fmt: skip
    for w in writers:
        assert w.wait(timeout=300) == 0, w.stderr.read()[-3000:]
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("concurrent-writers")  # one experiment, though four created it at once
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["writer"] for r in runs) == ["0", "1", "2", "3"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 40
        assert run.data.params["writer"] == run.data.tags["writer"]
        (weights,) = client.list_artifacts(run.info.run_id, "model")
        assert weights.file_size == 256 * 4096
    assert (
        len(list((folder / "postgres" / "artifacts").rglob("weights.bin"))) == 4
    )  # sent over HTTP, stored by the server


def test_a_missing_postgresql_is_named_with_how_to_install_it(monkeypatch):
    monkeypatch.setattr(server.shutil, "which", lambda name: None)
    monkeypatch.setattr(server.glob, "glob", lambda pattern: [])
    with pytest.raises(RuntimeError, match="apt-get install postgresql"):
        server.postgres_binary("initdb")


def _processes_of(data: Path) -> list[psutil.Process]:
    """The postmaster serving `data` and every process it started."""
    postmasters = [p for p in psutil.process_iter(["cmdline"]) if str(data) in (p.info["cmdline"] or [])
                   and Path((p.info["cmdline"] or [""])[0]).name == "postgres"]  # fmt: skip
    return [q for p in postmasters for q in (p, *p.children(recursive=True))]


def _listening(processes: list[psutil.Process]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket these processes listen on."""
    return {(c.laddr.ip, c.laddr.port) for p in processes for c in p.net_connections("inet") if c.status == "LISTEN"}


def _connect_without_password(port: int):
    import psycopg

    return psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=5)


@pytest.fixture
def pg_folder(monkeypatch):
    """A folder for a test cluster, the working directory meanwhile (where a shell would run `$(...)`); removed."""
    folder = world_enterable_folder("test-pg-")
    monkeypatch.chdir(folder)
    monkeypatch.setenv("PGPASSFILE", str(folder / "no-such-file"))  # nothing but what the test passes
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.e2e
def test_the_database_wants_its_password_and_listens_on_loopback_only(pg_folder):
    """No `initdb --auth=trust`: a local account that connects without the password is refused."""
    import psycopg

    pg = server.Postgres(pg_folder / "postgres" / "data", free_port())
    pg.start()
    try:
        with pytest.raises(psycopg.OperationalError, match="password"):
            _connect_without_password(pg.port).close()
        with pg.connect() as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
        assert stat.S_IMODE(pg.secret_file.stat().st_mode) == 0o600 and pg.secret_file.stat().st_uid == os.geteuid()
        processes = _processes_of(pg.data)
        listening = _listening(processes)
        assert listening and all(ipaddress.ip_address(ip).is_loopback for ip, _ in listening), listening
        sockets = [c.laddr for p in processes for c in p.net_connections("unix") if ".s.PGSQL" in (c.laddr or "")]
        assert not sockets, f"PostgreSQL opened a Unix socket: {sockets}"
    finally:
        pg.stop()
    assert not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.e2e
def test_a_data_folder_whose_path_has_a_space_and_shell_syntax_works_and_runs_nothing(pg_folder):
    pg = server.Postgres(pg_folder / "my store $(touch INJECTED)" / "data", free_port())
    pg.start()
    try:
        with pg.connect() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        pg.stop()
    assert not list(pg_folder.rglob("INJECTED")), "a path went through a shell"


@pytest.mark.e2e
def test_a_cluster_made_with_trust_auth_by_an_older_quantbench_gets_a_password(pg_folder):
    import psycopg

    data = pg_folder / "postgres" / "data"
    data.parent.mkdir()
    data.mkdir()
    initdb = [server.postgres_binary("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
        initdb = ["runuser", "-u", "postgres", "--", *initdb]
    subprocess.run(initdb, check=True, capture_output=True)
    pg = server.Postgres(data, free_port())
    pg.start()
    try:
        with pytest.raises(psycopg.OperationalError, match="password"):
            _connect_without_password(pg.port).close()
        with pg.connect() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        pg.stop()


@pytest.mark.e2e
def test_the_tracking_server_and_its_database_listen_on_loopback_only(postgres_server):
    url, folder = postgres_server
    recorded = json.loads(server.pid_file(folder).read_text())
    top = psutil.Process(recorded["pid"])
    processes = [top, *top.children(recursive=True)]
    listening = _listening(processes)
    pg_port = int((folder / "postgres" / "data" / "postmaster.pid").read_text().splitlines()[3])
    assert {int(url.rsplit(":", 1)[1]), pg_port} <= {port for _, port in listening}, listening
    assert all(ipaddress.ip_address(ip).is_loopback for ip, _ in listening), listening


@pytest.mark.parametrize("pid_file", ["bare pid", "pid with the stranger's start stamp", "an older pid file's time"])
def test_stop_with_a_stale_pid_file_never_signals_the_process_that_now_has_that_pid(tmp_path, pid_file):
    """After a reboot or a kill -9 the pid in server.pid may belong to anything; `quantbench server stop` must check
    that it is this folder's server (start time and command line) before it signals it."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        started = {
            "bare pid": None,
            "pid with the stranger's start stamp": children.start_stamp(stranger.pid),
            "an older pid file's time": psutil.Process(stranger.pid).create_time(),
        }[pid_file]
        text = str(stranger.pid) if started is None else json.dumps({"pid": stranger.pid, "started": started})
        server.pid_file(tmp_path).write_text(text)
        assert server.stop(tmp_path, timeout_s=5) is False
        assert stranger.poll() is None, "quantbench server stop signalled an unrelated process"
        assert not server.pid_file(tmp_path).exists()  # the stale file is gone: a new server can start
    finally:
        stranger.send_signal(signal.SIGKILL)
        stranger.wait()
