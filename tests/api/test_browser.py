"""The HTML report in headless Chromium (Debian's package): it renders, and it stays on 127.0.0.1.

Served by a real `hourglass serve` (bearer token on, sent by the browser as an extra header) fed by
the OpenTelemetry SDK exporter. Skipped, with the reason, only when /usr/bin/chromium is absent
(`make test` installs it through scripts/ensure-chromium).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

from tests.api.live_server import LiveServer, analysed_server

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "browser-token"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} not installed (scripts/ensure-chromium)"
    ),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with analysed_server(tmp_path_factory.mktemp("browser"), token=TOKEN, checkout=20, home=5) as srv:
        yield srv


@contextlib.contextmanager
def served_report_page(server: LiveServer) -> Iterator[Page]:
    """The served report page in headless Chromium (the bearer token sent as a header), loaded and
    answered 200; once the caller is done, every request the page made must have stayed on 127.0.0.1."""
    from playwright.sync_api import sync_playwright

    requested: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(
                viewport={"width": 1360, "height": 1000},
                extra_http_headers={"Authorization": f"Bearer {TOKEN}"},
            )
            page = context.new_page()
            page.on("request", lambda request: requested.append(request.url))
            response = page.goto(server.base_url + "/", wait_until="networkidle", timeout=60_000)
            assert response is not None and response.status == 200
            yield page
        finally:
            browser.close()
    assert requested, "the browser made no request at all"
    outside = [url for url in requested if urlsplit(url).hostname not in ("127.0.0.1",)]
    assert not outside, f"requests left 127.0.0.1: {outside}"


def keep_screenshots(tmp_path: Path, *names: str) -> None:
    """Copy the named screenshots to $HOURGLASS_SCREENSHOT_DIR when it is set."""
    keep = os.environ.get("HOURGLASS_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for name in names:
            (Path(keep) / name).write_bytes((tmp_path / name).read_bytes())


def test_report_page_renders_waterfalls_offline(server: LiveServer, tmp_path: Path) -> None:
    with served_report_page(server) as page:
        assert "Hourglass report" in page.title()

        waterfalls = page.locator("svg.waterfall")
        assert waterfalls.count() >= 1
        first = waterfalls.first
        first.scroll_into_view_if_needed()
        assert first.is_visible()
        box = first.bounding_box()
        assert box is not None and box["width"] > 300 and box["height"] > 100, box
        bars = first.locator("rect.bar")
        assert bars.count() >= 7 * 2  # every span of the exemplar, before and after
        bar_box = bars.first.bounding_box()
        assert bar_box is not None and bar_box["width"] > 0 and bar_box["height"] > 0
        assert first.locator("rect.bar-path").count() >= 1
        assert first.locator("rect.bar-bottleneck").count() >= 1
        assert "saves" in (first.text_content() or "")

        # The serialized-calls recommendation is on the page, with its exemplar drawn.
        section = page.locator("section.rec", has_text="GET /checkout").first
        assert section.locator("svg.waterfall").count() == 1

        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        first.screenshot(path=str(tmp_path / "waterfall.png"))
        keep_screenshots(tmp_path, "report.png", "waterfall.png")


@pytest.mark.slow
def test_report_file_from_the_cli_renders_offline(tmp_path: Path) -> None:
    """`hourglass report --html` writes a page that renders from disk with no request at all."""
    from playwright.sync_api import sync_playwright

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "report.html"
    exe = root / ".venv" / "bin" / "hourglass"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "hourglass"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "HOURGLASS_"))}
    sample = root / "sample-traces" / "n_plus_one.otlp.jsonl"
    done = subprocess.run(
        [*cmd, "report", "--html", str(out), str(sample)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr

    requested: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            page.on("request", lambda request: requested.append(request.url))
            page.goto(out.as_uri(), wait_until="load", timeout=60_000)
            waterfall = page.locator("svg.waterfall").first
            waterfall.scroll_into_view_if_needed()
            box = waterfall.bounding_box()
            assert box is not None and box["width"] > 300 and box["height"] > 60
            assert waterfall.locator("rect.bar-bottleneck").count() >= 2
            page.screenshot(path=str(tmp_path / "file-report.png"), full_page=True)
        finally:
            browser.close()
    assert requested == [out.as_uri()], requested


def test_report_page_draws_sequence_diagrams_and_the_design_offline(
    server: LiveServer, tmp_path: Path
) -> None:
    """Issue 13: before/after sequence diagrams drawn by Hourglass as inline SVG, with the exemplar's
    services as participants, next to the design sections and the workstream plan; nothing loads
    from anywhere but the page itself."""
    with served_report_page(server) as page:
        section = page.locator("section.rec", has_text="GET /checkout").first
        diagrams = section.locator("svg.sequence")
        assert diagrams.count() == 2, "before and after"
        before, after = diagrams.nth(0), diagrams.nth(1)
        for diagram in (before, after):
            diagram.scroll_into_view_if_needed()
            assert diagram.is_visible()
            box = diagram.bounding_box()
            assert box is not None and box["width"] > 300 and box["height"] > 150, box
            names = diagram.locator("g.seq-participant text").all_text_contents()
            assert {"frontend", "users", "cart", "prices"} <= set(names), names
            arrows = diagram.locator("g.seq-call")
            assert arrows.count() >= 3
            arrow_box = arrows.first.bounding_box()
            assert arrow_box is not None and arrow_box["width"] > 50
        assert after.locator("g.seq-block-par").count() == 1, "the calls run together after the change"
        assert "(what-if)" in (after.text_content() or "")
        design = section.locator("div.design")
        for heading in ("Why this pattern", "Dependencies and races", "Consistency", "Failure handling"):
            assert design.locator("dt", has_text=heading).first.is_visible()
        code = design.locator("details.pseudocode code")
        assert "asyncio" in (code.text_content() or ""), "the services are Python (OpenTelemetry SDK)"
        plan = page.locator("section.workstreams")
        assert plan.is_visible() and "frontend" in (plan.text_content() or "")
        before.screenshot(path=str(tmp_path / "sequence.png"))
        keep_screenshots(tmp_path, "sequence.png")
