"""The report of a real run in a real browser (headless Chromium through Playwright): `make test-browser`.

Trains a tiny DDPM on digits, evaluates it twice (two sampler settings, so metrics.json holds a
sweep), writes the report and opens it from disk. Checks: no console errors, every image decodes
(naturalWidth > 0), every number in the metrics tables equals metrics.json, and a screenshot is
written (to $GENLAB_SCREENSHOT when set; docs/img/report.png is made that way).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from tiny_configs import TINY_DDPM

from genlab import api, evaluation
from genlab.report import write_report

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def chromium_path() -> str:
    """$GENLAB_CHROMIUM, else Debian's chromium on the PATH (Playwright's own download needs a network)."""
    path = os.environ.get("GENLAB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no Chromium: apt-get install chromium, or set GENLAB_CHROMIUM=/path/to/chrome")
    return path


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("browser") / "ddpm-digits"
    api.train("ddpm", data="digits", run_dir=run_dir, progress=False,
              overrides=[*TINY_DDPM, "train.steps=60", "train.sample_every=15", "train.log_every=3",
                         "train.warmup_steps=10", "train.sample_n=16", "model.sample_steps=10"])
    for steps in (5, 10):
        evaluation.evaluate(run_dir, ref="digits:test", metrics="fid,kid", n=300, sampler="ddim", steps=steps)
    write_report(run_dir)
    return run_dir


def test_the_report_renders_in_chromium(reported_run, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (make test-browser does)")
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: errors.append(f"network request {r.url}") if not r.url.startswith(("file:", "data:")) else None)
        page.goto((reported_run / "report.html").resolve().as_uri())
        page.wait_for_load_state("load")
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.alt, e.complete, e.naturalWidth])")
        cells = page.eval_on_selector_all("td.metric", "els => els.map(e => [e.dataset.metric, e.dataset.value, "
                                                       "e.querySelector('.value').textContent])")
        shot = Path(os.environ.get("GENLAB_SCREENSHOT") or tmp_path / "report.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert errors == []
    assert len(images) >= 1 + 5  # the curves and the grids at steps 15, 30, 45, 60 (and the sweep)
    assert all(complete and width > 0 for _, complete, width in images), images
    entries = json.loads((reported_run / "metrics.json").read_text())["entries"]
    expected = sorted((name, value) for e in entries for name, value in e["metrics"].items())
    assert sorted((name, float(value)) for name, value, _ in cells) == expected
    assert all(float(shown) == pytest.approx(float(value), rel=1e-5) for _, value, shown in cells)
    assert shot.stat().st_size > 0
