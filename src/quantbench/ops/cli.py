"""`quantbench <command>`: one command for everything `make` and `python run.py` do.

    quantbench run [-m] [overrides]   quantize, measure, evaluate, benchmark, log (Hydra; the same app as run.py)
    quantbench report [flags]         the seed's tables, quality groups and Pareto plot of a sweep
    quantbench register [overrides]   the policy's winner into the MLflow Model Registry (conf/policy/)
    quantbench recommend [flags]      which method, from measured data
    quantbench search --study NAME    an Optuna search's Pareto front, importances, and what it beat
    quantbench ui [--port N]          the MLflow UI over mlruns/ on 127.0.0.1
    quantbench server [--store S]     an MLflow tracking server on 127.0.0.1, SQLite or PostgreSQL (jobs: tracking=server)

`quantbench <command> --help` shows each command's own options.
"""

from __future__ import annotations

import sys
from pathlib import Path

COMMANDS = {
    "run": "quantize, measure, evaluate, benchmark and log one job or a multirun (Hydra overrides; -m for a sweep)",
    "report": "the seed's tables, the quality groups and the Pareto plot of a sweep, logged as a summary run",
    "register": "register the sweep's best run per the policy group (policy=<name>, key=value overrides)",
    "recommend": "which method fits your constraints, from measured data",
    "search": "an Optuna search's Pareto front, parameter importances and the grid runs it beats (--study NAME)",
    "ui": "the MLflow UI over the local store (mlruns/) on http://127.0.0.1:5000",
    "server": "an MLflow tracking server on 127.0.0.1 serving artifacts, on SQLite or PostgreSQL (jobs: tracking=server)",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: quantbench <command> [args]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "`quantbench <command> --help` shows a command's options."]
    return "\n".join(lines)


def mlflow_ui(argv: list[str]) -> int:
    """`mlflow ui` over a local store, bound to 127.0.0.1 unless --host says otherwise."""
    import argparse
    import logging

    from quantbench import children
    from quantbench.ops import server
    from quantbench.paths import ROOT

    p = argparse.ArgumentParser(prog="quantbench ui", description=COMMANDS["ui"])
    p.add_argument("--port", type=int, default=5000, help="port (default: %(default)s)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s; docs/server-security.md)"
    )
    p.add_argument("--mlruns", default=str(ROOT / "mlruns"), help="the store's folder (default: %(default)s)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[quantbench ui] %(message)s")
    server.check_host(args.host)
    Path(args.mlruns).mkdir(parents=True, exist_ok=True)
    store = [
        "--backend-store-uri",
        f"sqlite:///{args.mlruns}/mlflow.db",
        "--default-artifact-root",
        f"{args.mlruns}/artifacts",
    ]
    ui = children.spawn([sys.executable, "-m", "mlflow", "ui", *store, "--host", args.host, "--port", str(args.port)])
    try:
        return ui.wait()
    finally:  # Ctrl-C, or an error here: the UI's server and workers go with this command
        children.kill_group(ui)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        from quantbench.ops import app

        sys.argv = ["quantbench run", *rest]  # Hydra reads its overrides from sys.argv
        app.main()
        return 0
    if command == "report":
        from quantbench.study import report

        return report.main(rest)
    if command == "register":
        from quantbench.study import registry

        return registry.main(rest)
    if command == "recommend":
        from quantbench.study import recommend

        return recommend.main(rest)
    if command == "search":
        from quantbench.study import search

        return search.main(rest)
    if command == "ui":
        return mlflow_ui(rest)
    if command == "server":
        from quantbench.ops import server

        return server.main(rest)
    print(f"quantbench: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
