"""The Optuna sweeper's pieces without jobs: Hydra's sweep syntax to Optuna distributions, constraints in Optuna's
sign convention, and where the study is stored. The sweeper itself runs end to end in tests/e2e/test_search_study.py."""

from __future__ import annotations

import multiprocessing
import sys

import pytest
from hydra_plugins.quantbench_optuna_sweeper import sweeper
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution


def test_hydra_sweep_syntax_becomes_optuna_distributions():
    space, fixed = sweeper.search_space(
        ["method=rtn", "method.group_size=choice(64,128)", "method.damp=interval(0.01,0.1)",
         "method.n=range(1,5)", "method.lr=tag(log,interval(0.0001,0.1))", "method.keep=choice(none,ends1)"]
    )  # fmt: skip
    assert fixed == {"method": "rtn"}
    assert space["method.group_size"] == CategoricalDistribution([64, 128])
    assert space["method.damp"] == FloatDistribution(0.01, 0.1)
    assert space["method.n"] == IntDistribution(1, 4)  # range() stops before its end, as Hydra's does
    assert space["method.lr"] == FloatDistribution(0.0001, 0.1, log=True)
    assert space["method.keep"] == CategoricalDistribution(["none", "ends1"])


def test_constraints_are_optunas_sign_and_a_missing_metric_violates():
    parsed = sweeper.parse_constraints(["quality_kl_mean <= 0.02", "tiny_facts_acc >= 0.5"])
    assert parsed == [("quality_kl_mean", "<=", 0.02), ("tiny_facts_acc", ">=", 0.5)]
    values = sweeper.constraint_values(parsed, {"quality_kl_mean": 0.03})
    assert values[0] == pytest.approx(0.01) and values[1] == float("inf")
    with pytest.raises(ValueError, match="not 'metric <= bound'"):
        sweeper.parse_constraints(["kl < 1"])


def test_the_study_sits_beside_a_sqlite_store_and_a_server_needs_one_named(tmp_path):
    assert sweeper.default_storage(f"sqlite:///{tmp_path}/m/mlflow.db") == f"sqlite:///{tmp_path}/m/optuna.db"
    assert (tmp_path / "m").is_dir()
    with pytest.raises(ValueError, match="hydra.sweeper.storage is not set"):
        sweeper.default_storage("http://127.0.0.1:5000")


def test_a_machine_without_optuna_is_told_how_to_get_it_before_a_search_starts(monkeypatch):
    """An environment installed otherwise, or from an older CUDA lock that left Optuna out, lacks it."""
    from quantbench.errors import ConfigError
    from quantbench.stores import import_optuna

    assert import_optuna().__version__
    monkeypatch.setitem(sys.modules, "optuna", None)  # what an import of a missing module meets
    with pytest.raises(ConfigError, match="needs Optuna.*make install.*requirements-lock.txt"):
        import_optuna()


def open_after(barrier, url: str, results) -> None:
    barrier.wait()
    try:
        from quantbench.stores import study_storage

        study_storage(url)
        results.put("ok")
    except Exception as exc:  # what the test reports: which process lost the race, and how
        results.put(f"{type(exc).__name__}: {exc}"[:200])


def test_processes_that_open_a_new_study_database_together_all_get_it(tmp_path):
    """Opening Optuna's storage creates its schema (tables, a version row, alembic's revision row) even to read, so
    processes that open a new database at once race: without the retry, one in about three loses with "table studies
    already exists" or a UNIQUE alembic_version row. Four processes at once, on three new databases."""
    ctx = multiprocessing.get_context("fork")
    for i in range(3):
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [
            ctx.Process(target=open_after, args=(barrier, f"sqlite:///{tmp_path}/{i}.db", results)) for _ in range(4)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [results.get(timeout=5) for _ in procs] == ["ok"] * 4


def test_a_storage_that_is_wrong_fails_at_once_without_retrying(tmp_path):
    """Only the schema race is retried: a wrong URL or a folder that does not exist raises on the first attempt."""
    import time

    from sqlalchemy.exc import SQLAlchemyError

    from quantbench.stores import study_storage

    for url in ("optuna.db", f"sqlite:///{tmp_path}/missing/optuna.db"):
        started = time.monotonic()
        with pytest.raises(SQLAlchemyError):
            study_storage(url)
        assert time.monotonic() - started < 1.0, url
