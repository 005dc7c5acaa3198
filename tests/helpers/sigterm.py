"""pytest plugin: SIGTERM (a CI job's time limit, `kill` of a stopped `make test`) ends the session as Ctrl-C does.

pytest's default is to die on SIGTERM without tearing down fixtures, which leaves the MLflow and PostgreSQL servers that
session fixtures start in their own process sessions running; as KeyboardInterrupt, the teardowns run and stop them.
"""

import signal


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def pytest_sessionstart(session):
    signal.signal(signal.SIGTERM, _interrupt)
