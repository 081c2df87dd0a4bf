"""The MLflow UI in a real browser: the README's ``mlflow ui`` command on the project's store, the
experiment's run list, two runs ticked and compared.

The store is the shared experiments project's (tests/dvc_project.py): the runs of two real
``dvc exp run --queue -S train.lr=...`` experiments. Headless Chromium (Debian package
``chromium``) is driven by Playwright; ``playwright install`` is never needed. Every request the
page makes to anything but the loopback server is aborted. The compare view is saved as
docs/mlflow-compare.png, which the README shows.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from pathlib import Path

import pytest

import dvc_project as dp
from dvc_project import QUEUED, REPO

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = REPO / "docs" / "mlflow-compare.png"
SCREENSHOT_MAX_BYTES = 300_000
UI_TIMEOUT_MS = 60_000


def format_metric(value: float) -> str:
    """MLflow UI's ``Utils.formatMetric`` (3.17): how the compare view prints a metric."""
    if value == 0:
        return "0"
    if abs(value) < 1e-3:
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    digits = 3 if abs(value) < 10 else 2 if abs(value) < 100 else 1
    text = repr(math.floor(value * 10 ** digits + 0.5) / 10 ** digits)
    return text[:-2] if text.endswith(".0") else text


def test_format_metric_matches_the_ui():
    assert [format_metric(v) for v in (0.0, 8.106e-6, 1.84e-4, 0.0063, 0.15151, 2.0, 12.984, 65888.43)] == \
           ["0", "8.106e-6", "1.840e-4", "0.006", "0.152", "2", "12.98", "65888.4"]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """The README's command, run in the project root: ``mlflow ui --backend-store-uri sqlite:///mlflow.db``."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install -e '.[test]'")
    exps = dp.experiments(tmp_path_factory)
    port = dp.free_port()
    log = tmp_path_factory.mktemp("mlflow-ui") / "mlflow-ui.log"
    server = dp.start_mlflow("ui", ["--backend-store-uri", "sqlite:///mlflow.db"], port, log,
                             cwd=exps.project.root)
    try:
        yield exps, f"http://127.0.0.1:{port}", log
    finally:
        dp.stop(server)


@pytest.fixture(scope="module")
def page(ui):
    from playwright.sync_api import sync_playwright

    _, base, _ = ui
    blocked: list[str] = []

    def loopback_only(route):
        host = urllib.parse.urlsplit(route.request.url).hostname
        if host == "127.0.0.1" or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            context.route("**/*", loopback_only)
            page = context.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.blocked = blocked
            yield page
        finally:
            browser.close()


def close_assistant(page) -> None:
    close = page.get_by_role("button", name="Close")
    if close.count() and close.first.is_visible():
        close.first.click()


def section_rows(page, section: str) -> dict[str, list[str]]:
    """``{key: [value per run]}`` of the compare view's Parameters or Metrics section."""
    switch = page.get_by_role("switch", name=f"{section} - Show diff only")
    box = switch.locator("xpath=ancestor::div[contains(@class, 'collapse-item')][1]")
    lines = [line.strip() for line in box.inner_text().splitlines() if line.strip()]
    lines = lines[lines.index("Show diff only") + 1:]
    if section == "Parameters":  # a table: key<TAB>value<TAB>value per line
        return {cells[0]: cells[1:] for cells in (line.split("\t") for line in lines)}
    # Metrics: a grid; its text is every key, then the values row by row
    keys = [line for line in lines if not _is_number(line)]
    values = lines[len(keys):]
    width = len(values) // max(len(keys), 1)
    assert width * len(keys) == len(values), lines
    return {key: values[i * width:(i + 1) * width] for i, key in enumerate(keys)}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_runs_list_then_compare_shows_both_runs_and_their_differences(ui, page):
    from playwright.sync_api import expect

    exps, base, log = ui
    runs = {name: exps.run_named(name) for name in QUEUED}
    experiment_id = exps.project.experiment_id()

    # The experiment's run list: both runs are there, by their DVC experiment names.
    page.goto(f"{base}/#/experiments/{experiment_id}/runs")
    for run in runs.values():
        page.locator(f'[row-id="{run.info.run_id}"]').first.wait_for()
    close_assistant(page)
    for name, run in runs.items():
        row = " ".join(page.locator(f'[row-id="{run.info.run_id}"]').all_inner_texts())
        assert name in row, f"run {run.info.run_id} is not shown as {name!r}: {row!r}"

    # Tick the two runs and press Compare.
    for run in runs.values():
        page.locator(f'.ag-pinned-left-cols-container [row-id="{run.info.run_id}"] .ag-selection-checkbox').click()
    page.get_by_role("button", name="Compare", exact=True).click()
    page.wait_for_url("**/compare-runs**")
    page.get_by_text("Comparing 2 Runs").wait_for()
    close_assistant(page)
    compared = json.loads(urllib.parse.unquote(page.url.split("runs=")[1].split("&")[0]))
    assert sorted(compared) == sorted(r.info.run_id for r in runs.values())
    assert page.get_by_text("Parallel Coordinates Plot").is_visible()

    for section in ("Parameters", "Metrics"):
        page.get_by_role("switch", name=f"{section} - Show diff only").click()
    page.set_viewport_size({"width": 1280, "height": 4000})  # the metrics grid renders visible rows only
    metrics_box = page.get_by_role("switch", name="Metrics - Show diff only").locator(
        "xpath=ancestor::div[contains(@class, 'collapse-item')][1]")
    expect(metrics_box).to_contain_text("val_loss", timeout=UI_TIMEOUT_MS)
    page.wait_for_timeout(500)

    body = page.inner_text("body")
    for name in QUEUED:
        assert name in body, f"run name {name} not shown"
    # column order = the order of the runs in the URL
    ordered = [next(r for r in runs.values() if r.info.run_id == run_id) for run_id in compared]

    params = section_rows(page, "Parameters")
    assert list(params) == ["train.lr"], f"the only differing param must be train.lr: {params}"
    assert params["train.lr"] == [r.data.params["train.lr"] for r in ordered]

    metrics = section_rows(page, "Metrics")
    differing = [key for key in ("val_loss", "test_log_loss", "train_loss")
                 if len({format_metric(r.data.metrics[key]) for r in ordered}) == 2]
    assert differing, "the two learning rates gave indistinguishable losses"
    for key in differing:
        assert metrics.get(key) == [format_metric(r.data.metrics[key]) for r in ordered], (key, metrics)

    # Parallel coordinates: train.lr against the losses (typed into the plot's metric picker).
    page.set_viewport_size({"width": 1280, "height": 1400})
    page.mouse.wheel(0, -10_000)
    page.locator(".du-bois-light-select-multiple").nth(1).click()
    for key in ("val_loss", "test_log_loss"):
        page.keyboard.type(key)
        page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    plot = page.locator(".js-plotly-plot").first
    for label in ("train.lr", "val_loss", "test_log_loss"):  # the axes of the drawn plot
        expect(plot).to_contain_text(label, timeout=UI_TIMEOUT_MS)
    page.wait_for_timeout(1000)  # let plotly finish drawing before the screenshot

    # README screenshot: plot, run details, and the differing params and metrics.
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
    size = SCREENSHOT.stat().st_size
    assert 10_000 < size < SCREENSHOT_MAX_BYTES, f"{SCREENSHOT}: {size} bytes"
    assert "Traceback" not in log.read_text(), dp.tail(log.read_text())
