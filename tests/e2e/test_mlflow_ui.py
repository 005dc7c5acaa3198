"""The MLflow UI, seen: `quantbench ui` over the default sweep's store, opened in headless Chromium (Debian's package,
installed by `make test`) through Playwright, as a user compares runs and opens the sweep's report.

Screenshots are kept in test-artifacts/ (git-ignored) for a person to look at."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, mlflow_service

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium as root on a machine with no network: no sandbox, and none of its background connections.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
# docs/compare.md, "Compare runs in the MLflow UI": the columns a user ticks under Columns on the experiment's runs page.
COLUMNS = ["tiny_facts_acc", "tiny_arith_acc", "disk_gb", "tokens_per_s_1_stream", "method"]
SHOTS = ROOT / "test-artifacts"


def shown(value: float) -> str:
    """A metric as the UI prints it (JavaScript's shortest round-trip form, which is Python's repr for a float)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@pytest.fixture(scope="module")
def ui(default_sweep, tmp_path_factory):
    """`quantbench ui` over a copy of the default sweep's store (other tests share that store), after `quantbench
    report` has logged the sweep's summary run into it; yields (url, experiment id, runs by name)."""
    assert Path(CHROMIUM).exists(), "Chromium is missing: `make test` installs Debian's chromium package"
    mlruns = tmp_path_factory.mktemp("ui") / "mlruns"
    mlruns.mkdir()
    shutil.copy(default_sweep.uri.removeprefix("sqlite:///"), mlruns / "mlflow.db")
    uri = f"sqlite:///{mlruns}/mlflow.db"
    report = subprocess.run([sys.executable, "-m", "quantbench", "report", "--tracking-uri", uri,
                             "--out", str(mlruns.parent / "report")], capture_output=True, text=True)  # fmt: skip
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("quantbench-tiny")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    with mlflow_service("ui", mlruns) as url:
        yield url, exp.experiment_id, runs


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser.new_page(viewport={"width": 2200, "height": 1000})
        browser.close()


def screenshot(page, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=SHOTS / name, full_page=True)


def row_parts(page) -> dict[str, tuple[str, set[str]]]:
    """Each row of the runs grid: its text and the hrefs of its links (the grid draws a row in parts, pinned name
    and scrolled values, that share its row-index)."""
    rows: dict[str, tuple[str, set[str]]] = {}
    for part in page.locator("[role=row][row-index]").all():
        index = part.get_attribute("row-index")
        text, links = rows.get(index, ("", set()))
        hrefs = {a.get_attribute("href") for a in part.locator("a[href]").all()}
        rows[index] = (text + "\n" + part.inner_text(), links | hrefs)
    return rows


@pytest.mark.e2e
def test_the_runs_page_shows_every_method_with_its_accuracy_disk_and_speed(ui, page):
    url, exp_id, runs = ui
    sweep_runs = {name: r for name, r in runs.items() if "method" in r.data.tags}
    assert len(sweep_runs) == 6
    page.goto(f"{url}/#/experiments/{exp_id}/runs")
    for name in runs:  # the six jobs and the summary run (a job's name is also its model's, in the Models column)
        page.get_by_text(name, exact=True).first.wait_for(timeout=90_000)
    page.get_by_role("button", name="Close", exact=True).click()  # the assistant's side panel, for a wider table
    for column in COLUMNS:  # metrics and tags are not columns until ticked (docs/compare.md)
        page.get_by_role("button", name="Columns", exact=True).click()
        page.get_by_role("dialog").get_by_text(column, exact=True).click()
        page.keyboard.press("Escape")
    headers = {h.inner_text() for h in page.get_by_role("columnheader").all()}
    assert set(COLUMNS) <= headers, headers
    screenshot(page, "mlflow-ui-runs.png")

    rows = [text.split("\n") for text, _ in row_parts(page).values()]
    by_name = {next(n for n in runs if n in lines): lines for lines in rows}
    for name, run in sweep_runs.items():
        cells = by_name[name]
        assert run.data.tags["method"] in cells, (name, cells)
        for metric in COLUMNS[:-1]:
            assert shown(run.data.metrics[metric]) in cells, (name, metric, run.data.metrics[metric], cells)


@pytest.mark.e2e
def test_the_runs_page_models_column_and_the_models_tab_list_each_runs_quantized_model(ui, page):
    """MLflow 3's own model view: each job's quantized model is its run's logged model, so the runs page's Models
    column links every job's row to it (the summary run, which made no model, lists none), and the experiment's
    Models tab lists every one with the run's metrics."""
    from mlflow.tracking import MlflowClient

    from quantbench.tracking import logged_model

    url, exp_id, runs = ui
    client = MlflowClient(url)  # the UI's own server
    models = {name: logged_model.of_run(client, r.info.run_id) for name, r in runs.items()}
    sweep_runs = [name for name, r in runs.items() if "method" in r.data.tags]
    assert all(models[name] is not None for name in sweep_runs) and len(sweep_runs) == 6
    link = {name: f"#/experiments/{exp_id}/models/{models[name].model_id}" for name in sweep_runs}
    page.goto(f"{url}/#/experiments/{exp_id}/runs")
    for name in sweep_runs:
        page.locator(f"a[href='{link[name]}']").wait_for(timeout=90_000)
    headers = {h.inner_text() for h in page.get_by_role("columnheader").all()}
    assert "Models" in headers, headers
    screenshot(page, "mlflow-ui-models-column.png")
    rows = [(text.split("\n"), hrefs) for text, hrefs in row_parts(page).values()]
    by_name = {next(n for n in runs if n in lines): (lines, hrefs) for lines, hrefs in rows}
    for name, model in models.items():
        lines, hrefs = by_name[name]
        model_links = {h for h in hrefs if "/models/" in h}
        if name in link:  # its own model, by name, in its own row
            assert model_links == {link[name]}, (name, lines, hrefs)
            assert page.locator(f"a[href='{link[name]}']").inner_text() == model.name
        else:
            assert model is None and not model_links, (name, hrefs)  # the report's run made no model

    page.goto(f"{url}/#/experiments/{exp_id}/models")
    for name in sweep_runs:
        page.locator(f"a[href='{link[name]}']").wait_for(timeout=90_000)
    screenshot(page, "mlflow-ui-models-tab.png")
    tab = {h: text.split("\n") for text, hrefs in row_parts(page).values() for h in hrefs if "/models/" in h}
    for name in sweep_runs:  # each model's row: its name, and metrics of its run linked to it
        row, metrics = tab[link[name]], runs[name].data.metrics
        assert models[name].name in row, (name, row)
        # the tab shows some metric columns of the many a job logs (its stage times too): one of the run's is there,
        # and the model holds disk_gb, as the server says
        assert any(shown(v) in row for v in metrics.values()), (name, row)
        assert client.get_logged_model(models[name].model_id).metrics, name
        linked = {m.key: m.value for m in client.get_logged_model(models[name].model_id).metrics}
        assert linked["disk_gb"] == metrics["disk_gb"], (name, linked)


@pytest.mark.e2e
def test_the_summary_run_opens_the_sweeps_report(ui, page):
    url, exp_id, runs = ui
    (summary,) = [r for name, r in runs.items() if name.startswith("report-")]
    page.goto(f"{url}/#/experiments/{exp_id}/runs/{summary.info.run_id}/artifacts/report/report.md")
    page.get_by_text(
        f"quantbench report: quantbench-tiny, sweep {summary.info.run_name.removeprefix('report-')}"
    ).wait_for(timeout=90_000)
    page.get_by_text("(a) Memory footprint").wait_for()  # rendered as a document, tables included
    screenshot(page, "mlflow-ui-report.png")
    page.get_by_text("pareto.png", exact=True).click()
    plot = page.locator("img[src^='blob:']").first  # the UI fetches the artifact and shows it from a blob
    plot.wait_for(timeout=30_000)
    assert plot.evaluate("img => img.naturalWidth") > 200  # the plot decoded, not a broken-image icon
    screenshot(page, "mlflow-ui-pareto.png")
