"""The MLflow UI in a real browser: the README's ``mlflow ui`` command on the project's store, the
experiment's run list, two runs ticked and compared, a run's metric charts grouped by section.

The store is the shared experiments project's (tests/dvc_project.py): the runs of two real
``dvc exp run --queue -S train.lr=...`` experiments. The UI is driven by the functions of
scripts/mlflow_screenshot.py (which writes docs/mlflow-compare.png; this test writes its
screenshot to tmp_path only): headless Chromium (Debian package ``chromium``) under Playwright,
every request to anything but the loopback server aborted.
"""

from __future__ import annotations

import math
import sys

import pytest

import dvc_project as dp
from dvc_project import QUEUED, REPO

sys.path.insert(0, str(REPO / "scripts"))
import mlflow_screenshot as ui_driver

pytestmark = pytest.mark.slow

SCREENSHOT_MAX_BYTES = 300_000


def format_metric(value: float) -> str:
    """MLflow UI's ``Utils.formatMetric`` (3.17): how the compare view prints a metric."""
    if value == 0:
        return "0"
    if abs(value) < 1e-3:
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    digits = 3 if abs(value) < 10 else 2 if abs(value) < 100 else 1
    text = repr(math.floor(value * 10**digits + 0.5) / 10**digits)
    return text.removesuffix(".0")


def test_format_metric_matches_the_ui():
    assert [format_metric(v) for v in (0.0, 8.106e-6, 1.84e-4, 0.0063, 0.15151, 2.0, 12.984, 65888.43)] == [
        "0",
        "8.106e-6",
        "1.840e-4",
        "0.006",
        "0.152",
        "2",
        "12.98",
        "65888.4",
    ]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """The README's command, run in the project root: ``mlflow ui --backend-store-uri sqlite:///mlflow.db``."""
    if not ui_driver.CHROMIUM.exists():
        pytest.skip(f"{ui_driver.CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install -e '.[test]'")
    exps = dp.experiments(tmp_path_factory)
    log = tmp_path_factory.mktemp("mlflow-ui") / "mlflow-ui.log"
    with ui_driver.serve_ui(exps.project.root, log) as base:
        yield exps, base, log


@pytest.fixture(scope="module")
def page(ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright, ui_driver.browser_page(playwright) as page:
        yield page


def section_rows(page, section: str) -> dict[str, list[str]]:
    """``{key: [value per run]}`` of the compare view's Parameters or Metrics section."""
    box = ui_driver.section_box(page, section)
    lines = [line.strip() for line in box.inner_text().splitlines() if line.strip()]
    lines = lines[lines.index("Show diff only") + 1 :]
    if section == "Parameters":  # a table: key<TAB>value<TAB>value per line
        return {cells[0]: cells[1:] for cells in (line.split("\t") for line in lines)}
    # Metrics: a grid; its text is every key, then the values row by row
    keys = [line for line in lines if not _is_number(line)]
    values = lines[len(keys) :]
    width = len(values) // max(len(keys), 1)
    assert width * len(keys) == len(values), lines
    return {key: values[i * width : (i + 1) * width] for i, key in enumerate(keys)}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_runs_list_then_compare_shows_both_runs_and_their_differences(ui, page, tmp_path):
    exps, base, log = ui
    runs = {name: exps.run_named(name) for name in QUEUED}
    experiment_id = exps.project.experiment_id()

    # The experiment's run list shows both runs, by their DVC experiment names; tick them, Compare.
    page.goto(f"{base}/#/experiments/{experiment_id}/runs")
    for name, run in runs.items():
        ui_driver.run_row(page, run.info.run_id).first.wait_for()
        row = " ".join(ui_driver.run_row(page, run.info.run_id).all_inner_texts())
        assert name in row, f"run {run.info.run_id} is not shown as {name!r}: {row!r}"
    compared = ui_driver.compare_runs(page, base, experiment_id, [r.info.run_id for r in runs.values()])
    assert sorted(compared) == sorted(r.info.run_id for r in runs.values())
    assert page.get_by_text("Parallel Coordinates Plot").is_visible()

    ui_driver.show_differences_only(page)
    body = page.inner_text("body")
    for name in QUEUED:
        assert name in body, f"run name {name} not shown"
    # column order = the order of the runs in the URL
    ordered = [next(r for r in runs.values() if r.info.run_id == run_id) for run_id in compared]

    params = section_rows(page, "Parameters")
    assert list(params) == ["train.lr"], f"the only differing param must be train.lr: {params}"
    assert params["train.lr"] == [r.data.params["train.lr"] for r in ordered]

    metrics = section_rows(page, "Metrics")
    differing = [
        key
        for key in ("val/loss", "test/log_loss", "train/loss")
        if len({format_metric(r.data.metrics[key]) for r in ordered}) == 2
    ]
    assert differing, "the two learning rates gave indistinguishable losses"
    shown = [key for key in differing if key in metrics]  # the grid renders its first rows only
    assert shown, (differing, metrics)
    for key in shown:
        assert metrics[key] == [format_metric(r.data.metrics[key]) for r in ordered], (key, metrics)

    # Parallel coordinates: train.lr against the losses (typed into the plot's metric picker).
    plot = ui_driver.plot_parallel_coordinates(page)
    drawn = plot.text_content()
    assert "train.lr" in drawn and all(key in drawn for key in ui_driver.PLOTTED_METRICS), drawn
    assert "system/" not in drawn, f"a metric MLflow preselected stayed in the plot: {drawn}"

    # What scripts/mlflow_screenshot.py saves as docs/mlflow-compare.png: plot, run details, differences.
    screenshot = tmp_path / "mlflow-compare.png"
    page.screenshot(path=str(screenshot))
    size = screenshot.stat().st_size
    assert 10_000 < size < SCREENSHOT_MAX_BYTES, f"{screenshot}: {size} bytes"
    assert "Traceback" not in log.read_text(), dp.tail(log.read_text())


def test_run_page_groups_metric_charts_by_section(ui, page):
    """MLflow charts a run's metrics in one group per key prefix: train, val, test, export, schedule."""
    exps, base, _ = ui
    run = exps.run_named(next(iter(QUEUED)))
    sections = ui_driver.metric_sections(page, base, exps.project.experiment_id(), run.info.run_id)
    logged = {}
    for key in run.data.metrics:
        if not key.startswith("system/"):  # MLflow shows those on the "System metrics" tab
            logged[key.split("/")[0]] = logged.get(key.split("/")[0], 0) + 1
    assert {"train", "val", "test", "export", "schedule"} <= set(sections), sections
    assert sections == logged, f"charts per section on the run page: {sections}, logged: {logged}"
