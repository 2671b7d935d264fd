"""The comparison report, opened in a real headless Chromium (Debian's `chromium`).

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages
separated by NUL on fds 3/4), so one browser run gives us the console errors, every request the
page made, the rendered text and a screenshot. A negative control shows the harness does catch
console errors, uncaught exceptions, failed loads and network requests. In CI (`CI=true`, as
`.ci/run` sets) a missing chromium fails the test; elsewhere it skips.
"""

from __future__ import annotations

import base64
import copy
import fcntl
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tunesmith.eval.recommend import recommend_split
from tunesmith.eval.report import write_report

EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "compare_results_example.json"
WIDTH, HEIGHT = 1280, 2400


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(
            "chromium is not installed, and CI must run the report's browser test "
            "(scripts/setup.sh --test installs it as root: apt-get install chromium)"
        )
    pytest.skip("chromium not installed (apt-get install chromium); CI=true makes this a failure")


class _Browser:
    """A headless Chromium spoken to over --remote-debugging-pipe."""

    def __init__(self, exe: str, profile: Path):
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()
        # Copies at fds >= 10, so placing them on 3 and 4 in the child cannot clobber each other.
        child_r, child_w = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)

        def place_fds():
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        self.proc = subprocess.Popen(
            [
                exe,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                "--no-first-run",
                f"--window-size={WIDTH},{HEIGHT}",
                "about:blank",
            ],
            # pass_fds would need 3 and 4 open here; instead dup2 makes them inheritable in the child,
            # and close_fds=False leaks nothing else since Python's own fds are non-inheritable.
            close_fds=False,
            preexec_fn=place_fds,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in (to_r, from_w, child_r, child_w):
            os.close(fd)
        self._inbox: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        self._id = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        buf = b""
        while chunk := os.read(self._from_r, 1 << 16):
            buf += chunk
            *msgs, buf = buf.split(b"\0")
            for m in msgs:
                self._inbox.put(json.loads(m))
        self._inbox.put(None)

    def call(self, method: str, session: str | None = None, timeout: float = 30.0, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._next(deadline, method)
            if m.get("id") == self._id:
                if "error" in m:
                    raise AssertionError(f"{method}: {m['error']}")
                return m["result"]
            if "method" in m:
                self.events.append(m)

    def _next(self, deadline: float, what: str) -> dict:
        try:
            m = self._inbox.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            raise AssertionError(f"chromium did not answer {what} in time") from None
        if m is None:
            raise AssertionError(f"chromium exited (code {self.proc.poll()}) while waiting for {what}")
        return m

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except AssertionError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        try:  # helpers (renderer, zygote) left in the session chromium started; they hold the pipe
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(self._to_w)
        self._reader.join(timeout=10)  # it ends at EOF, once chromium has exited
        os.close(self._from_r)


def render(html: Path, png: Path, tmp: Path) -> dict:
    """Open `html` in headless Chromium; save a WIDTHxHEIGHT screenshot to `png`.

    Returns the page's visible text, its images' decode state, every requested URL and every
    error the page produced (console.error/assert, uncaught exceptions, log errors such as failed
    loads or CSP refusals, failed requests)."""
    browser = _Browser(_chromium(), tmp / "chromium-profile")
    try:
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.call(f"{domain}.enable", session)
        browser.call(
            "Emulation.setDeviceMetricsOverride", session, width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False
        )

        def js(expr):
            return browser.call("Runtime.evaluate", session, expression=expr, returnByValue=True)["result"].get("value")

        url = html.resolve().as_uri()
        browser.call("Page.navigate", session, url=url)
        # Poll rather than wait for Page.loadEventFired, which may arrive before navigate's reply.
        deadline = time.monotonic() + 30
        while js("location.href + ' ' + document.readyState") != f"{url} complete":
            assert time.monotonic() < deadline, "the report did not finish loading in 30 s"
            time.sleep(0.05)

        text = js("document.body.innerText")
        images = js("[...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        shot = browser.call("Page.captureScreenshot", session, format="png")["data"]
        png.write_bytes(base64.b64decode(shot))
    finally:
        browser.close()
    errors, urls = [], []
    for ev in browser.events:
        p = ev.get("params", {})
        if ev["method"] == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif ev["method"] == "Runtime.exceptionThrown":
            errors.append(
                "exception: "
                + p["exceptionDetails"].get("exception", {}).get("description", p["exceptionDetails"]["text"])
            )
        elif ev["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
            errors.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
        elif ev["method"] == "Network.loadingFailed":
            errors.append(f"load failed: {p['errorText']}")
        elif ev["method"] == "Network.requestWillBeSent":
            urls.append(p["request"]["url"])
    return {"text": text, "images": images, "errors": errors, "urls": urls}


def _screenshot_is_a_page(png: Path):
    img = Image.open(png)
    assert img.size == (WIDTH, HEIGHT)
    grey = np.asarray(img.convert("L"), dtype=np.float32)
    # A blank or failed render is one flat colour; the report has text, tables and coloured charts.
    assert grey.std() > 15, f"screenshot looks blank (std {grey.std():.1f})"
    assert (grey < 128).mean() > 0.01, "screenshot has almost no dark pixels (no text?)"
    rgb = np.asarray(img.convert("RGB")).astype(np.int32)
    assert len(np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])) > 50  # the charts' colours


def test_report_renders_in_chromium(tmp_path):
    results = json.loads(EXAMPLE.read_text())
    hostile = '<script>console.error("xss")</script><img src=x onerror="console.error(1)">'
    results["samples"].append(
        {
            "arm": "base",
            "split": "seen",
            "question": hostile,
            "answer": "a & b",
            "prediction": "</td></table><h1>broken</h1>",
            "correct": False,
        }
    )
    # the recommendation section, from the real code on per-question scores, with hostile text in a sentence
    recs = {
        s["name"]: recommend_split(s["name"], {"base": [0.0, 1.0] * 6, "finetuned": [1.0] * 12}, None, {}, 200, 0)
        for s in results["splits"]
    }
    recs["seen"]["sentence"] += " " + hostile
    results["recommendations"] = {"method": "paired bootstrap", "min_questions": 10, "splits": recs}
    html = write_report(results, tmp_path / "report")
    png = tmp_path / "report.png"
    page = render(html, png, tmp_path)

    assert page["errors"] == []
    # No network: the only things the page loaded are itself and its embedded data: images.
    assert [u for u in page["urls"] if not u.startswith(("file:", "data:"))] == []
    assert page["urls"] and page["urls"][0] == html.resolve().as_uri()
    # One chart per split plus the cost chart, every one decoded by the browser.
    assert len(page["images"]) == len(results["splits"]) + 1
    assert all(ok and w > 200 and h > 200 for ok, w, h in page["images"]), page["images"]
    for arm in results["arms"]:
        assert arm["label"] in page["text"], arm["label"]
    for split in results["splits"]:
        assert split["label"] in page["text"]
    for row in ("Aim", "Knowledge", "Up-to-date", "Use cases", "Transparency", "Domain specificity", "Resource use"):
        assert row in page["text"]
    assert hostile in page["text"]  # shown as text, not run or parsed
    assert "Recommendation" in page["text"]
    for rec in recs.values():
        assert rec["sentence"] in page["text"]
    assert "</td></table><h1>broken</h1>" in page["text"]
    _screenshot_is_a_page(png)


def test_harness_catches_errors_and_requests(tmp_path):
    # Negative control: a page that errs in every way the test above must notice.
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!doctype html><html><body><h1>bad</h1><img src="missing.png">'
        '<img src="http://127.0.0.1:9/x.png"><script>console.error("boom");'
        'throw new Error("thrown");</script></body></html>'
    )
    page = render(bad, tmp_path / "bad.png", tmp_path)
    joined = "\n".join(page["errors"])
    assert "boom" in joined and "thrown" in joined
    assert "missing.png" in joined or "ERR_FILE_NOT_FOUND" in joined
    assert "http://127.0.0.1:9/x.png" in page["urls"]


def test_subset_of_arms_renders(tmp_path):
    results = json.loads(EXAMPLE.read_text())
    keep = {"base", "finetuned"}
    sub = copy.deepcopy(results)
    sub["arms"] = [a for a in sub["arms"] if a["name"] in keep]
    sub["scores"] = [s for s in sub["scores"] if s["arm"] in keep]
    sub["cost"] = {k: v for k, v in sub["cost"].items() if k in keep}
    sub["retrieval"], sub["samples"], sub["forgetting"] = [], [], None
    page = render(write_report(sub, tmp_path / "r"), tmp_path / "sub.png", tmp_path)
    assert page["errors"] == []
    assert "Fine-tuned (LoRA)" in page["text"] and "Fine-tuned + RAG" not in page["text"]
