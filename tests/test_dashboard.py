"""GET /admin/: the operators' page, rendered and clicked in a real headless Chromium against a live server.

Chromium is Debian's `chromium` package (CI installs it); without it the browser tests are skipped.
Clicks go over the DevTools protocol on a pipe (--remote-debugging-pipe: fd 3 in, fd 4 out), so no
driver package is needed.
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from html.parser import HTMLParser

import pytest
import requests

from tests.conftest import wait_for

TOKEN = "dash-token-5150"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--mute-audio", "--hide-scrollbars", "--window-size=1280,1100"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                    "(apt-get install -y chromium); the dashboard browser tests need it")


# ------------------------------------------------------------------ the page itself (no browser)

def test_page_and_assets_are_public_and_hold_no_data(make_settings):
    from app import create_app
    app = create_app(make_settings(ADMIN_TOKEN=TOKEN), background=False)
    client = app.test_client()
    page = client.get("/admin/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Frame-Options"] == "DENY"
    html = page.get_data(as_text=True)
    assert "<canvas" in html and 'src="assets/dashboard.js"' in html
    assert not any(key in html for key in app.extensions["model_server"].settings.models)  # no data in it
    assert "http://" not in html and "https://" not in html                                 # no CDN
    script = client.get("/admin/assets/dashboard.js")
    assert script.status_code == 200 and script.mimetype == "text/javascript"
    assert client.get("/admin/assets/dashboard.css").mimetype == "text/css"
    assert client.get("/admin/assets/index.html").status_code == 404
    assert client.get("/admin/assets/secrets.txt").status_code == 404
    assert client.get("/admin/assets/..%2Fadmin.py").status_code in (401, 404)               # no route: guarded
    bare = client.get("/admin")
    assert bare.status_code == 302 and bare.headers["Location"].endswith("/admin/")
    assert client.get("/admin/model_status").status_code == 401                            # the data is not public
    for path in ("model_status", "memory_status", "temp_status", "emergency_cleanup", "cleanup_temp"):
        assert f'"{path}' in script.get_data(as_text=True) or f"`{path}" in script.get_data(as_text=True)


# ------------------------------------------------------------------ browser helpers

class DomRows(HTMLParser):
    """Collects the models table of a dumped DOM: {key: {"state", "bytes", "text": {class: text}}}."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict] = {}
        self.facts: dict[str, str] = {}
        self._row = self._cell = self._fact = None
        self.auth_hidden = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section" and attrs.get("id") == "auth":
            self.auth_hidden = "hidden" in attrs
        if tag == "tr" and "data-model" in attrs:
            self._row = self.rows.setdefault(attrs["data-model"], {"state": attrs.get("data-state"), "text": {}})
        elif tag == "td" and self._row is not None:
            self._cell = (attrs.get("class") or "").split()[-1]
            self._row["text"][self._cell] = ""
            if "data-bytes" in attrs and self._cell == "bytes":
                self._row["bytes"] = int(attrs["data-bytes"])
        elif tag == "div" and "data-fact" in attrs:
            self._fact = attrs["data-fact"]
            self.facts[self._fact] = ""

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        elif tag == "td":
            self._cell = None
        elif tag == "div":
            self._fact = None

    def handle_data(self, data):
        if self._row is not None and self._cell:
            self._row["text"][self._cell] += data
        if self._fact:
            self.facts[self._fact] += data


def run_chromium(tmp_path, url: str, *mode: str, budget_ms: int = 6000) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{time.monotonic_ns()}"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                           *mode, url], capture_output=True, timeout=90, cwd=tmp_path)


def dump_dom(tmp_path, url: str) -> DomRows:
    result = run_chromium(tmp_path, url, "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    parsed = DomRows()
    parsed.feed(result.stdout.decode())
    parsed.html = result.stdout.decode()
    return parsed


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (no driver package needed)."""

    def __init__(self, profile) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # the child's ends move above 100 first, so putting them on fds 3 and 4 cannot clobber either
        high_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 100)
        high_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 100)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def child_fds():
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)
        self.process = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
                                         "about:blank"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, pass_fds=(3, 4), preexec_fn=child_fds)
        os.close(high_r)
        os.close(high_w)
        self._buffer, self._next_id = b"", 0
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)

    def call(self, method: str, session: bool = False, timeout: float = 30, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:  # events and other answers are skipped
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._from_chrome], [], [], remaining)[0]:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def open(self, url: str) -> None:
        self.call("Page.navigate", session=True, url=url)

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.js(expression)
            except RuntimeError:  # the page is navigating, or the element is not there yet
                value = None
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression!r}; page text: "
                             f"{self.js('document.body && document.body.innerText')!r:.2000}")

    def click(self, selector: str) -> None:
        assert self.js(f"(() => {{ const b = document.querySelector({json.dumps(selector)}); "
                       f"if (!b || b.disabled) return false; b.click(); return true; }})()"), selector

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def row_state(key: str) -> str:
    return f"document.querySelector('tr[data-model=\"{key}\"]')?.dataset.state"


# ------------------------------------------------------------------ in Chromium, against the live server

@pytest.fixture(scope="module")
def live(start_server):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); the dashboard browser tests need it")
    return start_server(ADMIN_TOKEN=TOKEN, MODEL_IDLE_TIMEOUT=600)


def status(live, key=None):
    body = requests.get(live.url + "/admin/model_status", headers=AUTH, timeout=30).json()
    return body["models"][key] if key else body


@needs_chromium
def test_rendered_page_lists_the_loaded_models_with_state_and_bytes(live, tmp_path):
    for key in ("deepseek", "qwen_vl"):
        assert requests.post(f"{live.url}/admin/models/{key}/load", headers=AUTH, timeout=60).status_code == 200
    expected = status(live)

    locked = dump_dom(tmp_path, live.url + "/admin/")                  # no token yet: it asks for one
    assert locked.auth_hidden is False and locked.rows == {}
    assert "needs the admin token" in locked.html

    dom = dump_dom(tmp_path, f"{live.url}/admin/?interval=1#token={TOKEN}")
    assert dom.auth_hidden is True
    assert list(dom.rows) == expected["available_models"]
    for key in ("deepseek", "qwen_vl"):
        row, truth = dom.rows[key], expected["models"][key]
        assert row["state"] == "loaded" and row["text"]["state"] == "loaded"
        assert row["bytes"] == truth["bytes_in_memory"] > 100_000                         # exact, in data-bytes
        assert row["text"]["bytes"].endswith("KiB") or row["text"]["bytes"].endswith("MiB")
        assert row["text"]["device"] == truth["device"] and row["text"]["load-count"] == str(truth["load_count"])
        engine = truth["engine"]
        assert row["text"]["engine"] == f"{engine['kind']} · queue 0 · batch 0"
    assert dom.rows["deepseek"]["text"]["engine"].startswith("continuous")
    assert dom.rows["qwen_vl"]["text"]["engine"].startswith("dynamic")
    idle = dom.rows["qwen_audio"]
    assert idle["state"] == "downloaded" and idle["bytes"] == 0 and idle["text"]["bytes"] == "–"
    assert idle["text"]["engine"] == "–"
    assert dom.facts["process_rss"].startswith("Server RSS") and dom.facts["process_rss"].endswith("iB")
    assert dom.facts["pressure"] == "Memory pressurenone"  # no pressure event on this box during the test
    assert dom.facts["files"] == "Files0" and dom.facts["root"] == "Foldertmp"
    assert "2 of at most 2 loaded" in dom.html


@needs_chromium
def test_screenshot(live, tmp_path):
    target = tmp_path / "dashboard.png"
    result = run_chromium(tmp_path, f"{live.url}/admin/?interval=1#token={TOKEN}", f"--screenshot={target}")
    assert result.returncode == 0, result.stderr[-2000:]
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 1100)


@needs_chromium
def test_token_prompt_and_buttons_drive_the_json_routes(live, tmp_path):
    requests.post(live.url + "/admin/models/deepseek/load", headers=AUTH, timeout=60)
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(f"{live.url}/admin/?interval=0.3#token=wrong-token")
        browser.wait_for("document.querySelector('#auth').hidden === false && "
                         "document.querySelector('#auth-message').textContent.includes('rejected')")
        assert browser.js("location.hash") == ""                                          # the fragment is gone
        browser.js(f"document.querySelector('#token').value = {json.dumps(TOKEN)}; "
                   "document.querySelector('#token-form').requestSubmit()")
        assert browser.wait_for(row_state("deepseek")) == "loaded"
        assert browser.js("sessionStorage.getItem('model_server_admin_token')") == TOKEN

        browser.click('button[data-action="unload"][data-model="deepseek"]')
        browser.wait_for(row_state("deepseek") + " === 'downloaded'")
        after = status(live, "deepseek")
        assert after["loaded"] is False and after["last_unload_reason"] == "admin"

        browser.click('button[data-action="load"][data-model="blip_vqa"]')
        browser.wait_for(row_state("blip_vqa") + " === 'loaded'")
        loaded = status(live, "blip_vqa")
        assert loaded["loaded"] is True
        assert browser.js("document.querySelector('tr[data-model=\"blip_vqa\"] td.bytes').dataset.bytes") == \
            str(loaded["bytes_in_memory"])

        browser.click('button[data-action="emergency-cleanup"]')
        browser.wait_for("document.querySelector('#activity').textContent.includes('emergency cleanup unloaded')")
        browser.wait_for(row_state("blip_vqa") + " === 'downloaded'")
        assert status(live)["loaded_models"] == []
        browser.click('button[data-action="cleanup-temp"]')
        browser.wait_for("document.querySelector('#activity').textContent.includes('temp cleanup removed')")

        # the memory chart keeps polling and draws on its canvas (the blue RSS line is on it)
        browser.wait_for("window.dashboard.samples.length >= 3")
        drawn = browser.js("""(() => { const c = document.querySelector('#memory-chart');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i+3] > 0 && d[i] < 120 && d[i+2] > 180) n++;
            return n; })()""")
        assert drawn > 100

        browser.click("#forget-token")
        assert browser.js("sessionStorage.getItem('model_server_admin_token')") is None
        assert browser.js("document.querySelector('#auth').hidden") is False
    finally:
        browser.close()
    log = (live.tmp / "logs" / "server.log").read_text()
    assert TOKEN not in log and "wrong-token" not in log                  # tokens never reach the logs


@needs_chromium
def test_recent_jobs_show_with_their_state_and_the_counts(live, tmp_path):
    submitted = requests.post(live.url + "/jobs/deepseek", json={"prompt": "a job", "max_new_tokens": 3}, timeout=30)
    job_id = submitted.json()["job_id"]
    assert wait_for(lambda: requests.get(f"{live.url}/jobs/{job_id}", timeout=30).json()["status"] == "succeeded")
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(f"{live.url}/admin/?interval=0.3#token={TOKEN}")
        row = f"document.querySelector('#jobs tr[data-job=\"{job_id}\"]')"
        browser.wait_for(f"{row} && {row}.dataset.status === 'succeeded'")
        assert browser.js(f"{row}.cells[1].textContent") == "deepseek"
        counts = requests.get(live.url + "/admin/jobs", headers=AUTH, timeout=30).json()["counts"]
        assert browser.js("document.querySelector('[data-fact=\"jobs-succeeded\"] dd').textContent") == \
            str(counts["succeeded"])
    finally:
        browser.close()
