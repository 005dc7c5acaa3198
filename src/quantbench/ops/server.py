"""`quantbench server`: an MLflow tracking server on 127.0.0.1 that serves the artifacts itself (`--serve-artifacts`),
so that jobs on other processes, GPUs or machines need nothing but its URL (tracking=server).

Two backend stores:
- `--store sqlite` (default): `<mlruns>/mlflow.db`, as the local default. One writer at a time is what SQLite is
  made for: enough for one machine's sequential sweeps, not for parallel jobs.
- `--store postgresql`: a PostgreSQL cluster of its own in `<mlruns>/postgres/data` (initialised on first use with
  Debian's PostgreSQL 15 binaries; run by the `postgres` user when we are root, since PostgreSQL refuses root), the
  artifacts in `<mlruns>/postgres/artifacts`. Concurrent jobs write to it safely; this is what `make server` starts.

Security (docs/server-security.md): both listen on 127.0.0.1 only unless `--host` says otherwise. PostgreSQL takes
TCP connections on 127.0.0.1 only (no Unix socket), and every connection needs the password (scram-sha-256) that was
generated for the cluster and is kept in `<mlruns>/postgres/pgpass` (mode 0600, libpq's password file format, read
by MLflow through PGPASSFILE: it is on no command line). The MLflow server itself has no authentication: any local
user can reach 127.0.0.1; the docs say how to put auth in front of it for a team.

`--detach` starts the server in the background (pid and log under `<mlruns>`), `quantbench server stop` stops it and
its PostgreSQL. MLflow and PostgreSQL are guarded children (quantbench.children): they die with the server process
however it ends. A team that already runs an MLflow server needs none of this: MLFLOW_TRACKING_URI=<its URL> and
tracking=server.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import ipaddress
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from quantbench import children

log = logging.getLogger(__name__)

PG_USER = "postgres"
DATABASE = "mlflow"
LOOPBACK = "127.0.0.1"
WORKER_HEALTHCHECK_S = 120
# Every connection needs the password; TCP on loopback only (listen_addresses); no Unix socket is opened.
PG_HBA = f"""# Written by quantbench at every start (quantbench/ops/server.py): password (scram-sha-256) for every connection.
host all all {LOOPBACK}/32 scram-sha-256
host all all ::1/128 scram-sha-256
"""


def postgres_binary(name: str) -> str:
    """A PostgreSQL server program (initdb, postgres): on PATH, or where Debian installs them (not on PATH there)."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(
            f"PostgreSQL's {name} was not found (on PATH or under /usr/lib/postgresql/*/bin): install PostgreSQL "
            f"(Debian: apt-get install postgresql; `make postgres` does it), or use --store sqlite."
        )
    return found


def write_private(path: Path, text: str, owner: pwd.struct_passwd | None = None) -> None:
    """Write `text` to a file that only its owner can read (0600 from its creation, never wider)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)


class Postgres:
    """A PostgreSQL cluster in `data`, on 127.0.0.1:`port` only, password auth for every connection (module docstring).

    Started as a guarded child (`postgres -D ...`, no pg_ctl: pg_ctl and its `-o` options go through a shell, where a
    path with a space breaks and one with `$(...)` runs), stopped with SIGINT (PostgreSQL's fast shutdown)."""

    def __init__(self, data: Path, port: int):
        self.data, self.port = data, port
        self.folder = data.parent
        self.secret_file = self.folder / "pgpass"  # libpq's password file: host:port:database:user:password
        self.log = self.folder / "postgres.log"
        self.user = pwd.getpwnam(PG_USER) if os.geteuid() == 0 else None  # PostgreSQL refuses to run as root
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        """The database's URI, without the password: libpq reads it from `secret_file` (PGPASSFILE)."""
        return f"postgresql://{PG_USER}@{LOOPBACK}:{self.port}/{DATABASE}"

    def password(self) -> str:
        return self.secret_file.read_text().strip().rsplit(":", 1)[1]

    def client_env(self) -> dict[str, str]:
        """The environment for a process that connects to this cluster (MLflow): where the password is."""
        return {**os.environ, "PGPASSFILE": str(self.secret_file)}

    def _as_postgres(self, cmd: list[str]) -> list[str]:
        """`cmd` as the postgres user when we are root (runuser: the venv's Python may be out of that user's reach, so
        the guard stays ours and only PostgreSQL's own programs change user)."""
        return cmd if self.user is None else ["runuser", "-u", PG_USER, "--", *cmd]

    def _check(self, what: str, out: subprocess.CompletedProcess) -> None:
        if out.returncode != 0:
            raise RuntimeError(f"PostgreSQL: {what} failed (exit {out.returncode}):\n{out.stdout}{out.stderr}")

    def _check_folders(self) -> None:
        if self.user is None:
            return
        for path in (self.folder, *self.folder.parents):
            if path.stat().st_mode & 0o001 == 0 and path.stat().st_uid != self.user.pw_uid:
                raise RuntimeError(
                    f"PostgreSQL runs as the {PG_USER} user, which cannot enter {path} (mode "
                    f"{oct(path.stat().st_mode & 0o777)}): put the server's folder (--mlruns) where every "
                    f"parent folder is world-executable."
                )

    def _set_up(self) -> None:
        """Initialise the cluster with a generated password on first use; give a cluster of an older quantbench
        (trust auth, no password) one, in single-user mode (which needs no connection)."""
        if not (self.data / "PG_VERSION").exists():
            self.data.mkdir(exist_ok=True)
            if self.user is not None:
                os.chown(self.data, self.user.pw_uid, self.user.pw_gid)
            password = secrets.token_urlsafe(32)
            once = self.folder / ".initdb-password"
            write_private(once, password + "\n", self.user)
            log.info("Initialising a PostgreSQL cluster in %s", self.data)
            try:
                cmd = [postgres_binary("initdb"), "-D", str(self.data), "-U", PG_USER, "-E", "UTF8"]
                cmd += ["--auth=scram-sha-256", f"--pwfile={once}"]
                out = subprocess.run(self._as_postgres(cmd), capture_output=True, text=True, cwd=self.folder)
                self._check("initdb", out)
            finally:
                once.unlink()
            write_private(self.secret_file, f"{LOOPBACK}:*:*:{PG_USER}:{password}\n")
        elif not self.secret_file.exists():
            log.info("Giving the PostgreSQL cluster in %s a password (it had none: trust auth)", self.data)
            password = secrets.token_urlsafe(32)
            sql = f"ALTER USER {PG_USER} WITH PASSWORD '{password}';\n"  # on stdin: on no command line
            cmd = [postgres_binary("postgres"), "--single", "-D", str(self.data), "postgres"]
            out = subprocess.run(self._as_postgres(cmd), input=sql, capture_output=True, text=True, cwd=self.folder)
            self._check("setting the password (postgres --single)", out)
            write_private(self.secret_file, f"{LOOPBACK}:*:*:{PG_USER}:{password}\n")
        (self.data / "pg_hba.conf").write_text(PG_HBA)

    def start(self, timeout_s: float = 120) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._check_folders()
        self._set_up()
        cmd = [postgres_binary("postgres"), "-D", str(self.data), "-p", str(self.port)]
        cmd += ["-c", f"listen_addresses={LOOPBACK}", "-c", "unix_socket_directories="]
        with self.log.open("a") as out:
            self.process = children.spawn(self._as_postgres(cmd), stdout=out, stderr=subprocess.STDOUT, cwd=self.folder)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.connect(dbname="postgres").close()
                break
            except Exception as exc:  # noqa: BLE001 - not up yet; its log says why if it never comes up
                if self.process.poll() is not None or time.monotonic() > deadline:
                    tail = self.log.read_text(errors="replace")[-3000:]
                    self.stop()
                    raise RuntimeError(f"PostgreSQL did not start ({exc}); its log {self.log}:\n{tail}") from None
                time.sleep(0.5)
        self._create_database()

    def connect(self, dbname: str = DATABASE):
        import psycopg

        return psycopg.connect(
            host=LOOPBACK, port=self.port, user=PG_USER, dbname=dbname, password=self.password(), connect_timeout=5
        )

    def _create_database(self) -> None:
        with self.connect(dbname="postgres") as conn:
            conn.autocommit = True
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone() is None:
                conn.execute(f"CREATE DATABASE {DATABASE}")

    def stop(self, timeout_s: float = 60) -> None:
        """Fast shutdown (SIGINT to the postmaster: clients are disconnected, the data is flushed); killed with its
        process group if it does not end within `timeout_s`."""
        if self.process is None:
            return
        pid_file = self.data / "postmaster.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            postmaster = int(pid_file.read_text().split()[0])
            if os.getpgid(postmaster) == self.process.pid:  # ours, not a recycled pid
                os.kill(postmaster, signal.SIGINT)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("PostgreSQL did not stop within %.0f s: killed", timeout_s)
        children.kill_group(self.process)
        self.process = None


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


def check_host(host: str) -> None:
    """Warn where a server is asked to listen beyond this machine: it has no authentication of its own."""
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return
    if host == "localhost":
        return
    log.warning(
        "Listening on %s: anyone who can reach this address can read, change and delete every run, with no login. "
        "Put authentication in front of it (docs/server-security.md: MLflow's basic-auth app or a reverse proxy).",
        host,
    )


def serve(mlruns: Path, port: int, store: str, pg_port: int, host: str = LOOPBACK) -> int:
    """Run the MLflow server in the foreground (its PostgreSQL too, for --store postgresql) until it exits or this
    process gets SIGTERM/SIGINT/SIGHUP; both are stopped on the way out (and killed with it if it is killed)."""
    mlruns.mkdir(parents=True, exist_ok=True)
    check_host(host)
    postgres = Postgres(mlruns / "postgres" / "data", pg_port) if store == "postgresql" else None
    backend, artifacts, env = f"sqlite:///{mlruns}/mlflow.db", mlruns / "artifacts", None  # the local store's layout
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, lambda *_: sys.exit(0))  # run the finally below on `quantbench server stop`
    try:
        if postgres is not None:
            postgres.start()
            backend, artifacts, env = postgres.uri, mlruns / "postgres" / "artifacts", postgres.client_env()
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend]
        cmd += ["--serve-artifacts", "--artifacts-destination", str(artifacts)]
        cmd += ["--host", host, "--port", str(port)]
        # uvicorn replaces a worker that misses a 5 s health check; on a busy small machine a worker still importing
        # MLflow misses it, and its replacement too: the server never came up in 180 s (seen with 6 jobs on 2 cores)
        cmd += ["--uvicorn-opts", f"--timeout-worker-healthcheck {WORKER_HEALTHCHECK_S}"]
        mlflow = children.spawn(cmd, env=env)
        try:
            return mlflow.wait()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(mlflow.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                mlflow.wait(timeout=30)
            children.kill_group(mlflow)
    finally:
        if postgres is not None:
            postgres.stop()


def pid_file(mlruns: Path) -> Path:
    return mlruns / "server.pid"


def start_detached(mlruns: Path, port: int, store: str, pg_port: int, host: str = LOOPBACK) -> str:
    """`quantbench server --detach`: the server in its own session, up when this returns; its URL."""
    mlruns.mkdir(parents=True, exist_ok=True)
    if running_server(mlruns) is not None:
        raise RuntimeError(f"A server is already running for {mlruns} (pid file {pid_file(mlruns)}): stop it first.")
    log_file = mlruns / "server.log"
    cmd = [sys.executable, "-m", "quantbench", "server", "--mlruns", str(mlruns), "--port", str(port)]
    cmd += ["--store", store, "--pg-port", str(pg_port), "--host", host]
    with log_file.open("a") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    identity = {"pid": process.pid, "started": children.start_stamp(process.pid), "mlruns": str(mlruns)}
    pid_file(mlruns).write_text(json.dumps(identity))
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    try:
        wait_healthy(url, process, log_file)
    except RuntimeError:
        stop(mlruns)
        raise
    return url


def running_server(mlruns: Path):
    """The detached server of `mlruns` (a psutil.Process) if its pid file names one that still runs, else None.

    A pid is only trusted with its identity: the process must have started when the pid file says and be
    `quantbench server` for this folder. After a reboot or a kill -9 the pid may belong to anything now, and that
    process must never be signalled."""
    import psutil

    path = pid_file(mlruns)
    if not path.exists():
        return None
    try:
        recorded = json.loads(path.read_text())
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict):  # a pid file of an older quantbench: the bare pid, no start time
        recorded = {"pid": recorded if isinstance(recorded, int) else 0, "started": None}
    try:
        process = psutil.Process(recorded["pid"])
        cmdline = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, ValueError):
        return None
    started = recorded["started"]
    same_start = children.same_process(process.pid, None if started is None else str(started))
    ours = "quantbench" in cmdline and "server" in cmdline and str(mlruns) in cmdline
    if same_start and ours:
        return process
    log.warning(
        "The pid file %s names pid %s, which is now another process (%s): not signalled",
        path,
        recorded["pid"],
        " ".join(cmdline)[:200] or "?",
    )
    return None


def stop(mlruns: Path, timeout_s: float = 60) -> bool:
    """Stop a detached server (and its PostgreSQL); False if none was running. A stale pid file is removed."""
    import psutil

    path = pid_file(mlruns)
    if not path.exists():
        return False
    process = running_server(mlruns)
    path.unlink()
    if process is None:
        return False
    process.terminate()  # its handler stops MLflow and PostgreSQL
    try:
        process.wait(timeout=timeout_s)
    except psutil.TimeoutExpired:
        log.warning("The server (pid %d) did not stop within %.0f s: killed with its children", process.pid, timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return True


def main(argv: list[str]) -> int:
    from quantbench.paths import ROOT

    p = argparse.ArgumentParser(
        prog="quantbench server",
        description="An MLflow tracking server on 127.0.0.1 that serves artifacts: jobs log to it with "
        "tracking=server and MLFLOW_TRACKING_URI=http://127.0.0.1:PORT. `quantbench server stop` stops a detached one.",
    )
    p.add_argument("action", nargs="?", choices=["start", "stop"], default="start", help="(default: start)")
    p.add_argument("--port", type=int, default=5000, help="the server's port (default: %(default)s)")
    p.add_argument(
        "--host",
        default=LOOPBACK,
        help="the address to listen on (default: %(default)s, this machine only; the server has no login: see "
        "docs/server-security.md before opening it)",
    )
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
            return serve(mlruns, args.port, args.store, args.pg_port, args.host)
        url = start_detached(mlruns, args.port, args.store, args.pg_port, args.host)
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    log.info("Serving %s (%s store); jobs: MLFLOW_TRACKING_URI=%s ... tracking=server", url, args.store, url)
    return 0
