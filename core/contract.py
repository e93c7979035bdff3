"""The contract shared by server and worker: job document, event format, Redis layout.

Everything here is pure (no I/O) and is the single definition of each fact:

* the job document's shape (``new_document``), which is the body of status answers,
  the SSE ``data:``, the WebSocket ``job`` and the webhook payload;
* the event as stored and published: ``b"<seq> <event> <tenant>\\n" + <document JSON>``. The
  short header lets a server route, order and authorise an event without parsing the JSON,
  and the document bytes are relayed to every client untouched;
* the Redis keys and channels, all under the ``progress:`` prefix (arq keeps ``arq:*``; the
  queues' own, ``progress:order:*`` and ``progress:waiting:*``, are in ``core.queue``); the Lua
  scripts that write them are in ``core.scripts``;
* a job's log: lines (``log_line``) kept in ``log_key``, published in batches on ``log_channel``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from datetime import datetime, timezone
from typing import Any, NamedTuple

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset((SUCCEEDED, FAILED, CANCELLED))

PREFIX = "progress:"
EVENTS_PATTERN = PREFIX + "ev:*"  # every job's channel, for dashboards
WAKE_CHANNEL = PREFIX + "wake"  # "a job was enqueued": workers poll at once
CANCEL_CHANNEL = PREFIX + "cancel"  # payload: job id; the worker running it stops it


def job_key(job_id: str) -> str:
    """Hash with fields ``seq``, ``state``, ``type``, ``ev`` (the packed event), ``params``
    (JSON), ``webhook`` and ``rid`` (the submitting request's id); for a job with
    ``cancel_when_unwatched``, also ``unwatched`` (those seconds) and ``seen`` (when someone last
    watched it: Redis's clock, unix ms; see ``WATCH_BEAT``)."""
    return f"{PREFIX}job:{job_id}"


# -- abandoned work (``cancel_when_unwatched``) ----------------------------------------------------
# A job with the option is watched while a server has a client on it (a job stream, a WebSocket
# subscription, a long poll; not a dashboard's every-job feed), or someone polls it. Its hash's
# ``seen`` is set to Redis's TIME (one clock for every replica and worker) by the submit
# (``scripts.CREATE``), a retry (``REOPEN``), and every ``WATCH_BEAT`` by each server for the jobs
# its clients watch or polled since its last beat (``scripts.SEEN``, ``server.watched``), and once
# more after the last one left. A worker cancels a job whose ``seen`` is more than ``unwatched`` seconds old
# (``scripts.UNWATCHED``): when it claims it, and at each lease renewal while it runs. Only time
# while the servers beat counts (``WATCHING``): after Redis was away, or while no server runs,
# nobody could watch, so no job is taken for abandoned then.
WATCH_BEAT = 1.0  # seconds between a server's marks of the jobs its clients watch
WATCH_GAP = 3 * WATCH_BEAT  # no server beat for this long: nobody could watch (Redis away, no server)
WATCHING = PREFIX + "watching"  # hash: ``last`` (ms) any server's beat, ``since`` (ms) the beats go on unbroken
UNWATCHED_MIN = 3.0  # the shortest cancel_when_unwatched: a few beats, so a watched job is never taken for abandoned
UNWATCHED_MAX = 86400.0  # the longest, when the job type sets none


def jobs_index(tenant: str) -> str:
    """Sorted set of a tenant's job ids by creation time (µs): GET /jobs and dashboards."""
    return f"{PREFIX}jobs:{tenant}"


def queued_set(tenant: str) -> str:
    """Sorted set of a tenant's jobs now queued (id -> time queued, µs): the queue cap counts it."""
    return f"{PREFIX}queued:{tenant}"


WORKERS = PREFIX + "workers"  # sorted set: live worker ids by the time of their last beat (s)


def worker_key(worker_id: str) -> str:
    """A worker's heartbeat record (``core.workers``), JSON, expiring unless renewed."""
    return f"{PREFIX}worker:{worker_id}"


def ticket_key(ticket: str) -> str:
    """A single-use stream ticket: what it may watch, for 60 s."""
    return f"{PREFIX}ticket:{ticket}"


def rate_key(bucket: str, who: str, window: int) -> str:
    return f"{PREFIX}rate:{bucket}:{who}:{window}"


SECRET_KEY = PREFIX + "secret"  # signs watch tokens when TOKEN_SECRET is not set


def result_key(job_id: str) -> str:
    return f"{PREFIX}result:{job_id}"


def tombstone_key(job_id: str) -> str:
    """Outlives the document so that an expired job answers 410, not 404."""
    return f"{PREFIX}gone:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"{PREFIX}cancel:{job_id}"


def idempotency_key(scope: str, key: str) -> str:
    """Remembers ``"<job id> <request hash>"`` for an ``Idempotency-Key`` (per tenant scope)."""
    return f"{PREFIX}idem:{scope}:{key}"


def channel(job_id: str) -> str:
    return f"{PREFIX}ev:{job_id}"


CHANNEL_PREFIX_LEN = len(channel(""))


# -- a job's log ---------------------------------------------------------------------------
# One line: ``{"seq": n, "ts": "...Z", "level": "INFO", "msg": "...", "extra": {...}}``, at most
# ``LOG_LINE_BYTES`` of JSON; ``seq`` counts a job's lines from 1 across all its attempts. The
# newest ``JOB_LOG_LINES`` are kept in a list (``log_key``) that expires with the job's document;
# the job hash keeps the last seq (field ``logseq``). Each batch appended is published on
# ``log_channel`` as ``{"job": id, "first": seq, "last": seq, "lines": [...]}``: the SSE ``data:``
# of ``event: log`` and the WebSocket's ``log``, relayed untouched.
LOG_LINE_BYTES = 4096


def log_key(job_id: str) -> str:
    return f"{PREFIX}log:{job_id}"


def log_channel(job_id: str) -> str:
    return f"{PREFIX}lg:{job_id}"


LOG_CHANNEL_PREFIX = log_channel("").encode()
assert len(LOG_CHANNEL_PREFIX) == CHANNEL_PREFIX_LEN  # the hub takes the job id at one offset


_LOG_RANGE = re.compile(rb'"first":(\d+),"last":(\d+)')
_LOG_SEQ = re.compile(rb'\{"seq":(\d+),')


def log_range(batch: bytes) -> tuple[int, int]:
    """``(first, last)`` of a published batch, read off its head without parsing the lines."""
    found = _LOG_RANGE.search(batch, 0, 120)
    return int(found[1]), int(found[2])


def log_seq(line: bytes) -> int:
    """A stored line's ``seq`` (lines start with it: ``scripts.LOG_LUA``)."""
    return int(_LOG_SEQ.match(line)[1])


def log_batch(job_id: str, lines: list[bytes]) -> bytes:
    """Stored lines (oldest first) in the wire form a batch is published in (``scripts.LOG_LUA``)."""
    return b'{"job":"%s","first":%d,"last":%d,"lines":[%s]}' % (
        job_id.encode(), log_seq(lines[0]), log_seq(lines[-1]), b",".join(lines)
    )


def log_line(level: str, message: str, extra: dict[str, Any] | None = None, ts: str | None = None) -> bytes:
    """One log line's JSON without its ``seq`` (the Lua that appends it numbers it), cut to
    ``LOG_LINE_BYTES``: first the extra fields go, then the message is shortened (with "…").
    Never raises for what job code logs: extra fields JSON cannot hold become their ``repr``, and
    text that is not valid UTF-8 (lone surrogates) is escaped."""
    line: dict[str, Any] = {"ts": ts or now_iso(), "level": level, "msg": message}
    if extra:
        line["extra"] = extra
    try:
        raw = _LOG_ENCODER.encode(line).encode("utf-8", "backslashreplace")
    except (TypeError, ValueError):  # a circular structure, say
        line["extra"] = repr(extra)[:LOG_LINE_BYTES]
        raw = _LOG_ENCODER.encode(line).encode("utf-8", "backslashreplace")
    limit = LOG_LINE_BYTES - 16  # room for '"seq":N,'
    if len(raw) > limit and "extra" in line:
        del line["extra"]
        raw = _LOG_ENCODER.encode(line).encode("utf-8", "backslashreplace")
    while len(raw) > limit:
        line["msg"] = line["msg"][: max(0, len(line["msg"]) - (len(raw) - limit) - 1)] + "…"
        raw = _LOG_ENCODER.encode(line).encode("utf-8", "backslashreplace")
    return raw


# -- groups ---------------------------------------------------------------------------------
# A group is a job whose document follows its children (``POST /jobs`` with ``group``): it is never
# run itself. Its document has type ``GROUP`` and ``children``: each child's entry (``child_entry``
# plus its status); each child's document has ``parent``, last (``parent_of``: a group's watch token
# reads its children). The group's document is
# rendered in Lua (``scripts.ROLLUP_LUA``) from ``group_template``, with each child's change.
# A running job may also have children (``ctx.spawn``): its ``group_key`` hash keeps their roll-up
# the same way, without a template, and its worker shows them in its document (``children``, and
# its own progress combined with theirs by weight: ``worker.progress``).
GROUP = "group"
MAX_GROUP = 100  # children in one group
GROUP_FIELDS = ("status", "progress", "seq", "updated_at", "started_at", "finished_at", "expires_at", "children")


def group_key(job_id: str) -> str:
    """Hash: a group's template, or a job's spawned children, and the children's states (``scripts.ROLLUP_LUA``)."""
    return f"{PREFIX}group:{job_id}"


def group_template(doc: dict[str, Any]) -> bytes:
    """A group's document JSON with each field of ``GROUP_FIELDS`` as the string ``"@name@"``."""
    return dumps({**doc, **{name: f"@{name}@" for name in GROUP_FIELDS}})


_PARENT = re.compile(rb',"parent":"(j_[A-Za-z0-9_-]{24})"\}$')


def parent_of(doc_json: bytes) -> str | None:
    """A child's parent (its group, or the job that spawned it), read off the end of its document's
    JSON (``parent`` is its last field), or None."""
    found = _PARENT.search(doc_json, max(0, len(doc_json) - 64))
    return found[1].decode() if found else None


MAX_WEIGHT = 1_000_000  # a child's weight: above 0, at most this


def is_weight(value: Any) -> bool:
    """A child's weight (in a group or spawned): a number above 0, at most ``MAX_WEIGHT``."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= MAX_WEIGHT


def child_entry(child_id: str, job_type: str, weight: float) -> bytes:
    """A child's entry in its group's ``children``, open at the end (its status follows)."""
    return dumps({"id": child_id, "type": job_type, "weight": weight})[:-1]


def spawned_id(parent_id: str, n: int) -> str:
    """The id of the ``n``-th child (from 1) that an attempt of job ``parent_id`` spawns: the same
    in every attempt, so that a job run again gets back the children its earlier attempts spawned."""
    return "j_" + base64.urlsafe_b64encode(hashlib.sha256(f"{parent_id}/{n}".encode()).digest()[:18]).decode()


def new_job_id() -> str:
    """``j_`` + 144 random bits, URL-safe."""
    return "j_" + secrets.token_urlsafe(18)


def webhook_key(job_id: str) -> str:
    """Hash with fields ``seq``, ``url`` and ``ev`` (the packed final event): what the job's newest
    pending webhook delivery sends. Written with the final state, kept until that delivery ends
    (not tied to ``RESULT_TTL``), replaced by a re-run's newer final state."""
    return f"{PREFIX}webhook:{job_id}"


def webhook_delivery_id(job_id: str, seq: int) -> str:
    """The arq job id of a webhook delivery, also its ``webhook-id``: one per final state."""
    return f"wh_{job_id}_{seq}"


WEBHOOK_FUNCTION = "_webhook"  # the worker's internal arq function that delivers webhooks


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso(seconds: float) -> str:
    """A ``time.time()`` as ``now_iso`` writes it."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def links(job_id: str) -> dict[str, str]:
    base = f"/jobs/{job_id}"
    return {"self": base, "events": base + "/events", "result": base + "/result"}


def new_document(
    job_id: str,
    job_type: str,
    created_at: str,
    message: str | None = None,
    queue: str = "default",
    priority: int = 0,
    cancel_when_unwatched: float | None = None,
) -> dict[str, Any]:
    """A queued job's document: every field of the public shape, in its public order."""
    return {
        "id": job_id,
        "type": job_type,
        "queue": queue,
        "priority": priority,
        "status": QUEUED,
        "progress": None,
        "message": message,
        "stage": None,
        "seq": 1,
        "attempt": 0,
        "created_at": created_at,
        "started_at": None,
        "updated_at": created_at,
        "finished_at": None,
        "expires_at": None,
        "cancel_when_unwatched": cancel_when_unwatched,
        "eta_s": None,
        "stalled": False,
        "error": None,
        "attempts": [],
        "links": links(job_id),
    }


MAX_ATTEMPTS_KEPT = 20  # the newest entries of a document's ``attempts``


def attempts_after(doc: dict[str, Any], outcome: str, ended_at: str) -> list[dict[str, Any]]:
    """``doc``'s ``attempts`` with its current attempt ended as ``outcome`` (succeeded, failed,
    cancelled, retrying, requeued, lost), its error's type and message kept: why a job was retried."""
    error = doc["error"] and {"type": doc["error"]["type"], "message": doc["error"]["message"]}
    entry = {"attempt": doc["attempt"], "started_at": doc["started_at"], "ended_at": ended_at, "outcome": outcome, "error": error}
    return [*doc.get("attempts", [])[-(MAX_ATTEMPTS_KEPT - 1) :], entry]


def event_name(status: str) -> str:
    """SSE ``event:`` and WebSocket ``event``: the status once terminal, else progress."""
    return status if status in TERMINAL else "progress"


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
# log lines' extra fields are whatever job code passed: what JSON cannot say becomes its str()
_LOG_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str, skipkeys=True)


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON; NaN and infinities are refused so every client can parse it.
    (One encoder for all calls: ``json.dumps`` with options builds a new one each time.)"""
    return _ENCODER.encode(obj).encode()


def with_field(doc_json: bytes, name: str, value: Any) -> bytes:
    """A document's JSON with one more field at the end, without encoding the document again."""
    return b"%s,%s:%s}" % (doc_json[:-1], dumps(name), dumps(value))


class Packed(NamedTuple):
    seq: int
    event: str
    tenant: str
    doc: bytes  # the document's JSON


def pack(doc: dict[str, Any], tenant: str) -> bytes:
    """Serialize a document once, into the event that is stored and published."""
    return b"%d %s %s\n" % (doc["seq"], event_name(doc["status"]).encode(), tenant.encode()) + dumps(doc)


def unpack(raw: bytes) -> Packed:
    """The header fields and the document JSON of a packed event, without parsing the JSON."""
    header, _, body = raw.partition(b"\n")
    seq, name, tenant = header.split(b" ", 2)
    return Packed(int(seq), name.decode(), tenant.decode(), body)


def encode_cursor(seqs: dict[str, int]) -> str:
    """Opaque resume cursor of a multi-job stream: the last seq seen of each job."""
    raw = ",".join(f"{job_id}:{seq}" for job_id, seq in seqs.items())
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> dict[str, int]:
    """Inverse of ``encode_cursor``; raises ValueError on anything malformed."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        pairs = (item.rpartition(":") for item in raw.split(",") if item)
        return {job_id: int(seq) for job_id, _, seq in pairs if job_id}
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError("malformed cursor") from e
