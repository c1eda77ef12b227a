"""reports/index.html in a real headless Chromium: it renders, every table and figure is there, and the
console stays clean.

Chromium is Debian's package, installed here when missing (``apt-get install -y chromium``, as root).
Where that cannot be done (no apt-get, not root, no network, no such package) the tests are skipped
with the reason and apt-get's own last words; install Chromium by hand to run them. Three
looks at the page: ``--screenshot`` (kept in the test's tmp_path, path printed), ``--dump-dom`` (the
parsed DOM holds every table, row and image), and the DevTools protocol over
``--remote-debugging-pipe`` (no console error, no exception, no failed load, every image decoded,
nothing fetched). A broken page run through the same checks proves they can fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import DVT_VARIANT, UI, VARIANTS, make_study, parse_page
from PIL import Image

from pipeline.report import FIGURES, build_report

pytestmark = pytest.mark.slow

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TABLES = [
    "comparison",
    "paper_t2t_vs_vit",
    "cnn_to_vit",
    "dvt_budgets",
    "dvt_speed",
    "dvt_reuse",
    "provenance",
]
NO_NETWORK = re.compile(
    r"Temporary failure (in name )?resolv|Could not resolve|Network is unreachable|No route to host|"
    r"Failed to fetch|Could not connect|Connection (timed out|refused|failed)|Unable to connect",
    re.IGNORECASE,
)


def _installed() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


def _why_not(output: str) -> str:
    """apt-get's reason in a few words: the network, permissions, the archive, or its last error line."""
    if found := NO_NETWORK.search(output):
        return f"no network ({found.group(0)})"
    errors = [line.strip() for line in output.splitlines() if line.startswith(("E:", "W:"))]
    return errors[-1] if errors else (output.strip().splitlines() or ["no output"])[-1]


def chromium() -> str:
    """The Chromium binary, installed from the distribution's archive if missing.

    Skips, naming the reason, where it cannot be installed: no apt-get, not root, or apt-get failing
    (no network, no ``chromium`` package in the archive, a held lock).
    """
    found = _installed()
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and there is no apt-get to install it: install Chromium")
    if os.geteuid() != 0:
        pytest.skip(
            "chromium is not installed and apt-get needs root: run `apt-get install chromium` as root"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = []
    wait = ["-o", "DPkg::Lock::Timeout=300"]  # another apt-get at work: wait for it rather than fail
    for cmd in (["apt-get", *wait, "update"], ["apt-get", *wait, "install", "-y", "chromium"]):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        except subprocess.TimeoutExpired:
            pytest.skip(f"cannot install chromium: `{' '.join(cmd)}` took over 15 minutes")
        log.append(f"$ {' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        if proc.returncode != 0:
            break
    found = _installed()
    if found:
        return found
    output = "\n".join(log)
    pytest.skip(f"cannot install chromium with apt-get: {_why_not(output)}")


@pytest.mark.parametrize(
    ("apt_output", "reason"),
    [
        ("Err:1 http://deb.debian.org bookworm InRelease\n  Temporary failure resolving 'deb.debian.org'",
         "no network (Temporary failure resolv)"),
        ("Reading package lists...\nE: Unable to locate package chromium",
         "E: Unable to locate package chromium"),
        ("E: Could not open lock file /var/lib/dpkg/lock-frontend - open (13: Permission denied)\n",
         "E: Could not open lock file /var/lib/dpkg/lock-frontend - open (13: Permission denied)"),
        ("", "no output"),
    ],
)  # fmt: skip
def test_an_impossible_install_is_skipped_with_apt_gets_reason(apt_output: str, reason: str) -> None:
    assert _why_not(apt_output) == reason


def _run(binary: str, tmp: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{time.monotonic_ns()}"
    return subprocess.run(
        [binary, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=timeout
    )


class DevTools:
    """The Chrome DevTools protocol over ``--remote-debugging-pipe`` (fd 3 in, fd 4 out, NUL-framed JSON)."""

    def __init__(self, binary: str, tmp: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        args = [binary, *FLAGS, f"--user-data-dir={tmp / 'cdp-profile'}", "--remote-debugging-pipe"]
        # bash puts the two pipe ends on fds 3 and 4, where Chromium looks for them (dash cannot
        # redirect fds above 9).
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}', *args, "about:blank"],
            pass_fds=(to_chrome_r, from_chrome_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def _message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from chromium")
            if select.select([self._from_chrome], [], [], left)[0]:
                chunk = os.read(self._from_chrome, 1 << 16)
                if not chunk:
                    raise EOFError("chromium closed the DevTools pipe")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(
        self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60
    ) -> Any:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._message(deadline)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self.events.append(answer)

    def wait_for(self, method: str, session: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method and e.get("sessionId") == session for e in self.events):
            self.events.append(self._message(deadline))

    def close(self) -> None:
        with contextlib.suppress(OSError, EOFError, TimeoutError, RuntimeError):
            self.send("Browser.close", timeout=10)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


PAGE_FACTS = """JSON.stringify({
  tables: Array.from(document.querySelectorAll("table")).map(t => t.dataset.table),
  variants: Array.from(document.querySelectorAll('table[data-table="comparison"] tr[data-variant]'))
    .map(r => r.dataset.variant),
  images: Array.from(document.images)
    .map(i => ({ok: i.complete && i.naturalWidth > 0, src: i.src.slice(0, 30)})),
  height: document.documentElement.scrollHeight,
})"""


def _error(event: dict[str, Any]) -> str | None:
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.exceptionThrown":
        details = params["exceptionDetails"]
        return f"exception: {details.get('text')} {details.get('exception', {}).get('description', '')}"
    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        return "console.error: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
    if method == "Log.entryAdded" and params["entry"]["level"] == "error":
        return (
            f"log ({params['entry']['source']}): {params['entry']['text']} {params['entry'].get('url', '')}"
        )
    return None


def inspect(binary: str, tmp: Path, url: str) -> tuple[dict[str, Any], list[str]]:
    """Load ``url`` in a fresh tab; return the page's facts and every console/log error it raised."""
    tools = DevTools(binary, tmp)
    try:
        target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            tools.send(f"{domain}.enable", session=session)
        tools.send("Page.navigate", {"url": url}, session=session)
        tools.wait_for("Page.loadEventFired", session)
        time.sleep(0.5)  # let late log entries (failed loads) arrive
        facts = tools.send(
            "Runtime.evaluate", {"expression": PAGE_FACTS, "returnByValue": True}, session=session
        )
        events = [ev for ev in tools.events if ev.get("sessionId") == session]
        errors = [e for e in map(_error, events) if e]
        facts = json.loads(facts["result"]["value"])
        # Everything the page loaded besides itself and data: URIs (a self-contained page loads nothing).
        facts["fetched"] = [
            ev["params"]["request"]["url"]
            for ev in events
            if ev.get("method") == "Network.requestWillBeSent"
            and ev["params"]["request"]["url"] != url
            and not ev["params"]["request"]["url"].startswith("data:")
        ]
        return facts, errors
    finally:
        tools.close()


@pytest.fixture(scope="module")
def browser() -> str:
    return chromium()


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("html")
    study = make_study(base / "study")
    out = base / "reports"
    build_report(study.results, [v[0] for v in VARIANTS], study.uri, out, cascades=[DVT_VARIANT], ui_url=UI)
    return out / "index.html"


def test_the_report_renders_in_chromium(browser: str, page: Path, tmp_path: Path) -> None:
    shot = tmp_path / "index.png"
    proc = _run(
        browser,
        tmp_path,
        "--enable-logging=stderr",
        "--v=0",
        f"--screenshot={shot}",
        "--window-size=1280,2400",
        page.as_uri(),
    )
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-3000:]
    print(f"\nscreenshot of reports/index.html: {shot}")
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        grey = image.convert("L").resize((128, 240))
        ink = sum(1 for v in grey.getdata() if v < 200) / (128 * 240)
    # A blank page has no ink; this report's first 2,400 px (text, tables, two figures) about 3 %.
    assert ink > 0.01, f"the screenshot is nearly blank ({ink:.1%} ink)"


def test_the_dom_holds_every_table_row_and_figure(browser: str, page: Path, tmp_path: Path) -> None:
    proc = _run(browser, tmp_path, "--dump-dom", page.as_uri())
    assert proc.returncode == 0 and "</html>" in proc.stdout, proc.stderr[-3000:]
    dom = tmp_path / "dom.html"
    dom.write_text(proc.stdout, encoding="utf-8")
    parsed = parse_page(dom)
    assert parsed.tables == TABLES
    assert [a["data-variant"] for t, a in parsed.rows if t == "comparison" and "data-variant" in a] == [
        v[0] for v in VARIANTS
    ]
    assert len(parsed.images) == len(FIGURES)
    assert all(src.startswith("data:image/svg+xml;base64,") for src in parsed.images)


def test_no_console_errors_every_image_decoded_nothing_fetched(
    browser: str, page: Path, tmp_path: Path
) -> None:
    facts, errors = inspect(browser, tmp_path, page.as_uri())
    assert errors == []
    assert facts["tables"] == TABLES and facts["variants"] == [v[0] for v in VARIANTS]
    assert len(facts["images"]) == len(FIGURES) and all(i["ok"] for i in facts["images"]), facts["images"]
    assert facts["fetched"] == [] and facts["height"] > 2400


def test_the_checks_catch_a_broken_page(browser: str, tmp_path: Path) -> None:
    """A failed image load and a console error are reported; a file fetched beside the page is seen."""
    broken = tmp_path / "broken.html"
    (tmp_path / "beside.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>')
    broken.write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>x</title></head><body>'
        '<img src="missing.png"><img src="beside.svg"><table data-table="t"></table>'
        '<script>console.error("boom")</script></body></html>'
    )
    facts, errors = inspect(browser, tmp_path, broken.as_uri())
    assert any("boom" in e for e in errors) and any("missing.png" in e for e in errors), errors
    assert [i["ok"] for i in facts["images"]] == [False, True]
    assert sorted(Path(f).name for f in facts["fetched"]) == ["beside.svg", "missing.png"]
