"""`quantbench server`: an MLflow tracking server on 127.0.0.1 that serves the artifacts itself (`--serve-artifacts`),
so that jobs on other processes, GPUs or machines need nothing but its URL (tracking=server).

Two backend stores:
- `--store sqlite` (default): `<mlruns>/mlflow.db`, as the local default. One writer at a time is what SQLite is
  made for: enough for one machine's sequential sweeps, not for parallel jobs.
- `--store postgresql`: a PostgreSQL cluster of its own in `<mlruns>/postgres/data` (initialised on first use with
  Debian's PostgreSQL 15 binaries; run by the `postgres` user when we are root, since PostgreSQL refuses root),
  listening on 127.0.0.1 only, the artifacts in `<mlruns>/postgres/artifacts`. Concurrent jobs write to it safely;
  this is what `make server` starts.

`--detach` starts the server in the background (pid and log under `<mlruns>`), `quantbench server stop` stops it and
its PostgreSQL. A team that already runs an MLflow server needs none of this: MLFLOW_TRACKING_URI=<its URL> and
tracking=server.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

PG_USER = "postgres"
DATABASE = "mlflow"


def postgres_binary(name: str) -> str:
    """A PostgreSQL server program (initdb, pg_ctl): on PATH, or where Debian installs them (not on PATH there)."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(
            f"PostgreSQL's {name} was not found (on PATH or under /usr/lib/postgresql/*/bin): install PostgreSQL "
            f"(Debian: apt-get install postgresql; `make postgres` does it), or use --store sqlite."
        )
    return found


class Postgres:
    """A PostgreSQL cluster in `data`, on 127.0.0.1:`port`, its socket in the data folder (no system paths)."""

    def __init__(self, data: Path, port: int):
        self.data, self.port = data, port
        self.as_root = os.geteuid() == 0  # PostgreSQL refuses to run as root: then it runs as the postgres user
        self.log = data.parent / "postgres.log"

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *cmd: str) -> subprocess.CompletedProcess:
        if self.as_root:
            cmd = ("runuser", "-u", PG_USER, "--", *cmd)
        return subprocess.run(cmd, capture_output=True, text=True)

    def _check(self, what: str, out: subprocess.CompletedProcess) -> None:
        if out.returncode != 0:
            raise RuntimeError(f"PostgreSQL: {what} failed (exit {out.returncode}):\n{out.stdout}{out.stderr}")

    def start(self) -> None:
        self.data.parent.mkdir(parents=True, exist_ok=True)
        user = pwd.getpwnam(PG_USER) if self.as_root else None
        if user is not None:
            for path in (self.data.parent, *self.data.parent.parents):
                if path.stat().st_mode & 0o001 == 0 and path.stat().st_uid != user.pw_uid:
                    raise RuntimeError(
                        f"PostgreSQL runs as the {PG_USER} user, which cannot enter {path} (mode "
                        f"{oct(path.stat().st_mode & 0o777)}): put the server's folder (--mlruns) where every "
                        f"parent folder is world-executable."
                    )
            self.log.touch()
            os.chown(self.log, user.pw_uid, user.pw_gid)
        if not (self.data / "PG_VERSION").exists():
            self.data.mkdir(exist_ok=True)
            if user is not None:
                os.chown(self.data, user.pw_uid, user.pw_gid)
            log.info("Initialising a PostgreSQL cluster in %s", self.data)
            self._check(
                "initdb",
                self._run(postgres_binary("initdb"), "-D", str(self.data), "-U", PG_USER, "--auth=trust", "-E", "UTF8"),
            )
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1"
        out = self._run(
            postgres_binary("pg_ctl"), "start", "-w", "-D", str(self.data), "-l", str(self.log), "-o", options
        )
        self._check(f"pg_ctl start (its log: {self.log})", out)
        self._create_database()

    def _create_database(self) -> None:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=PG_USER, dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
                if cur.fetchone() is None:
                    cur.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            conn.close()

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._check(
                "pg_ctl stop", self._run(postgres_binary("pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(self.data))
            )


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now (for a server, a database, a test cluster)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen | None, log_file: Path, timeout_s: float = 180) -> None:
    """Until `url`/health answers; fails early, with the log's tail, if the process exits."""
    deadline = time.monotonic() + timeout_s  # ~50 s on a busy 2-core machine: uvicorn's workers import MLflow
    while True:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                return
        except OSError:
            tail = lambda: log_file.read_text(errors="replace")[-3000:] if log_file.exists() else ""  # noqa: E731
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"The MLflow server exited (code {process.returncode}):\n{tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"The MLflow server did not answer {url}/health in {timeout_s:.0f} s:\n{tail()}")
            time.sleep(0.5)


def serve(mlruns: Path, port: int, store: str, pg_port: int) -> int:
    """Run the MLflow server in the foreground (its PostgreSQL too, for --store postgresql) until it exits or this
    process gets SIGTERM/SIGINT; PostgreSQL is stopped on the way out."""
    mlruns.mkdir(parents=True, exist_ok=True)
    postgres = Postgres(mlruns / "postgres" / "data", pg_port) if store == "postgresql" else None
    backend, artifacts = f"sqlite:///{mlruns}/mlflow.db", mlruns / "artifacts"  # the local store's own layout
    if postgres is not None:
        postgres.start()
        backend, artifacts = postgres.uri, mlruns / "postgres" / "artifacts"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend]
    cmd += ["--serve-artifacts", "--artifacts-destination", str(artifacts)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the finally below on `quantbench server stop`
    mlflow = subprocess.Popen(cmd, start_new_session=True)
    try:
        return mlflow.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(mlflow.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            mlflow.wait(timeout=30)
        if postgres is not None:
            postgres.stop()


def pid_file(mlruns: Path) -> Path:
    return mlruns / "server.pid"


def start_detached(mlruns: Path, port: int, store: str, pg_port: int) -> str:
    """`quantbench server --detach`: the server in its own session, up when this returns; its URL."""
    mlruns.mkdir(parents=True, exist_ok=True)
    if pid_file(mlruns).exists():
        raise RuntimeError(f"A server is already running for {mlruns} (pid file {pid_file(mlruns)}): stop it first.")
    log_file = mlruns / "server.log"
    cmd = [sys.executable, "-m", "quantbench", "server", "--mlruns", str(mlruns), "--port", str(port)]
    cmd += ["--store", store, "--pg-port", str(pg_port)]
    with log_file.open("a") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    pid_file(mlruns).write_text(str(process.pid))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log_file)
    except RuntimeError:
        stop(mlruns)
        raise
    return url


def stop(mlruns: Path, timeout_s: float = 60) -> bool:
    """Stop a detached server (and its PostgreSQL); False if none was running."""
    path = pid_file(mlruns)
    if not path.exists():
        return False
    pid = int(path.read_text())
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):  # reap it where we started it (else a zombie answers kill 0)
                os.waitpid(pid, os.WNOHANG)
            os.kill(pid, 0)  # raises ProcessLookupError once it is gone
            time.sleep(0.2)
        os.killpg(pid, signal.SIGKILL)
    path.unlink()
    return True


def main(argv: list[str]) -> int:
    from quantbench.paths import ROOT

    p = argparse.ArgumentParser(
        prog="quantbench server",
        description="An MLflow tracking server on 127.0.0.1 that serves artifacts: jobs log to it with "
        "tracking=server and MLFLOW_TRACKING_URI=http://127.0.0.1:PORT. `quantbench server stop` stops a detached one.",
    )
    p.add_argument("action", nargs="?", choices=["start", "stop"], default="start", help="(default: start)")
    p.add_argument("--port", type=int, default=5000, help="the server's port on 127.0.0.1 (default: %(default)s)")
    p.add_argument("--mlruns", type=Path, default=ROOT / "mlruns", help="the server's folder (default: %(default)s)")
    p.add_argument(
        "--store",
        choices=["sqlite", "postgresql"],
        default="sqlite",
        help="backend store: <mlruns>/mlflow.db, or a PostgreSQL cluster in <mlruns>/postgres for concurrent jobs",
    )
    p.add_argument("--pg-port", type=int, default=5433, help="PostgreSQL's port on 127.0.0.1 (default: %(default)s)")
    p.add_argument("--detach", action="store_true", help="start in the background and return once it answers")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[quantbench server] %(message)s")
    mlruns = args.mlruns.resolve()
    if args.action == "stop":
        log.info("Stopped the server of %s" if stop(mlruns) else "No server running for %s", mlruns)
        return 0
    try:
        if not args.detach:
            return serve(mlruns, args.port, args.store, args.pg_port)
        url = start_detached(mlruns, args.port, args.store, args.pg_port)
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    log.info("Serving %s (%s store); jobs: MLFLOW_TRACKING_URI=%s ... tracking=server", url, args.store, url)
    return 0
