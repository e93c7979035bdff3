"""The browser side: static/progress.js, the demo page and the dashboard, in a real headless
Chromium (Debian's ``chromium``, driven by Playwright) against the real server, worker and Redis.

Each test waits on conditions with deadlines; screenshots of every state go to
``test-artifacts/browser/``.
"""

from __future__ import annotations

import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import playwright.sync_api as playwright
import pytest

from support import ROOT, TERMINAL, Proc, start_server

expect = playwright.expect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
SSE_URL = re.compile(r"/events(\?|$)")  # /events and /jobs/ID/events, not /jobs/ID?wait=


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    assert Path(CHROMIUM).exists(), "no chromium: `make test` installs Debian's (make browser)"
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser) -> Iterator[Any]:
    """A fresh browser context; any uncaught error in the page fails the test."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    context.set_default_timeout(10_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, errors


def shot(page, name: str, full_page: bool = True) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full_page, animations="disabled")


# -- the demo page --------------------------------------------------------------------------


def start_job(page, steps: int, interval: float, fail_at: int | None = None) -> str:
    page.fill("#steps", str(steps))
    page.fill("#interval", str(interval))
    page.fill("#fail_at_step", "" if fail_at is None else str(fail_at))
    cards = page.locator(".card")
    before = cards.count()
    page.click("#start-button")
    expect(cards).to_have_count(before + 1)
    return cards.first.get_attribute("data-job")


def card(page, job_id: str):
    return page.locator(f'.card[data-job="{job_id}"]')


def wait_progress(page, job_id: str, at_least: float, timeout: float = 10_000) -> None:
    page.wait_for_function(
        """([id, pct]) => { const c = document.querySelector(`.card[data-job="${id}"]`);
             return c && c.dataset.status === "running" && Number(c.dataset.progress) >= pct; }""",
        arg=[job_id, at_least],
        timeout=timeout,
    )


def renders(page, job_id: str) -> list[dict[str, Any]]:
    return page.evaluate("id => __renders.filter(r => r.id === id)", job_id)


def assert_rendered_ok(docs: list[dict[str, Any]], final: str) -> None:
    """What the page showed: seq strictly increasing, the bar never going back, one final state, last."""
    seqs = [d["seq"] for d in docs]
    assert seqs == sorted(set(seqs)), f"seq repeated or went back: {seqs}"
    values = [d["progress"] for d in docs if d["progress"] is not None]
    assert values == sorted(values), f"the bar went back: {values}"
    assert [d["status"] for d in docs if d["status"] in TERMINAL] == [final], [d["status"] for d in docs]
    assert docs[-1]["status"] == final


def transport(page) -> str:
    return page.locator("#transport").get_attribute("data-transport")


def test_demo_job_rises_through_intermediate_values_to_100(page, base):
    page.goto(base + "/")
    expect(page.locator("#transport-text")).to_contain_text("idle")
    shot(page, "demo-empty")
    job_id = start_job(page, steps=12, interval=0.15)
    wait_progress(page, job_id, 25)
    expect(page.locator("#transport")).to_have_attribute("data-live", "true")
    expect(page.locator("#transport-text")).to_have_text("WebSocket")
    shot(page, "demo-running")
    expect(card(page, job_id)).to_have_attribute("data-status", "succeeded")
    assert card(page, job_id).locator("progress").evaluate("e => e.value") == 100
    expect(card(page, job_id).locator(".pct")).to_have_text("100%")
    expect(card(page, job_id).locator(".result")).to_be_visible()
    expect(card(page, job_id).locator(".cancel")).to_be_hidden()
    expect(card(page, job_id).locator(".meta-expires")).to_contain_text("Kept until")  # its expires_at
    shot(page, "demo-succeeded")

    docs = renders(page, job_id)
    assert_rendered_ok(docs, "succeeded")
    middle = [d["progress"] for d in docs if d["progress"] is not None and 0 < d["progress"] < 100]
    assert len(middle) >= 5, middle  # the session worker publishes every step
    assert {d["transport"] for d in docs[1:]} == {"websocket"}  # docs[0] is the POST answer


def test_a_group_shows_one_overall_bar_rising_with_its_three_jobs(page, base):
    """The demo's group: one card for the group and one per child, on the one connection; the
    group's bar only rises, and ends at 100 once all three have."""
    page.goto(base + "/")
    page.get_by_role("button", name="Start a group of 3").click()
    group = page.locator(".card", has_text="group of 3")
    expect(group).to_have_attribute("data-status", "running")
    expect(page.locator(".card")).to_have_count(4)
    shot(page, "demo-group-running")
    expect(group).to_have_attribute("data-status", "succeeded", timeout=30_000)
    expect(page.locator(".card[data-status='succeeded']")).to_have_count(4)
    expect(group.locator(".pct")).to_have_text("100%")
    shot(page, "demo-group-succeeded")
    docs = renders(page, group.get_attribute("data-job"))
    assert_rendered_ok(docs, "succeeded")
    shown = [d["progress"] for d in docs if d["progress"] is not None]
    assert shown == sorted(shown) and len([p for p in shown if 0 < p < 100]) >= 5, shown
    assert page.evaluate("__transports.filter(t => t.name === 'websocket' && t.live).length") == 1


def test_several_jobs_at_once_failed_and_cancelled(page, base):
    page.goto(base + "/")
    long = start_job(page, steps=300, interval=0.1)  # first: the watcher never goes idle in between
    doomed = start_job(page, steps=6, interval=0.1, fail_at=3)
    ok = start_job(page, steps=5, interval=0.1)
    expect(card(page, doomed)).to_have_attribute("data-status", "failed")
    expect(card(page, doomed).locator(".error-text")).to_contain_text("failed at step 3 of 6")
    expect(card(page, ok)).to_have_attribute("data-status", "succeeded")
    wait_progress(page, long, 1)
    shot(page, "demo-several")
    card(page, long).get_by_role("button", name=f"Cancel job {long}").click()
    expect(card(page, long)).to_have_attribute("data-status", "cancelled")
    expect(card(page, long).locator(".status")).to_have_text("cancelled")
    shot(page, "demo-failed-cancelled")

    assert_rendered_ok(renders(page, doomed), "failed")
    assert_rendered_ok(renders(page, ok), "succeeded")
    cancelled = renders(page, long)
    assert_rendered_ok(cancelled, "cancelled")
    assert cancelled[-1]["progress"] < 100
    # one connection for all three jobs
    assert page.evaluate("__transports.filter(t => t.name === 'websocket' && t.live).length") == 1

    page.get_by_role("button", name="Clear finished").click()
    expect(page.locator(".card")).to_have_count(0)
    expect(page.locator("#transport-text")).to_contain_text("idle")


def test_form_shows_the_servers_validation_error(page, base):
    page.goto(base + "/")
    page.fill("#steps", "20")
    page.fill("#interval", "0.1")
    page.fill("#fail_at_step", "")
    page.evaluate("document.getElementById('steps').removeAttribute('max'); document.getElementById('steps').value = 20000")
    page.click("#start-button")
    expect(page.locator("#form-error")).to_contain_text("params.steps")
    expect(page.locator(".card")).to_have_count(0)


# -- fallback -------------------------------------------------------------------------------


def refuse_websockets(page) -> None:
    page.route_web_socket(re.compile(r"/ws(\?|$)"), lambda ws: ws.close())


def test_falls_back_to_sse_when_websockets_are_refused(page, base):
    refuse_websockets(page)
    page.goto(base + "/")
    job_id = start_job(page, steps=20, interval=0.1)
    wait_progress(page, job_id, 40)
    assert transport(page) == "sse"
    expect(page.locator("#transport-text")).to_have_text("Server-Sent Events")
    shot(page, "fallback-sse")
    expect(card(page, job_id)).to_have_attribute("data-status", "succeeded")
    docs = renders(page, job_id)
    assert_rendered_ok(docs, "succeeded")
    assert {d["transport"] for d in docs[1:]} == {"sse"}
    assert len([d for d in docs if d["progress"] and d["progress"] < 100]) >= 3


def test_falls_back_to_polling_when_websockets_and_sse_are_refused(page, base):
    refuse_websockets(page)
    page.route(SSE_URL, lambda route: route.fulfill(status=502, body="bad gateway"))
    page.goto(base + "/")
    job_id = start_job(page, steps=20, interval=0.1)
    wait_progress(page, job_id, 40)
    assert transport(page) == "long-poll"
    expect(page.locator("#transport-text")).to_have_text("long polling")
    shot(page, "fallback-polling")
    expect(card(page, job_id)).to_have_attribute("data-status", "succeeded")
    docs = renders(page, job_id)
    assert_rendered_ok(docs, "succeeded")
    assert {d["transport"] for d in docs[1:]} == {"long-poll"}
    assert len([d for d in docs if d["progress"] and d["progress"] < 100]) >= 3


def test_client_upgrades_back_to_websocket_once_it_works_again(page, base):
    """The library alone (as a page would use it): blocked WebSockets, then unblocked."""
    blocked = True

    def gate(ws):
        if blocked:
            ws.close()
        else:
            ws.connect_to_server()

    page.route_web_socket(re.compile(r"/ws(\?|$)"), gate)
    page.goto(base + "/")
    job_id = httpx.post(base + "/jobs", json={"type": "demo", "params": {"steps": 40, "interval": 0.1}}).json()["id"]
    page.evaluate(
        """id => { window.__seen = []; window.__names = [];
             window.__w = ProgressClient.watchJob(id, {upgradeAfter: 300,
               onUpdate: (job, info) => __seen.push([job.seq, info.transport]),
               onDone: (job) => { window.__done = (window.__done || 0) + 1; },
               onTransport: (name, live) => live && __names.push(name)}); }""",
        job_id,
    )
    page.wait_for_function("() => __names.includes('sse')")
    blocked = False
    page.wait_for_function("() => __names.includes('websocket')")
    page.wait_for_function("() => window.__done === 1")
    seen = page.evaluate("__seen")
    seqs = [s for s, _ in seen]
    assert seqs == sorted(set(seqs)), seqs
    assert {"sse", "websocket"} <= {name for _, name in seen}
    assert page.evaluate("__names") == ["sse", "websocket"]
    page.evaluate("__w.close()")
    assert page.evaluate("__w.transport") == "idle"


WATCH = """([ids, opts]) => new Promise((resolve) => {
  const seen = [], names = new Set(), errors = [];
  let left = ids.length;
  setTimeout(() => resolve({seen, names: [...names], errors, timeout: true}), 8000);
  const w = ProgressClient.watchJobs(ids, {...opts,
    onUpdate: (job, info) => { seen.push([job.id, job.seq]); names.add(info.transport); },
    onTransport: (name, live) => live && names.add(name),
    onError: (e) => { errors.push(e); if (--left === 0) resolve({seen, names: [...names], errors}); },
    onDone: (job) => { if (--left === 0) { w.close(); resolve({seen, names: [...names], errors}); } }});
})"""


WATCH_ADDED = """([a, tokenA, b, tokenB, via]) => new Promise((resolve) => {
  const seen = [], errors = [];
  let left = 2;
  setTimeout(() => resolve({seen, errors, timeout: true}), 8000);
  const w = ProgressClient.watchJob(a, {transports: [via], token: tokenA,
    onUpdate: (job) => seen.push([job.id, job.seq]),
    onError: (e) => { errors.push(e); if (--left === 0) resolve({seen, errors}); },
    onDone: () => { if (--left === 0) { w.close(); resolve({seen, errors}); } }});
  w.add(b, 0, tokenB);
})"""


def test_watch_tokens_and_tickets_when_the_server_has_api_keys(page, redis_server, worker, tmp_path):
    """With API keys a page holds no key: each job's watch token (from POST /jobs) opens it on
    every transport, a job without one stays closed, and a dashboard uses one-off tickets."""
    key = "browser-test-key-1"
    server = start_server(redis_server.url, tmp_path, api_keys=f"acme:{key}")
    try:
        auth = {"authorization": f"Bearer {key}"}

        def submit() -> dict[str, Any]:
            r = httpx.post(server.url + "/jobs", json={"type": "demo", "params": {"steps": 6, "interval": 0.05}}, headers=auth)
            assert r.status_code == 202, r.text
            return r.json()

        page.goto(server.url + "/")
        for via in ("websocket", "sse", "long-poll"):
            a, b = submit(), submit()
            got = page.evaluate(WATCH, [[a["id"], b["id"]], {"transports": [via], "token": {a["id"]: a["token"], b["id"]: b["token"]}}])
            assert got["names"] == [via] and not got["errors"], got
            for job in (a, b):
                seqs = [seq for job_id, seq in got["seen"] if job_id == job["id"]]
                assert seqs == sorted(set(seqs)) and len(seqs) >= 3, (via, got)
            # watchJob(a, {token}) then add(b, 0, b's token): each job with its own token
            a, b = submit(), submit()
            got = page.evaluate(WATCH_ADDED, [a["id"], a["token"], b["id"], b["token"], via])
            assert not got["errors"] and {job_id for job_id, _ in got["seen"]} == {a["id"], b["id"]}, (via, got)
        # No token: refused everywhere (a browser cannot see why a WebSocket or EventSource failed;
        # the long poll's 401 says it), reported once, then the watcher goes idle.
        refused = page.evaluate(WATCH, [[submit()["id"]], {}])
        assert [e["status"] for e in refused["errors"]] == [401] and not refused["seen"], refused

        page.evaluate(
            """key => { window.__feed = [];
                 window.__all = ProgressClient.watchJobs("all", {transports: ["websocket", "sse"],
                   ticket: () => fetch("/tickets", {method: "POST", body: '{"all": true}',
                       headers: {"content-type": "application/json", authorization: "Bearer " + key}})
                     .then((r) => r.json()).then((t) => t.ticket),
                   onUpdate: (job) => __feed.push(job.id)}); }""",
            key,
        )
        fresh = submit()
        page.wait_for_function("id => __feed.includes(id)", arg=fresh["id"])
        page.evaluate("__all.close()")
    finally:
        server.stop()


# -- resume ---------------------------------------------------------------------------------


def test_websocket_cut_mid_job_resumes_without_repeats(page, base):
    sockets = []

    def relay(ws):
        ws.connect_to_server()
        sockets.append(ws)

    page.route_web_socket(re.compile(r"/ws(\?|$)"), relay)
    page.goto(base + "/")
    job_id = start_job(page, steps=30, interval=0.1)
    wait_progress(page, job_id, 20)
    sockets[-1].close()  # the page's connection drops (as through a proxy restart)
    wait_progress(page, job_id, 50)
    sockets[-1].close()
    expect(card(page, job_id)).to_have_attribute("data-status", "succeeded")
    assert len(sockets) >= 3
    docs = renders(page, job_id)
    assert_rendered_ok(docs, "succeeded")
    assert {d["transport"] for d in docs[1:]} == {"websocket"}


def test_offline_then_online_resumes_without_repeats(page, base):
    page.goto(base + "/")
    job_id = start_job(page, steps=50, interval=0.1)
    wait_progress(page, job_id, 10)
    page.context.set_offline(True)  # navigator.onLine false, "offline" fired, the socket goes quiet
    expect(page.locator("#transport-text")).to_have_text("offline (waiting for the network)")
    shot(page, "offline")
    before = renders(page, job_id)[-1]["seq"]
    page.context.set_offline(False)  # "online": reconnect at once and resume from the last seq
    expect(card(page, job_id)).to_have_attribute("data-status", "succeeded")
    docs = renders(page, job_id)
    assert_rendered_ok(docs, "succeeded")
    assert [d for d in docs if d["seq"] > before and d["status"] == "running"], "the bar did not continue"


@pytest.fixture
def own_server(redis_server, worker, tmp_path) -> Iterator[list[Proc]]:
    """A server of this test's own (the list holds its successors too); all stopped at the end."""
    servers = [start_server(redis_server.url, tmp_path, sse_retry_ms=200)]
    yield servers
    for server in servers:
        server.stop(signal.SIGKILL)


@pytest.mark.parametrize("via", ["websocket", "sse"])
def test_server_restart_mid_job_resumes_without_going_back(page, own_server, redis_server, tmp_path, via):
    old = own_server[0]
    down = False
    if via == "sse":
        refuse_websockets(page)
        # While the server is down, a proxy in front of it answers 502: EventSource gives up for
        # good after that, and the client must open a new one itself.
        page.route(SSE_URL, lambda route: route.fulfill(status=502, body="bad gateway") if down else route.continue_())
    page.goto(old.url + "/")
    job_id = start_job(page, steps=60, interval=0.1)
    wait_progress(page, job_id, 15)
    assert transport(page) == via
    before = renders(page, job_id)[-1]["seq"]
    down = True
    if via == "sse":  # wait until the page has been answered 502 at least once
        with page.expect_response(lambda r: bool(SSE_URL.search(r.url)) and r.status == 502):
            old.stop(signal.SIGKILL)
    else:
        old.stop(signal.SIGKILL)
    expect(page.locator("#transport")).to_have_attribute("data-live", "false")
    shot(page, f"restart-{via}-down")
    own_server.append(start_server(redis_server.url, tmp_path, port=old.port))
    down = False
    expect(card(page, job_id)).to_have_attribute("data-status", "succeeded", timeout=20_000)
    shot(page, f"restart-{via}-after")
    docs = renders(page, job_id)
    assert_rendered_ok(docs, "succeeded")
    after = [d for d in docs if d["seq"] > before and d["status"] == "running"]
    assert after, "the bar did not continue after the restart"
    assert page.evaluate("__transports.filter(t => t.live).length") >= 2  # connected again


# -- the htmx page ---------------------------------------------------------------------------

HTMX_SOURCE = "document.querySelector('#jobs li')['htmx-internal-data'].sseEventSource"


def start_htmx_job(page, steps: int, interval: float):
    page.fill("#steps", str(steps))
    page.fill("#interval", str(interval))
    page.click("#start-button")
    return page.locator("#jobs .job")


def test_htmx_page_closes_the_stream_after_the_final_event(page, own_server):
    """The stream ends with ``event: done`` and ``sse-close="done"`` closes it: the browser asks
    for nothing more once the final fragment is in, and the page logs no error (no CSP
    violation from an injected style, no missing favicon)."""
    server = own_server[0]
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    # (the page closing its stream on `done` may abort the response the server is still ending)
    page.on("requestfailed", lambda r: None if SSE_URL.search(r.url) and "ERR_ABORTED" in (r.failure or "") else console.append(f"{r.url}: {r.failure}"))
    page.on("response", lambda r: console.append(f"{r.url}: {r.status}") if r.status >= 400 else None)
    streams: list[Any] = []
    page.on("request", lambda r: streams.append(r) if SSE_URL.search(r.url) else None)
    page.goto(server.url + "/")
    page.click("nav >> text=htmx")  # linked from the demo page
    expect(page).to_have_url(server.url + "/static/htmx.html")
    job = start_htmx_job(page, steps=10, interval=0.05)
    expect(job).to_have_class(re.compile(r"\bjob-succeeded\b"))
    expect(job.locator("progress")).to_have_attribute("value", "100")
    shot(page, "htmx-succeeded")
    # CLOSED (2): the extension reconnects only from a source's error, which a closed one never has
    page.wait_for_function(f"{HTMX_SOURCE}.readyState === 2")
    after_final = len(streams)
    # and to see it from the outside: nothing asked for across several reconnect delays
    # (this server's ``retry:`` is 200 ms, the extension's own first retry 500 ms)
    page.wait_for_timeout(1500)
    assert len(streams) == after_final == 1, [r.url for r in streams]
    assert console == []


def test_htmx_stream_cut_mid_job_resumes_from_the_last_event(page, own_server, redis_server, tmp_path):
    """A server killed mid-job: the browser reconnects on its own with ``Last-Event-ID``, the
    bar goes on from where it was, and the stream is closed at the end."""
    old = own_server[0]
    streams: list[Any] = []
    page.on("request", lambda r: streams.append(r) if SSE_URL.search(r.url) else None)
    page.goto(old.url + "/static/htmx.html")
    job = start_htmx_job(page, steps=60, interval=0.1)
    expect(job.locator("progress")).to_have_attribute("value", re.compile(r"^[2-9]\d"))  # 20% or more
    before = float(job.locator("progress").get_attribute("value"))
    old.stop(signal.SIGKILL)
    own_server.append(start_server(redis_server.url, tmp_path, port=old.port, sse_retry_ms=200))
    expect(job).to_have_class(re.compile(r"\bjob-succeeded\b"), timeout=20_000)
    page.wait_for_function(f"{HTMX_SOURCE}.readyState === 2")
    # the attempts that reached the new server (those refused while it was down never sent headers)
    resumed = [r.all_headers().get("last-event-id") for r in streams[1:] if r.response() is not None]
    assert resumed and all(seq and int(seq) > 0 for seq in resumed), resumed
    assert float(job.locator("progress").get_attribute("value")) >= before


# -- the job page -------------------------------------------------------------------------------


def submit_job(base: str, job_type: str, **params: Any) -> dict[str, Any]:
    r = httpx.post(base + "/jobs", json={"type": job_type, "params": params}, timeout=10)
    assert r.status_code == 202, r.text
    return r.json()


def log_seqs(page) -> list[int]:
    return page.eval_on_selector_all("#log li[data-seq]", "els => els.map(e => Number(e.dataset.seq))")


def test_job_page_shows_a_running_job_live_and_cancels_it(page, base):
    """From a dashboard row to the job's page: bar and log move live, params shown, Cancel works,
    and the timeline says how the attempt ended."""
    job = submit_job(base, "chatty", lines=400, every=1, pause=0.05, report=True)  # about 20 s
    page.goto(base + "/dashboard")
    page.click(f'tr[data-job="{job["id"]}"] a.job-link')
    expect(page).to_have_url(f"{base}/dashboard/jobs/{job['id']}")
    expect(page.locator("#job")).to_have_attribute("data-status", "running")
    expect(page.locator("#params")).to_contain_text('"lines": 400')
    expect(page.locator("#log li[data-seq]").nth(4)).to_be_attached()  # lines arrive live
    # (one read of both: two reads could straddle an update, and take its progress as the one before it)
    seq, first = page.evaluate("() => [document.getElementById('job').dataset.seq, document.getElementById('bar').getAttribute('value')]")
    expect(page.locator("#job")).not_to_have_attribute("data-seq", seq)  # and so does progress
    assert float(page.locator("#bar").get_attribute("value")) > float(first or 0)
    expect(page.locator("#log li").first).to_contain_text("attempt 1 started")
    shot(page, "job-running")
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#job")).to_have_attribute("data-status", "cancelled")
    expect(page.locator("#timeline")).to_contain_text("attempt 1 cancelled")
    expect(page.locator("#log li").last).to_have_text(re.compile(r"INFO cancelled$"))  # the worker's word, without the job id
    seqs = log_seqs(page)
    assert seqs == list(range(1, len(seqs) + 1)), "a log line missing or twice"
    assert page.get_by_role("button", name="Cancel").is_hidden() and page.get_by_role("button", name="Retry").is_visible()
    shot(page, "job-cancelled")


def test_job_page_retries_a_failed_job(page, base):
    job = submit_job(base, "demo", steps=2, interval=0, fail_at_step=1)
    page.goto(f"{base}/dashboard/jobs/{job['id']}")
    expect(page.locator("#job")).to_have_attribute("data-status", "failed")
    expect(page.locator("#error-text")).to_have_text("DemoFailure: failed at step 1 of 2")
    expect(page.locator('#log li[data-level="WARNING"]')).to_contain_text("failing, as fail_at_step asked")
    page.get_by_role("button", name="Retry").click()
    expect(page.locator("#timeline")).to_contain_text("attempt 2 failed")
    expect(page.locator("#attempt")).to_have_text("2")
    expect(page.locator('#log li[data-level="WARNING"]')).to_have_count(2)  # each attempt's, once
    seqs = log_seqs(page)
    assert seqs == sorted(set(seqs)) and seqs[0] == 1, seqs
    shot(page, "job-retried")


def test_job_page_of_a_group_lists_its_jobs_and_each_links_back(page, base):
    members = [{"type": "demo", "params": {"steps": 4, "interval": 0.1}, "weight": w} for w in (1, 3)]
    r = httpx.post(base + "/jobs", json={"group": members}, timeout=10)
    assert r.status_code == 202, r.text
    group = r.json()
    page.goto(f"{base}/dashboard/jobs/{group['id']}")
    expect(page.locator("#family-heading")).to_have_text("Jobs in this group")
    expect(page.locator("#children li")).to_have_count(2)
    expect(page.locator("#job")).to_have_attribute("data-status", "succeeded", timeout=20_000)
    expect(page.locator("#children li[data-status='succeeded']")).to_have_count(2)
    expect(page.locator("#pct")).to_have_text("100%")
    expect(page.locator("#retry")).to_be_hidden()
    shot(page, "job-group")
    page.locator("#children a").nth(1).click()
    expect(page.locator("#parent")).to_have_text(group["id"])
    expect(page.locator("#job")).to_have_attribute("data-status", "succeeded")
    page.locator("#parent").click()
    expect(page.locator("#family-heading")).to_have_text("Jobs in this group")


def test_job_page_of_a_job_that_spawned_lists_them_and_offers_retry(page, base):
    job = submit_job(base, "batch", parts=2, interval=0, fail_part=2)
    page.goto(f"{base}/dashboard/jobs/{job['id']}")
    expect(page.locator("#job")).to_have_attribute("data-status", "failed", timeout=20_000)
    expect(page.locator("#error-text")).to_have_text("DemoFailure: part 2 failed")
    expect(page.locator("#family-heading")).to_have_text("Jobs it spawned")
    expect(page.locator("#children li")).to_have_count(2)
    expect(page.locator("#children li[data-status='failed']")).to_have_count(1)
    expect(page.locator("#retry")).to_be_visible()  # (a job that spawned runs again whole; a group does not)
    page.locator("#children a").nth(0).click()
    expect(page.locator("#parent")).to_have_text(job["id"])
    expect(page.locator("#family-heading")).to_have_text("Part of")


# -- /docs --------------------------------------------------------------------------------------


def test_docs_page_is_swagger_ui_and_try_it_out_submits_a_job(page, base):
    """``/docs`` is Swagger UI (vendored, no CDN) over ``/openapi.json``: it lists every operation,
    shows ``POST /jobs``'s body, and its Try it out sends a real submit; no console error (CSP)."""
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    page.on("request", lambda r: console.append(f"off-site request {r.url}") if not r.url.startswith(base) else None)
    page.goto(base + "/")
    page.click("nav >> text=API")
    submit = page.locator(".opblock-post", has=page.locator('[data-path="/jobs"]'))
    expect(submit).to_have_count(1)
    spec = httpx.get(base + "/openapi.json", timeout=10).json()
    operations = sum(len([m for m in ops if m in ("get", "post", "delete", "put", "patch")]) for ops in spec["paths"].values())
    expect(page.locator(".opblock")).to_have_count(operations)
    submit.locator(".opblock-summary").click()
    submit.get_by_role("button", name="Try it out").click()
    submit.locator("textarea.body-param__text").fill('{"type": "demo", "params": {"steps": 2, "interval": 0}}')
    with page.expect_response(lambda r: r.url == base + "/jobs" and r.request.method == "POST") as answer:
        submit.get_by_role("button", name="Execute").click()
    assert answer.value.status == 202
    expect(submit.locator(".live-responses-table td.response-col_status:not(.col_header)")).to_have_text("202")
    shot(page, "docs-try-it-out", full_page=False)
    assert console == []


# -- the dashboard --------------------------------------------------------------------------


def test_dashboard_shows_a_job_from_another_client_at_once_and_settles_it(page, base):
    sockets = []
    page.on("websocket", lambda ws: sockets.append(ws))
    page.goto(base + "/dashboard")
    expect(page.locator("#transport")).to_have_attribute("data-live", "true")
    expect(page.locator("#transport-text")).to_have_text("WebSocket")

    posted = time.monotonic()
    r = httpx.post(base + "/jobs", json={"type": "demo", "params": {"steps": 8, "interval": 0.15}})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    row = page.locator(f'tr[data-job="{job_id}"]')
    expect(row).to_be_visible(timeout=1_000)
    assert time.monotonic() - posted < 1.0
    expect(row).to_have_attribute("data-status", "running")
    shot(page, "dashboard-running")
    expect(row).to_have_attribute("data-status", "succeeded")
    expect(row.locator(".pct")).to_have_text("100%")
    expect(page.locator("#count-succeeded")).not_to_have_text("0")
    expect(page.locator("#chart-summary")).to_contain_text("finished in the last 5 minutes")
    assert page.locator("#chart rect.ok[height]:not([height='0'])").count() >= 1
    shot(page, "dashboard-settled")

    page.select_option("#filter-status", "failed")
    expect(row).to_be_hidden()
    page.select_option("#filter-status", "")
    page.select_option("#filter-type", "demo")
    expect(row).to_be_visible()

    with sockets[-1].expect_event("close"):  # close() ends the connection
        page.evaluate("__watcher.close()")
    expect(page.locator("#transport-text")).to_contain_text("idle")


def test_dashboard_lists_the_live_workers(page, base, worker):
    """The session's worker, with its job types and load, as GET /workers has it."""
    page.goto(base + "/dashboard")
    row = page.locator(f"#workers tr:has-text('pid {worker.pid}')")
    expect(row).to_be_visible()
    expect(row).to_contain_text("count_sync, demo, echo")
    expect(row).to_contain_text("of 10")
    expect(page.locator("#no-workers")).to_be_hidden()
    # and the queues its job types name, with the workers that serve them (GET /queues)
    for name in ("default", "heavy"):
        queue_row = page.locator(f"#queues tr[data-queue='{name}']")
        expect(queue_row.locator("th")).to_have_text(name)
        expect(queue_row.locator("td").nth(3)).to_have_text("1")
    shot(page, "dashboard-workers")


def test_dashboard_keeps_at_most_200_rows(page, base):
    page.goto(base + "/dashboard")
    expect(page.locator("#transport")).to_have_attribute("data-live", "true")
    page.evaluate("""() => {
      const t0 = Date.now();
      for (let i = 0; i < 300; i++) {
        const at = new Date(t0 + 60000 + i * 1000).toISOString();
        __dashboard.render({id: "j_fake" + i, type: "fake", status: i % 3 ? "succeeded" : "running",
          progress: 50, message: null, stage: null, seq: 2, attempt: 1, created_at: at, started_at: at,
          updated_at: at, finished_at: i % 3 ? at : null, eta_s: null, error: null, links: {}});
      }
    }""")
    expect(page.locator("#rows > tr")).to_have_count(200)
    assert page.evaluate("__dashboard.rows.size") == 200
    # the newest are kept, and running jobs outlive finished ones
    assert page.locator('tr[data-job="j_fake299"]').count() == 1
    assert page.locator('tr[data-job="j_fake0"]').count() == 1  # running (0 % 3 == 0)
    assert page.locator('tr[data-job="j_fake1"]').count() == 0


def test_pages_at_phone_width(browser, base):
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=1)
    try:
        page = context.new_page()
        page.goto(base + "/")
        job_id = start_job(page, steps=8, interval=0.1)
        expect(card(page, job_id)).to_have_attribute("data-status", "succeeded")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        shot(page, "phone-demo", full_page=False)
        page.goto(base + "/dashboard")
        expect(page.locator(f'tr[data-job="{job_id}"]')).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        shot(page, "phone-dashboard", full_page=False)
        page.goto(f"{base}/dashboard/jobs/{job_id}")
        expect(page.locator("#job")).to_have_attribute("data-status", "succeeded")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        shot(page, "phone-job", full_page=False)
    finally:
        context.close()
