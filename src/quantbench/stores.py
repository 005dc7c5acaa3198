"""Where a job logs: whether a tracking URI answers, checked in seconds before any work, and the URI MLflow is given.

Light on purpose (no MLflow, no torch): `app.main` checks the store before the job imports them, so that an
unreachable store fails a job in seconds where the imports alone take longer on a busy machine.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from quantbench import redact

REACH_TIMEOUT_S = 5.0  # per attempt (connect, then read): an unreachable store fails the job within ~10 s
DATABASE_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433}


def unreachable(uri: str, timeout_s: float = REACH_TIMEOUT_S) -> str | None:
    """Why the tracking store at `uri` does not answer, or None if it does. An HTTP(S) store answers once anything
    does (a login page, a 404, a TLS handshake MLflow may be told to accept); a database once its host and port accept
    a connection. Local stores (sqlite, file) are not checked."""
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0].lower()
    try:
        if scheme in ("http", "https"):
            import requests

            try:
                requests.get(uri, timeout=timeout_s, stream=True, allow_redirects=False).close()
            except requests.exceptions.SSLError:
                pass  # it answered; whether its certificate is trusted is MLflow's to say (MLFLOW_TRACKING_INSECURE_TLS)
            except requests.RequestException as exc:
                return redact.text(_short_reason(str(exc)))[:300]
        elif scheme in DATABASE_PORTS and parts.hostname:
            socket.create_connection((parts.hostname, parts.port or DATABASE_PORTS[scheme]), timeout=timeout_s).close()
    except OSError as exc:
        return redact.text(str(exc))[:300]
    return None


def check_reachable(uri: str) -> None:
    """Refuse, naming the URI, a tracking store that does not answer, within seconds: MLflow's own client retries a
    refused connection for minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES: 7, with exponential backoff) before it fails."""
    from quantbench.errors import ConfigError

    problem = unreachable(uri)
    if problem is not None:
        raise ConfigError(
            f"The tracking store {redact.text(uri)} does not answer ({problem}), checked before any work (no run "
            f"was created). Start it (`quantbench server --detach`, `make server`), fix tracking.uri or "
            f"MLFLOW_TRACKING_URI, or log to the local store with tracking=local."
        )


def _short_reason(message: str) -> str:
    """The "[Errno 111] Connection refused" or "... timed out" part of requests' nested connection error text."""
    found = re.search(r"\[Errno -?\d+\] [^'\")]+|[\w. ]*timed out[^)]*\)?", message)
    return found.group(0).strip() if found else message


def mlflow_uri(uri: str) -> str:
    """The URI MLflow is given: an HTTP(S) URI's `user:password@` moves into MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD (MLflow's own basic-auth settings), so that MLflow never prints it (its "View run at
    <URL>" line goes straight to stdout)."""
    parts = urlsplit(uri)
    if parts.scheme.lower() not in ("http", "https") or "@" not in parts.netloc:
        return uri
    if parts.username:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username)
    if parts.password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def import_optuna():
    """Optuna, or a ConfigError that says how to get it. Both locks pin it; an environment installed otherwise (or
    from an older CUDA lock, which left it out) may lack it."""
    from quantbench.errors import ConfigError

    try:
        import optuna
    except ModuleNotFoundError as exc:
        raise ConfigError(
            "A search (hydra/sweeper=optuna, quantbench search) needs Optuna, which this environment lacks. `make "
            "install` installs it (both locks pin it; older CUDA locks did not); or install optuna and "
            "colorlog at the versions requirements-lock.txt pins (pip install --no-deps optuna==<pin> colorlog==<pin>)."
        ) from exc
    return optuna


def optuna_storage(tracking_uri: str) -> str | None:
    """The Optuna study database of a search that logs to `tracking_uri`: optuna.db beside a SQLite MLflow store (its
    own file: Optuna and MLflow would both keep an alembic_version table in one database); None for any other store,
    where the search must name one (hydra.sweeper.storage, `quantbench search --storage`)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    folder = Path(tracking_uri.removeprefix("sqlite:///")).parent
    return f"sqlite:///{folder / 'optuna.db'}"


def study_storage(url: str, attempts: int = 5, **kwargs):
    """Optuna's RDBStorage at `url`, retried while another process creates its schema. Opening a storage writes (the
    tables, a version row, then alembic's revision row), even to read a study, so two processes that open a new
    database together (two workers, or `quantbench search` beside a starting search) race: the loser meets "table
    already exists", a locked database or a UNIQUE row, and succeeds once the winner has committed. Any other error (a
    wrong URL, a database that does not answer) is raised at once."""
    import time

    optuna = import_optuna()
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as exc:
            if attempt == attempts - 1 or not _schema_race(exc):
                raise
            logging.getLogger(__name__).info(
                "The study's database is being created by another process (%s): retrying", str(exc).splitlines()[0]
            )
            time.sleep(1 + attempt)


def _schema_race(exc: BaseException | None) -> bool:
    """Whether `exc` (or what it wraps: Optuna raises StorageInternalError from SQLAlchemy's) is what a process meets
    while another creates the same schema."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    while exc is not None:
        if isinstance(exc, IntegrityError):
            return True
        if isinstance(exc, OperationalError):
            return any(s in str(exc) for s in ("already exists", "database is locked"))
        exc = exc.__cause__
    return False
