"""The review page and the API docs in a real browser: Debian's chromium driven through
Playwright (never Playwright's own browser download), with every request to another host
refused, on a phone-sized screen. Screenshots go to the test's directory (and to
$MERAUDIOD_SCREENSHOTS when set, which is how docs/ got its picture)."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEST_DATA
from tests.httpd import SPEAKERS_CONFIG, TOKEN, HttpDaemon, daemon_env, wait_task

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="apt-get install chromium")
_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--autoplay-policy=no-user-gesture-required",
]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, speaker_models: Path) -> Iterator[HttpDaemon]:
    """A daemon with a token, admin allowed and speakers on."""
    env = daemon_env(tmp_path_factory.mktemp("httpd-page"), speaker_models)
    server = HttpDaemon(env, config=SPEAKERS_CONFIG).start()
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture
def browser_page(daemon: HttpDaemon) -> Iterator[tuple[Any, list[str]]]:
    """A phone-sized page whose requests to anywhere but the device are refused (and listed)."""
    from playwright.sync_api import sync_playwright

    outside: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=_ARGS)
        context = browser.new_context(viewport={"width": 390, "height": 844})

        def route(route: Any) -> None:
            if route.request.url.startswith(daemon.url) or route.request.url.startswith(
                daemon.url.replace("http", "ws")
            ):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        context.route("**/*", route)
        page = context.new_page()
        page.set_default_timeout(60_000)
        yield page, outside
        browser.close()


def _shot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 5000
    if os.environ.get("MERAUDIOD_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["MERAUDIOD_SCREENSHOTS"]) / path.name)
    return path


def test_review_page_enrol_name_an_unknown_voice_play_it_and_switch_listening_off(
    daemon: HttpDaemon, browser_page: tuple[Any, list[str]], tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    page, outside = browser_page
    with daemon.client() as client:  # someone nobody enrolled speaks
        clip = TEST_DATA / "ls_3080_0000.flac"
        rec = client.post(
            "/api/v1/vad/upload_recording", files={"file": (clip.name, clip.read_bytes())}
        )
        assert wait_task(client, rec.json()["task_id"], "completed")["status"] == "completed"
        unknown = [p["name"] for p in client.get("/api/v1/persistent-speakers").json()]
    assert unknown == ["unknown-1"], unknown

    page.goto(f"{daemon.url}/?token={TOKEN}")  # the token once; a cookie from then on
    assert page.url == f"{daemon.url}/"
    page.wait_for_selector("text=Live: new transcripts appear here.")
    with daemon.client() as client:  # the live feed shows a new transcript as it is stored
        clip = TEST_DATA / "librivox_0880.wav"
        client.post("/api/v1/vad/upload_recording", files={"file": (clip.name, clip.read_bytes())})
    page.wait_for_selector("#feed li", timeout=180_000)
    assert re.fullmatch(r"\d+ jobs?", page.locator("#st-backlog").inner_text())
    _shot(page, tmp_path, "page-live")

    page.click("nav button[data-tab=speakers]")
    page.fill("#enrol-name", "Bob")
    page.set_input_files(
        "#enrol-files", [str(TEST_DATA / "ls_2609_0000.flac"), str(TEST_DATA / "ls_2609_0001.flac")]
    )
    page.click("#enrol-form button")
    page.wait_for_selector("text=Bob enrolled from 2 clips")
    page.wait_for_selector("#people li[data-name=Bob]")

    card = page.locator("#unknown li[data-name=unknown-1]")
    card.locator("button.clip").first.click()
    page.wait_for_function(
        "() => { const p = document.getElementById('player');"
        " return !p.paused && p.currentTime > 0 || p.ended; }"
    )
    assert "/audio#t=" in page.eval_on_selector("#player", "p => p.src")
    _shot(page, tmp_path, "page-speakers")
    card.locator("input.new-name").fill("Carol")
    card.locator("button.primary").click()
    page.wait_for_selector("#people li[data-name=Carol]")
    assert page.locator("#unknown li[data-name=unknown-1]").count() == 0

    page.uncheck("#listening")
    page.wait_for_selector("text=Not listening: the microphone is closed")
    expect(page.locator("#st-mic")).to_have_text("muted")
    _shot(page, tmp_path, "page-muted")

    page.click("nav button[data-tab=recordings]")
    page.fill("#search", "")
    page.wait_for_selector("#recordings li")
    assert page.locator("#recordings li").count() >= 2
    assert not outside, outside  # nothing was loaded from anywhere but the device

    with daemon.client() as client:
        profiles = {p["name"]: p for p in client.get("/api/v1/persistent-speakers").json()}
        assert client.get("/api/v1/status").json()["listening"] is False
        client.post("/api/v1/vad/start")
    assert {"Bob", "Carol"} <= set(profiles)  # (the feed's speaker is a new unknown voice)
    assert not profiles["Carol"]["provisional"] and profiles["Bob"]["embeddings"] == 2


def test_api_docs_render_every_operation_with_the_network_cut(
    daemon: HttpDaemon, browser_page: tuple[Any, list[str]], tmp_path: Path
) -> None:
    page, outside = browser_page
    with daemon.client() as client:
        schema = client.get("/api/openapi.json").json()
    operations = sum(len(item) for item in schema["paths"].values())
    page.context.set_extra_http_headers({"Authorization": f"Bearer {TOKEN}"})
    page.goto(f"{daemon.url}/api/docs")
    page.wait_for_selector(".opblock")
    deadline = time.monotonic() + 30
    while page.locator(".opblock").count() < operations and time.monotonic() < deadline:
        time.sleep(0.2)
    assert page.locator(".opblock").count() == operations
    assert page.get_by_text("/api/v1/analysis/upload", exact=True).count() == 1
    _shot(page, tmp_path, "docs-swagger")
    assert not outside, outside  # Swagger UI asks nothing of another host
    page.goto(f"{daemon.url}/api/redoc")
    page.locator("h2", has_text="Analysis Upload").wait_for()  # ReDoc's operation headings
    assert page.locator("h2", has_text="Task").count() >= 1
    # ReDoc's bundle asked cdn.redoc.ly for its vendor's logo: the device's pages may now
    # load nothing from another host (Content-Security-Policy), so no request leaves.
    assert not outside, outside


def test_the_page_cannot_be_framed_by_another_site(daemon: HttpDaemon) -> None:
    # The page came with nothing to keep it out of another site's frame: without a token any
    # page could show it in an invisible frame over its own buttons and have the user click
    # delete, opt out or the listening switch through it (clickjacking).
    import httpx

    for headers in ({}, daemon.headers):  # the page asking for the token, and the page
        response = httpx.get(f"{daemon.url}/", headers=headers)
        assert response.headers.get("x-frame-options") == "DENY", response.headers
        policy = response.headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in policy
        assert "default-src 'self'" in policy and "unsafe-inline" not in policy, policy


def test_another_site_on_the_same_host_cannot_use_the_pages_cookie(daemon: HttpDaemon) -> None:
    # SameSite=Strict keeps the cookie from other sites, but a page served from another port
    # of the device (or a sibling name) is the same site: with the user logged in to the
    # review page, it read every transcript from /ws/events and switched listening off with
    # one POST. A request the cookie alone authorises must now come from the page itself.
    import http.server
    import threading

    import httpx
    from playwright.sync_api import expect, sync_playwright

    evil = f"""<!doctype html><a href="{daemon.url}/">the review page</a><script>
    window.got = [];
    const ws = new WebSocket("{daemon.url.replace("http", "ws")}/ws/events");
    ws.onopen = () => window.got.push("open");
    ws.onclose = () => window.got.push("closed");
    fetch("{daemon.url}/api/v1/vad/stop", {{method: "POST", mode: "no-cors",
      credentials: "include"}}).then(() => window.got.push("sent"));
    </script>""".encode()

    class Evil(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(evil)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Evil)
    threading.Thread(target=server.serve_forever, name="evil-site", daemon=True).start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=_ARGS)
            context = browser.new_context()
            page = context.new_page()
            page.goto(f"{daemon.url}/?token={TOKEN}")  # logged in: the cookie is set
            expect(page.locator("#live-state")).to_have_text(re.compile("^Live"))
            other = context.new_page()
            other.goto(f"http://127.0.0.1:{server.server_address[1]}/")
            other.wait_for_function("window.got.includes('sent') && window.got.length >= 2")
            got = other.evaluate("window.got")
            other.click("a")  # a link to the page from there opens it
            expect(other.locator("#st-disk")).to_have_text(re.compile("MB$"))
            page.reload()  # the page itself still works with its cookie
            expect(page.locator("#st-disk")).to_have_text(re.compile("MB$"))
            assert page.is_checked("#listening"), got
            browser.close()
    finally:
        server.shutdown()
    assert "open" not in got, got
    status = httpx.get(f"{daemon.url}/api/v1/status", headers=daemon.headers).json()
    assert status["listening"] is True
