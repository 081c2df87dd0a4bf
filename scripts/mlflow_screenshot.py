"""docs/mlflow-compare.png: MLflow's compare view of two runs of a project's store.

    python scripts/mlflow_screenshot.py --root PROJECT [RUN_NAME RUN_NAME] [--out docs/mlflow-compare.png]
    python scripts/mlflow_screenshot.py --root PROJECT --study search-cpu --out docs/search-study.png

Runs the README's ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` in PROJECT on 127.0.0.1,
opens the experiment's run list in headless Chromium (Debian package ``chromium``, driven by
Playwright; every request to anything but the loopback server is aborted), ticks the two runs
(by default the two newest finished ones), presses Compare, shows only the differing params and
metrics, draws the parallel coordinates plot of ``train/loss``, ``val/loss`` and ``test/log_loss`` and saves the page.
With ``--study``: the run list with that ``catdog tune`` study's parent run expanded to its trials,
with the columns ``STUDY_COLUMNS``.
tests/test_mlflow_ui.py drives the UI with the same functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
UI_TIMEOUT_MS = 60_000
PLOTTED_METRICS = ("train/loss", "val/loss", "test/log_loss")
STUDY_COLUMNS = ("val/loss", "test/accuracy", "train.arch", "train.mode", "train.image_size", "train.epochs")
HIDDEN_COLUMNS = ("Dataset", "Source", "Models")  # shown by default: they push the study's columns off the page


@contextlib.contextmanager
def serve_ui(root: Path, log: Path, timeout: float = 120) -> Iterator[str]:
    """``mlflow ui`` on ``root``'s ``mlflow.db`` at a free loopback port; yields its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mlflow = Path(sys.executable).with_name("mlflow")
    with log.open("w") as handle:
        server = subprocess.Popen(
            [
                str(mlflow),
                "ui",
                "--backend-store-uri",
                "sqlite:///mlflow.db",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            cwd=root,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for_health(base, server, log, timeout)
        yield base
    finally:
        _stop(server)


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it is still up after 30 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(30)
            return


def _wait_for_health(base: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow ui exited with {server.returncode}:\n{log.read_text()[-2000:]}")
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(f"{base}/health", timeout=5) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"mlflow ui did not answer within {timeout:.0f} s:\n{log.read_text()[-2000:]}")


@contextlib.contextmanager
def browser_page(playwright) -> Iterator:
    """A Chromium page that reaches the loopback interface only; ``page.blocked`` lists the rest."""
    blocked: list[str] = []

    def loopback_only(route):
        if urllib.parse.urlsplit(route.request.url).hostname == "127.0.0.1" or route.request.url.startswith(
            ("data:", "blob:")
        ):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

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
    """The MLflow Assistant side panel covers part of the page."""
    close = page.get_by_role("button", name="Close")
    if close.count() and close.first.is_visible():
        close.first.click()


def run_row(page, run_id: str):
    return page.locator(f'[row-id="{run_id}"]')


def compare_runs(page, base: str, experiment_id: str, run_ids: list[str]) -> list[str]:
    """Tick the runs in the experiment's run list and press Compare; returns the compared run ids
    in the view's column order."""
    page.goto(f"{base}/#/experiments/{experiment_id}/runs")
    for run_id in run_ids:
        run_row(page, run_id).first.wait_for()
    close_assistant(page)
    for run_id in run_ids:
        page.locator(f'.ag-pinned-left-cols-container [row-id="{run_id}"] .ag-selection-checkbox').click()
    page.get_by_role("button", name="Compare", exact=True).click()
    page.wait_for_url("**/compare-runs**")
    page.get_by_text(f"Comparing {len(run_ids)} Runs").wait_for()
    close_assistant(page)
    return json.loads(urllib.parse.unquote(page.url.split("runs=")[1].split("&")[0]))


def section_box(page, section: str):
    """The compare view's Parameters or Metrics section."""
    return page.get_by_role("switch", name=f"{section} - Show diff only").locator(
        "xpath=ancestor::div[contains(@class, 'collapse-item')][1]"
    )


def show_differences_only(page) -> None:
    from playwright.sync_api import expect

    for section in ("Parameters", "Metrics"):
        page.get_by_role("switch", name=f"{section} - Show diff only").click()
    page.set_viewport_size({"width": 1280, "height": 4000})
    # The metrics grid (virtualised) renders its first ~17 rows only: export/, schedule/, system/, test/...
    expect(section_box(page, "Metrics")).to_contain_text("test/log_loss", timeout=UI_TIMEOUT_MS)
    page.wait_for_timeout(500)


def plot_parallel_coordinates(page, metrics: tuple[str, ...] = PLOTTED_METRICS):
    """The compare view's parallel coordinates plot of the differing params against ``metrics``."""
    from playwright.sync_api import expect

    page.set_viewport_size({"width": 1280, "height": 1400})
    page.mouse.wheel(0, -10_000)
    picker = page.locator(".du-bois-light-select-multiple").nth(1)
    picker.click()
    for _ in range(picker.locator(".du-bois-light-select-selection-item").count()):
        page.keyboard.press("Backspace")  # MLflow preselects a differing metric (a system/ one, often)
    for key in metrics:
        page.keyboard.type(key)
        page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    plot = page.locator(".js-plotly-plot").first
    for key in metrics:
        expect(plot).to_contain_text(key, timeout=UI_TIMEOUT_MS)
    page.wait_for_timeout(1000)  # let plotly finish drawing
    return plot


def metric_sections(page, base: str, experiment_id: str, run_id: str) -> dict[str, int]:
    """``{section: number of charts}`` of a run's "Model metrics" tab, which groups charts by the
    key's prefix before "/"."""
    page.goto(f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics")
    page.get_by_role("button", name="Add chart").first.wait_for()
    close_assistant(page)
    page.wait_for_timeout(500)
    text = page.inner_text("main") if page.locator("main").count() else page.inner_text("body")
    return {name: int(count) for name, count in re.findall(r"^(\S+)\n\((\d+)\)\nAdd chart$", text, re.MULTILINE)}


def take(root: Path, out: Path, run_names: list[str] | None = None) -> Path:
    """The compare view of two runs of ``root``'s store, saved as ``out``."""
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    client = MlflowClient(f"sqlite:///{root.resolve() / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    chosen = [next(r for r in runs if r.info.run_name == name) for name in run_names] if run_names else runs[:2]
    if len(chosen) != 2 or chosen[0].info.experiment_id != chosen[1].info.experiment_id:
        raise SystemExit(f"need two finished runs of one experiment in {root}/mlflow.db")
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".mlflow-ui.log")
    with (
        serve_ui(root, log) as base,
        sync_playwright() as playwright,
        browser_page(playwright) as page,
    ):
        compare_runs(page, base, chosen[0].info.experiment_id, [r.info.run_id for r in chosen])
        show_differences_only(page)
        plot_parallel_coordinates(page)
        page.screenshot(path=str(out))
    log.unlink()
    return out


def take_study(root: Path, study: str, out: Path) -> Path:
    """The run list of ``root``'s store with ``study``'s parent run expanded, saved as ``out``."""
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    client = MlflowClient(f"sqlite:///{root.resolve() / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(experiments, f"tags.`catdog.study` = '{study}'")
    if len(parents) != 1:
        raise SystemExit(f"{len(parents)} parent runs of study {study!r} in {root}/mlflow.db")
    parent = parents[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".mlflow-ui.log")
    with serve_ui(root, log) as base, sync_playwright() as playwright, browser_page(playwright) as page:
        page.goto(f"{base}/#/experiments/{parent.info.experiment_id}/runs")
        row = run_row(page, parent.info.run_id).first
        row.wait_for()
        close_assistant(page)
        row.get_by_role("button").first.click()  # the run name cell's expander: its trials nested below
        page.set_viewport_size({"width": 1500, "height": 1100})
        for column in HIDDEN_COLUMNS + STUDY_COLUMNS:
            toggle_column(page, column)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(out))
    log.unlink()
    return out


def toggle_column(page, name: str) -> None:
    """Show or hide the column ``name`` (an attribute, metric or param key) in the run list's Columns menu."""
    page.get_by_role("button", name="Columns", exact=True).click()
    menu = page.get_by_role("dialog")
    menu.get_by_role("textbox", name="Search columns").fill(name)
    menu.get_by_text(name, exact=True).click()
    page.keyboard.press("Escape")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="two run names (default: the two newest finished runs)")
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("."),
        help="the project whose mlflow.db to show",
    )
    parser.add_argument("--study", help="a catdog tune study: its parent run expanded in the run list")
    parser.add_argument("--out", type=Path, default=Path("docs/mlflow-compare.png"))
    args = parser.parse_args()
    if args.study:
        print(take_study(args.root, args.study, args.out))
        return
    if args.runs and len(args.runs) != 2:
        parser.error("give two run names or none")
    print(take(args.root, args.out, args.runs or None))


if __name__ == "__main__":
    main()
