"""The MLflow UI as a user sees it: `mlflow ui` on a finished sweep's store, pages loaded in headless Chromium.

A real reduced smoke sweep (2 trials x 2 steps on the embedded model, the keyword judge, local Ray) writes the
store; the test opens the URL the sweep prints (the experiment's runs table in the sweep's saved view) and the
parent run's artifacts, and checks from the rendered page that the trials, the comparison columns, the datasets
and the plots are there. Screenshots go to the test's folder (and to $CRL_RAY_UI_SCREENSHOTS when set: that is
how docs/mlflow_*.png were made). Skips, saying why, where Chromium is not installed (`apt-get install chromium`).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def _browser(url: str, *, dom: bool = True, screenshot: Path | None = None, ready: str = "",
             budgets: tuple[int, ...] = (20_000, 40_000, 80_000)) -> str:
    """The page's DOM once the MLflow app has rendered it; `ready` is text the rendered page must hold.

    Chromium's virtual time budget bounds how long the page's scripts may run; on a loaded 2-core machine the
    app can need more than the first budget (CI once dumped only the stylesheet), so a page without `ready` is
    loaded again with a longer budget, and the last DOM is returned whatever it holds: the caller's asserts
    still decide.
    """
    html = ""
    for budget in budgets:
        common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1800,1000",
                  f"--virtual-time-budget={budget}"]
        if screenshot is not None:
            subprocess.run([*common, f"--screenshot={screenshot}", url], capture_output=True, timeout=180)
            assert screenshot.is_file() and screenshot.stat().st_size > 10_000
        if not dom:
            return ""
        html = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
        if ready in _text(html) or ready in html:
            return html
    return html


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """The reduced smoke sweep, run locally through the CLI; returns (its folder, the CLI's closing output)."""
    import contextlib
    import io

    from crl_ray.sweep.cli import main
    from tests.test_multinode import reduced_smoke

    folder = tmp_path_factory.mktemp("ui")
    file = reduced_smoke(folder, str(folder / "runs"), None, name="uismoke")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(file)])
    assert code == 0, out.getvalue()[-3000:]
    print("\n" + next(line for line in out.getvalue().splitlines() if line.startswith("sweep uismoke:")))
    return folder / "runs" / "uismoke", out.getvalue()


@pytest.fixture(scope="module")
def mlflow_server(finished_sweep):
    folder, _ = finished_sweep
    port = _free_port()
    exe = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(exe), "ui", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow ui did not start"
                time.sleep(1)
        yield port
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> list[Path]:
    folders = [tmp_path_factory.mktemp("shots")]
    if os.environ.get("CRL_RAY_UI_SCREENSHOTS"):
        folders.append(Path(os.environ["CRL_RAY_UI_SCREENSHOTS"]))
    return folders


def _shoot(url: str, name: str, shots: list[Path], ready: str = "") -> str:
    html = _browser(url, screenshot=shots[0] / name, ready=ready)
    for extra in shots[1:]:
        shutil.copy(shots[0] / name, extra / name)
    return html


def test_the_printed_address_opens_the_trials_with_their_numbers(finished_sweep, mlflow_server, shots) -> None:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    import mlflow

    folder, printed = finished_sweep
    page = re.search(r"http://127\.0\.0\.1:5000(/#/experiments/\d+/runs\?viewStateShareKey=[\w.-]+)", printed)
    assert page, printed[-2000:]  # the sweep prints the address of its saved view
    html = _shoot(f"http://127.0.0.1:{mlflow_server}{page.group(1)}", "mlflow_runs.png", shots,
                 ready="Sort: objective")
    text = _text(html)
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("twonode").experiment_id])
    trials = [r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(trials) == 2
    assert "Training runs" in text and "Traces 0" not in text  # a model-training experiment, on its runs
    assert "shared view" in text and "Sort: objective" in text
    for name in (*trials, "uismoke"):  # the parent run expanded: its trials are rows
        assert name in text
    for column in ("objective", "feasible", "eval/asr/direct", "eval/capability"):  # the first columns
        assert column in text, column
    assert "training" in text  # the Dataset column: the training sets logged as MLflow dataset inputs


def test_the_parent_run_holds_the_results_and_plots(finished_sweep, mlflow_server, shots) -> None:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    import mlflow

    folder, _ = finished_sweep
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("twonode").experiment_id
    parent = next(r for r in client.search_runs([experiment]) if not r.data.tags.get("mlflow.parentRunId"))
    base = f"http://127.0.0.1:{mlflow_server}/#/experiments/{experiment}/runs/{parent.info.run_id}"
    text = _text(_shoot(base, "mlflow_parent_run.png", shots, ready="Parameters"))
    assert "uismoke" in text and "Parameters" in text
    html = _shoot(f"{base}/artifacts/summary/objective.png", "mlflow_parent_plot.png", shots,
                 ready='alt="summary/objective.png"')
    assert 'alt="summary/objective.png"' in html  # the plot is rendered as an image
    trials = [r.info.run_name.removeprefix("trial-") for r in client.search_runs([experiment])
              if r.data.tags.get("mlflow.parentRunId")]
    text = _text(_browser(f"{base}/artifacts/summary/results.csv", ready=trials[0]))
    assert len(trials) == 2 and "objective" in text and all(trial in text for trial in trials)
