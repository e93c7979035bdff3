"""``/openapi.json`` is exact: Schemathesis against live servers, with the schema each one serves.

This module starts its own Redis, one worker (the shipped ``demo`` job type only: the tests' own
types include ones that flood or run for minutes) and two servers, one in keyless dev mode and one
with an API key (whose schema requires it). For each it loads the schema from the live
``/openapi.json`` and runs Schemathesis 4's engine, what ``schemathesis run`` runs: the examples,
coverage (boundary values, missing and wrong parameters, every method a path does not serve) and
fuzzing phases, in positive and negative modes, then the stateful phase, which follows the schema's
links (``POST /jobs`` -> status, cancel, result, retry, events); with every default check but one.
Examples are bounded and derandomized (a fixed seed), so a run is reproducible; both take about a
minute. (The engine, not ``schema.parametrize()``: Schemathesis 4.32's loader of a schema from a
fixture renames pytest nodes through ``Node._nodeid``, which pytest 9 no longer has.)

What is left out or bounded, and why (also in the README, "Tests"):

* ``use_after_free`` is off: ``DELETE /jobs/{id}`` cancels, it does not remove; the cancelled job
  stays readable (and can be retried) until ``RESULT_TTL``, as documented.
* ``GET /ws`` counts ``426`` as accepting valid data: it is a WebSocket handshake, which Schemathesis
  does not speak, and a plain request is answered ``426 Upgrade Required`` as documented.
* ``Idempotency-Key``: each request gets a fresh one (``unique_idempotency_key``); Hypothesis draws
  the same few short keys again and again, and a key reused with another body is a documented
  ``422`` (as the IETF draft says), which Schemathesis would count as refusing valid data.
* Streams are read for at most 2 events or 2 s (``max-stream-events``, ``request-timeout``): a
  job's stream ends at its final event, but ``GET /events`` never ends by itself.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import schemathesis
from schemathesis import engine
from schemathesis.engine import events
from schemathesis.hooks import GLOBAL_HOOK_DISPATCHER

from core.devredis import RedisProcess
from server.jobs import IDEMPOTENCY_KEY
from support import Proc, start_server, start_worker

SEED = 20  # tracker issue 20
KEY = "acme:openapi-test-key"
JOBS = {"jobs_module": "worker.demo"}
SERVER = {
    **JOBS,
    "long_poll_max": 0.5,  # a ?wait= of any size holds half a second at most
    "rate_submit": 1_000_000,  # no 429 between the steps of a scenario
    "rate_poll": 1_000_000,
}
FRESH_KEYS = itertools.count()


def config(examples: int, steps: int, **extra: object) -> dict:
    return {
        "seed": SEED,
        "cache": {"enabled": False},
        "request-timeout": 10,
        "max-stream-events": 2,
        "generation": {"mode": "all", "max-examples": examples, "deterministic": True, "database": "none"},
        "phases": {"stateful": {"max-steps": steps}},
        "checks": {"use_after_free": {"enabled": False}},
        "operations": [
            {  # a stream of a job still running, or of every job, is cut after 2 s (or 2 events)
                "include-operation-id": ["jobEvents", "watchJobs"],
                "request-timeout": 2,
            },
            {
                "include-operation-id": "websocket",
                "checks": {"positive_data_acceptance": {"expected-statuses": ["426"]}},
            },
        ],
        **extra,
    }


@dataclass
class Stack:
    keyless: Proc
    keyed: Proc


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("openapi")
    redis = RedisProcess(tmp / "redis").start()
    procs: list[Proc] = []
    try:
        procs.append(start_worker(redis.url, tmp, worker_concurrency=100, **JOBS))
        procs.append(start_server(redis.url, tmp, **SERVER))
        procs.append(start_server(redis.url, tmp, api_keys=KEY, **SERVER))
        yield Stack(procs[1], procs[2])
    finally:
        for proc in reversed(procs):
            proc.stop()
        redis.stop()


def unique_idempotency_key(context, case, kwargs) -> None:
    """A fresh Idempotency-Key per request, where the generated one is valid (see above)."""
    key = (case.headers or {}).get("Idempotency-Key")
    if isinstance(key, str) and IDEMPOTENCY_KEY.fullmatch(key):
        case.headers["Idempotency-Key"] = f"{key[:200].rstrip()}~{next(FRESH_KEYS)}"


def run(url: str, settings: dict) -> tuple[list[str], Counter]:
    """One Schemathesis run against the schema ``url`` serves: every failure and error as text
    (with the request as curl and the answer), and the answers' statuses."""
    api = schemathesis.openapi.from_url(url + "/openapi.json", config=schemathesis.Config.from_dict(settings))
    schemathesis.hook("before_call")(unique_idempotency_key)
    try:
        stream = list(engine.from_schema(api).execute())
    finally:
        GLOBAL_HOOK_DISPATCHER.unregister(unique_idempotency_key)
    problems: list[str] = []
    statuses: Counter = Counter()
    for event in stream:
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            statuses.update(i.response.status_code for i in recorder.interactions.values() if i.response is not None)
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    if check.failure_info is None:
                        continue
                    failure = check.failure_info.failure
                    interaction = recorder.interactions.get(case_id)
                    answer = interaction.response if interaction is not None else None
                    got = f"[{answer.status_code}] {answer.content[:500]!r}" if answer is not None else "(no response)"
                    problems.append(
                        f"[{event.phase.value}] {recorder.label}: {failure.title} ({check.name})\n"
                        f"{failure.message}\n{check.failure_info.code_sample}\n-> {got}"
                    )
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            problems.append(f"error in {getattr(event, 'label', 'the run')}: {event.info.format()}")
    return list(dict.fromkeys(problems)), statuses


@pytest.mark.slow
@pytest.mark.parametrize(
    ("server", "settings"),
    [
        ("keyless", config(examples=25, steps=15)),
        # what changes with a key: security required (401 without it), another tenant
        ("keyed", config(examples=8, steps=8, auth={"openapi": {"bearer": {"bearer": KEY.partition(":")[2]}}})),
    ],
)
def test_schemathesis_finds_nothing(stack: Stack, server: str, settings: dict) -> None:
    started = time.monotonic()
    problems, statuses = run(getattr(stack, server).url, settings)
    took = time.monotonic() - started
    print(f"{server}: {statuses.total()} requests in {took:.1f} s, by status: {dict(sorted(statuses.items()))}")
    assert statuses[200] and statuses[202] and statuses[405], "Schemathesis did not get far"
    assert not problems, f"{len(problems)} failures:\n\n" + "\n\n".join(problems[:30])


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/jobs", "GET, HEAD, POST"),  # two routes: Starlette alone would say POST
        ("OPTIONS", "/jobs/j_000000000000000000000000", "GET, HEAD, DELETE"),
        ("POST", "/jobs/j_000000000000000000000000/events", "GET, HEAD"),  # an SSE route (App.stream_for)
        ("DELETE", "/ws", "GET, HEAD"),
    ],
)
def test_405_allows_every_method_of_the_path(stack: Stack, method: str, path: str, allow: str) -> None:
    r = httpx.request(method, stack.keyless.url + path)
    assert r.status_code == 405 and r.headers["allow"] == allow, (r.status_code, r.headers.get("allow"))
    assert r.headers["content-type"] == "application/problem+json" and r.json()["detail"], r.text


def test_problems_have_a_detail(stack: Stack) -> None:
    """Answers the document cannot list (an unknown path) and the plain GET of the WebSocket."""
    unknown = httpx.get(stack.keyless.url + "/nope")
    assert unknown.status_code == 404 and unknown.json()["detail"], unknown.text
    plain = httpx.get(stack.keyless.url + "/ws")
    assert plain.status_code == 426 and plain.headers["upgrade"] == "websocket" and plain.json()["detail"], plain.text
