"""The eyeball queue in a real headless Chromium: log in, ranked list, object page, keyboard vetting.

Needs the system Chromium (``apt-get install chromium``) and the Python ``playwright``
package; the browser bundled by ``playwright install`` is not used.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
from pathlib import Path

import pandas as pd
import pytest
from conftest import DATA, SHARED

from stream.alert import Envelope
from stream.pipeline import Pipeline
from stream.queue import QueueSink

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("VIGIL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "browser-test-token"
SHOTS = Path(os.environ.get("VIGIL_SCREENSHOTS", "/tmp"))

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # optional test dependency
    sync_playwright = None

if sync_playwright is None:
    pytest.skip("python package 'playwright' is not installed (pip install playwright)", allow_module_level=True)
if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set VIGIL_CHROMIUM)",
                allow_module_level=True)


def _alert_files() -> list:
    files = sorted(p for d in ("ztf_fink", "ztf_ampel", "rubin_fink") for p in (DATA / d).rglob("*.avro"))
    return files or sorted((SHARED / "ztf_alerts_fink_broker").rglob("*.avro"))[:200]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A store filled from real alerts, served by the real app on a free port."""
    from werkzeug.serving import make_server

    from stream.web import create_app

    files = _alert_files()
    if not files:
        pytest.skip("no real alerts in tests/data or ../shared/data")
    db = tmp_path_factory.mktemp("queue") / "queue.sqlite"
    result = Pipeline().process([Envelope(p.read_bytes(), str(p)) for p in files])
    with QueueSink(db) as sink:
        sink.write_result(result, [a.to_record() for a in result.annotations])
        sink.flush()
    srv = make_server("127.0.0.1", 0, create_app(db, token=TOKEN), threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}", db
    srv.shutdown()
    thread.join(5)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def _decisions(db) -> list:
    c = sqlite3.connect(db)
    try:
        return c.execute("SELECT object_id, action, vetter FROM decisions WHERE withdrawn_ms IS NULL "
                         "ORDER BY decision_id").fetchall()
    finally:
        c.close()


def _signed_in(browser, base: str, vetter: str):
    """A fresh page signed in as ``vetter`` on the ranked list, and the list its script errors go to."""
    page = browser.new_page(viewport={"width": 1500, "height": 950})
    errors: list = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base + "/login")
    _submit_login(page, vetter)
    return page, errors


def _submit_login(page, vetter: str) -> None:
    """Fill the login form the page shows and wait for the ranked list."""
    page.fill("#vetter", vetter)
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_selector("#queue tbody tr[data-object-id]")



def test_pages_keep_a_phones_width(server, browser):
    """On a phone (mobile emulation: the browser honours the viewport tag) no page is zoomed out
    to fit a wide table: the login page had no viewport tag (laid out 980 px wide), the list and
    the object page's alert history were wider than the screen; those tables now scroll sideways."""
    base, db = server
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    console = []  # e.g. "Failed to load resource" (every page asked for a /favicon.ico there is none of)
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    try:
        page.goto(base + "/")
        assert "/login" in page.url
        widths = "[window.innerWidth, document.documentElement.scrollWidth]"
        assert page.evaluate(widths) == [390, 390]
        _submit_login(page, "Mo")
        page.wait_for_load_state("load")  # the stylesheet too: the rows can be there before it applies
        assert page.evaluate(widths) == [390, 390]
        assert page.eval_on_selector("#queue", "t => t.getBoundingClientRect().width") > 390  # it scrolls, on its own
        assert page.locator("#queue .stype").count() > 0  # the most likely source type beside the object
        # Scrolled down the list, its header row stays in sight (it scrolled away with the page).
        top = page.eval_on_selector("#queue", """t => { const box = t.parentElement;
            box.scrollTop = 600; return [box.scrollTop, box.getBoundingClientRect().top,
                                         t.querySelector('thead th').getBoundingClientRect().top]; }""")
        assert top[0] > 0 and abs(top[2] - top[1]) < 1, top
        most = sqlite3.connect(db).execute(
            "SELECT object_id FROM objects ORDER BY n_alerts DESC, object_id").fetchone()[0]
        page.goto(f"{base}/object/{most}")
        page.wait_for_load_state("load")
        assert page.evaluate(widths) == [390, 390]
        # An object nobody snoozed shows no "snoozed" label (a class's display used to override `hidden`).
        assert page.locator("#snoozed").count() == 1 and not page.is_visible("#snoozed")
        assert page.inner_text("#types").startswith("If real, most likely:")
        assert console == []
    finally:
        context.close()

def test_vetting_session_in_chromium(server, browser, tmp_path):
    base, db = server
    page = browser.new_page(viewport={"width": 1500, "height": 950})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # Not logged in: the list redirects to the login form.
    page.goto(base + "/")
    assert "/login" in page.url
    _submit_login(page, "Vera")

    # Ranked by priority, as in the store.
    shown = page.eval_on_selector_all("#queue tbody tr[data-object-id]", "rs => rs.map(r => r.dataset.objectId)")
    expect = [r[0] for r in sqlite3.connect(db).execute(
        "SELECT object_id FROM objects ORDER BY COALESCE(priority, -1.0) DESC, object_id LIMIT 50")]
    assert shown == expect
    prios = page.eval_on_selector_all("#queue tbody tr td.prio", "ts => ts.map(t => t.textContent.trim())")
    values = [float(p.split()[0]) for p in prios if p[:1].isdigit()]
    assert values == sorted(values, reverse=True)
    assert page.locator("svg.spark").count() == len(shown)
    page.screenshot(path=str(SHOTS / "vigil_queue_list.png"), full_page=False)

    # Keyboard vetting on the list: j moves the cursor to row 2, b marks it bogus.
    page.keyboard.press("j")
    assert page.eval_on_selector("tr.cursor", "r => r.dataset.objectId") == shown[1]
    page.keyboard.press("b")
    page.wait_for_selector("tr.cursor td.vet .lab.no")
    assert (shown[1], "bogus", "Vera") in _decisions(db)
    # A second call on the same question replaces the label rather than adding one.
    page.keyboard.press("r")
    page.wait_for_selector("tr.cursor td.vet .lab.yes")
    assert page.eval_on_selector("tr.cursor td.vet", "c => c.textContent.trim()") == "real"
    # Enter on a focused link follows that link, not the cursor row (it opened row 1's object before).
    page.focus(f'#queue tbody tr[data-object-id="{shown[3]}"] a')
    assert page.eval_on_selector("tr.cursor", "r => r.dataset.objectId") == shown[3]  # focus moves the cursor
    page.keyboard.press("j")  # the cursor moves on; the focus stays on the link
    assert page.eval_on_selector("tr.cursor", "r => r.dataset.objectId") == shown[4]
    page.keyboard.press("Enter")
    page.wait_for_url(lambda u: "/object/" in u)
    assert page.url.split("?")[0].endswith("/object/" + shown[3])
    page.go_back()
    page.wait_for_selector("#queue tbody tr[data-object-id]")

    # Object page of the top object with a cutout (not the one just marked bogus): plots and stamps load.
    top_with_stamps = sqlite3.connect(db).execute(
        "SELECT o.object_id FROM objects o WHERE EXISTS (SELECT 1 FROM cutouts c WHERE c.alert_id = o.latest_alert_id"
        " AND c.kind = 'science') AND o.object_id != ? ORDER BY COALESCE(o.priority, -1.0) DESC, o.object_id LIMIT 1",
        (shown[1],)).fetchone()[0]
    page.goto(f"{base}/object/{top_with_stamps}")
    page.wait_for_load_state("load")
    assert page.locator("svg.lc").count() == 2
    assert page.locator("#lc-raw svg.lc circle.det").count() >= 1
    widths = page.eval_on_selector_all("img.cutout", "is => is.map(i => i.complete ? i.naturalWidth : -1)")
    assert len(widths) == 3 and all(w > 0 for w in widths), widths
    assert "P(real)=" in page.inner_text(".scores")
    page.screenshot(path=str(SHOTS / "vigil_queue_object.png"), full_page=True)
    page.set_viewport_size({"width": 375, "height": 800})  # a phone: the difference stamp was off-screen
    rights = page.eval_on_selector_all("img.cutout", "is => is.map(i => i.getBoundingClientRect().right)")
    assert len(rights) == 3 and max(rights) <= 375, rights
    page.set_viewport_size({"width": 1500, "height": 950})

    # Keyboard vetting on the object page: r (real), x (extragalactic), f (follow-up); j moves on.
    for key in ("r", "x", "f"):
        page.keyboard.press(key)
    page.wait_for_function("document.querySelectorAll('#decisions li:not(.muted)').length >= 3")
    mine = [(a, v) for o, a, v in _decisions(db) if o == top_with_stamps]
    # The three keys fire three concurrent requests, so the stored order is not the key order.
    assert sorted(mine) == sorted([("real", "Vera"), ("extragalactic", "Vera"), ("follow_up", "Vera")])
    url = page.url
    page.keyboard.press("j")
    page.wait_for_url(lambda u: u != url)
    assert "/object/" in page.url
    assert not errors, errors

    # The decisions are in the exported labels.
    from stream.cli import main

    out = tmp_path / "labels.parquet"
    assert main(["queue", "export-labels", "--db", str(db), "--out", str(out)]) == 0
    labels = pd.read_parquet(out)
    got = list(zip(labels["object_id"], labels["action"], labels["vetter"], strict=True))
    assert got == _decisions(db)
    row = labels[(labels["object_id"] == top_with_stamps) & (labels["action"] == "real")].iloc[0]
    assert row["is_real"] == 1 and row["p_real"] > 0 and "real_bogus" in labels.columns


def test_undoing_a_call_in_chromium(server, browser):
    """z withdraws the page's last call (the list and the object page), and so does the object page's
    button; the labels go back to what the standing decisions say."""
    base, db = server
    page, errors = _signed_in(browser, base, "Uma")
    rows = page.eval_on_selector_all("#queue tbody tr[data-object-id]", "rs => rs.map(r => r.dataset.objectId)")
    target = next(o for o in rows[5:] if not any(d[0] == o for d in _decisions(db)))
    page.focus(f'#queue tbody tr[data-object-id="{target}"] a')
    cell = f'#queue tbody tr[data-object-id="{target}"] td.vet'
    page.keyboard.press("x")
    page.wait_for_selector(cell + " .lab")
    assert (target, "extragalactic", "Uma") in _decisions(db)
    page.keyboard.press("z")  # the page reloads with the object's state as the other decisions leave it
    page.wait_for_function(f"!document.querySelector('{cell} .lab')")
    assert (target, "extragalactic", "Uma") not in _decisions(db)
    withdrawn = sqlite3.connect(db).execute("SELECT action, withdrawn_by FROM decisions WHERE object_id = ? AND "
                                            "withdrawn_ms IS NOT NULL", (target,)).fetchall()
    assert withdrawn == [("extragalactic", "Uma")]
    # The object page: b, then z; then r, withdrawn with its button.
    page.goto(f"{base}/object/{target}")
    page.wait_for_load_state("load")
    page.keyboard.press("b")
    page.wait_for_selector(".vetbar .current .lab.no")
    page.keyboard.press("z")
    page.wait_for_function("!document.querySelector('.vetbar .current .lab.no')")
    assert page.locator("#decisions li.withdrawn").count() == 2
    page.keyboard.press("r")
    page.wait_for_selector(".vetbar .current .lab.yes")
    page.click("#decisions li:not(.withdrawn) button.undo")  # the new call's own button, before any reload
    page.wait_for_selector("#decisions li.withdrawn >> nth=2")
    assert page.locator(".vetbar .current .lab").count() == 0
    assert not any(d[0] == target for d in _decisions(db))
    assert not errors, errors



def test_a_vetter_keeps_her_place_in_chromium(server, browser):
    """Found by a vetter's walk-through: z on the list reloaded with the cursor on row 1 (the next key
    then vetted another object), "↑ list" from an object went back to page 1, k on a page's first row
    went to the previous page's first row, and a call refused after a new login said only
    "Unexpected token '<'" for 1.6 s."""
    base, db = server
    context = browser.new_context(viewport={"width": 1500, "height": 950})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base + "/login")
    _submit_login(page, "Ida")
    page.goto(base + "/?per_page=10&page=2")
    page.wait_for_selector("#queue tbody tr[data-object-id]")
    rows = page.eval_on_selector_all("#queue tbody tr[data-object-id]", "rs => rs.map(r => r.dataset.objectId)")
    for _ in range(4):
        page.keyboard.press("j")
    target = rows[4]
    page.keyboard.press("g")
    page.wait_for_selector(f'#queue tbody tr[data-object-id="{target}"] td.vet .lab')
    page.keyboard.press("z")  # reloads: the cursor stays on the row undone
    page.wait_for_function(f"""!document.querySelector('#queue tbody tr[data-object-id="{target}"] td.vet .lab')""")
    assert page.eval_on_selector("tr.cursor", "r => r.dataset.objectId") == target
    page.keyboard.press("o")  # the object, then back to this page of the list, at this row
    page.wait_for_url(lambda u: "/object/" in u)
    assert "page=2" in page.url
    page.keyboard.press("u")
    page.wait_for_url(lambda u: "/object/" not in u)
    page.wait_for_selector("tr.cursor")
    assert "page=2" in page.url and page.eval_on_selector("tr.cursor", "r => r.dataset.objectId") == target
    # j across the page's end, then u: the list page that object is on now, at its row (a review found
    # the list page of the first object kept, and the cursor at the top).
    for _ in range(5):
        page.keyboard.press("j")
    page.keyboard.press("o")
    page.wait_for_url(lambda u: "/object/" in u)
    page.keyboard.press("j")
    page.wait_for_url(lambda u: "/object/" + rows[9] not in u)
    beyond = page.evaluate("document.body.dataset.objectId")
    page.keyboard.press("u")
    page.wait_for_url(lambda u: "/object/" not in u)
    page.wait_for_selector("tr.cursor")
    assert "page=3" in page.url and page.eval_on_selector("tr.cursor", "r => r.dataset.objectId") == beyond
    # An object snoozed on its page leaves the list: u comes back to the row now in its place.
    page.goto(base + "/?per_page=10&page=2")
    page.wait_for_selector("tr.cursor")
    for _ in range(4):
        page.keyboard.press("j")
    gone = page.eval_on_selector("tr.cursor", "r => r.dataset.objectId")
    page.keyboard.press("o")
    page.wait_for_url(lambda u: "/object/" in u)
    page.keyboard.press("s")
    page.wait_for_selector("#snoozed:not([hidden])")
    page.keyboard.press("u")
    page.wait_for_url(lambda u: "/object/" not in u)
    page.wait_for_selector("tr.cursor")
    now = page.eval_on_selector_all("#queue tbody tr[data-object-id]", "rs => rs.map(r => r.dataset.objectId)")
    assert gone not in now and page.eval_on_selector("tr.cursor", "r => r.dataset.objectId") == now[4]
    rows = now
    for _ in range(4):
        page.keyboard.press("k")
    assert page.eval_on_selector("tr.cursor", "r => r.dataset.objectId") == rows[0]
    page.keyboard.press("k")  # the previous page, at its last row
    page.wait_for_url(lambda u: "page=2" not in u)
    page.wait_for_selector("tr.cursor")
    last = page.eval_on_selector_all("#queue tbody tr[data-object-id]", "rs => rs[rs.length - 1].dataset.objectId")
    assert page.eval_on_selector("tr.cursor", "r => r.dataset.objectId") == last
    # A new login elsewhere in this browser changes the session: this page's next call is refused, and
    # says so in words until clicked.
    other = context.new_page()
    other.goto(base + "/login")
    _submit_login(other, "Ida")
    page.bring_to_front()
    page.keyboard.press("r")
    page.wait_for_selector("#toast.show.err")
    assert "session changed" in page.inner_text("#toast")
    page.wait_for_timeout(2500)  # (an ordinary message is gone after 1.6 s)
    assert page.locator("#toast.show.err").count() == 1
    page.click("#toast")
    assert page.locator("#toast.show").count() == 0
    assert not errors, errors
    context.close()


def test_calls_go_in_key_order_and_a_page_is_left_only_once_they_are_saved(server, browser, monkeypatch):
    """A review's two cases, with another writer holding the store's lock: (1) r then b had gone as two
    requests at once, and the store could keep bogus-then-real (the object "real", its row "bogus");
    (2) b then j left the page at once, and when the store refused the call as busy nobody was told."""
    import time

    import stream.queue as Q

    base, db = server
    page, errors = _signed_in(browser, base, "Wes")
    sent = []
    page.on("request", lambda r: sent.append(time.monotonic()) if r.url.endswith("/api/decision") else None)
    rows = page.eval_on_selector_all("#queue tbody tr[data-object-id]", "rs => rs.map(r => r.dataset.objectId)")
    target = next(o for o in rows[12:] if not any(d[0] == o for d in _decisions(db)))
    page.goto(f"{base}/object/{target}")
    page.wait_for_load_state("load")

    def hold(seconds):
        lock = sqlite3.connect(db, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        return lock, time.monotonic() + seconds

    lock, until = hold(1.0)
    page.keyboard.press("r")
    page.keyboard.press("b")
    page.wait_for_timeout(500)
    assert len(sent) == 1  # the second call waits for the first
    time.sleep(max(until - time.monotonic(), 0))
    lock.rollback()
    page.wait_for_function("document.querySelectorAll('#decisions li:not(.muted)').length >= 2")
    assert len(sent) == 2
    mine = [a for o, a, _ in _decisions(db) if o == target]  # in decision_id order
    assert mine == ["real", "bogus"]
    assert page.locator(".vetbar .current .lab.no").count() == 1

    # A call the store refuses (busy past its timeout), then j: the page stays and says so.
    monkeypatch.setattr(Q, "BUSY_TIMEOUT_MS", 600)
    url = page.url
    lock, until = hold(2.5)
    page.keyboard.press("g")
    page.keyboard.press("j")
    page.wait_for_selector("#toast.err")
    assert "not saved" in page.inner_text("#toast")
    time.sleep(max(until - time.monotonic(), 0))
    lock.rollback()
    page.wait_for_timeout(500)
    assert page.url == url
    assert [a for o, a, _ in _decisions(db) if o == target] == ["real", "bogus"]
    page.keyboard.press("j")  # nothing pending now: j moves on
    page.wait_for_url(lambda u: u != url)
    assert not errors, errors


def test_a_snooze_shown_in_the_list_does_not_hold_j_on_its_page(server, browser):
    """With "show snoozed", a snoozed row stays in view; it had counted as gone, so j past the last row
    reloaded the same page (cursor back on row 0) every time instead of turning to the next."""
    base, db = server
    page, errors = _signed_in(browser, base, "Xia")
    page.goto(base + "/?show_snoozed=1&per_page=5&page=3")
    page.wait_for_selector("#queue tbody tr[data-object-id]")
    assert page.locator("#next-page").count() == 1
    for _ in range(4):
        page.keyboard.press("j")
    last = page.eval_on_selector("tr.cursor", "r => r.dataset.objectId")
    page.keyboard.press("s")
    page.wait_for_selector(f'#queue tbody tr[data-object-id="{last}"].snoozed')
    page.keyboard.press("j")
    page.wait_for_url(lambda u: "page=4" in u)
    assert not errors, errors
