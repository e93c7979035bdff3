"""The contract shared by server and worker: job document, event format, Redis layout.

Everything here is pure (no I/O) and is the single definition of each fact:

* the job document's shape (``new_document``), which is the body of status answers,
  the SSE ``data:``, the WebSocket ``job`` and the webhook payload;
* the event as stored and published: ``b"<seq> <event> <tenant>\\n" + <document JSON>``. The
  short header lets a server route, order and authorise an event without parsing the JSON,
  and the document bytes are relayed to every client untouched;
* the Redis keys and channels, all under the ``progress:`` prefix (arq keeps ``arq:*``);
* the Lua script through which every change of a job document goes (compare-and-set on
  ``seq``, store and publish in one atomic step).
"""

from __future__ import annotations

import base64
import json
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
    (JSON), ``webhook`` and ``rid`` (the submitting request's id)."""
    return f"{PREFIX}job:{job_id}"


def jobs_index(tenant: str) -> str:
    """Sorted set of a tenant's job ids by creation time (µs): GET /jobs and dashboards."""
    return f"{PREFIX}jobs:{tenant}"


def queued_set(tenant: str) -> str:
    """Sorted set of a tenant's jobs now queued (id -> time queued, µs): the queue cap counts it."""
    return f"{PREFIX}queued:{tenant}"


WORKERS = PREFIX + "workers"  # sorted set: live worker ids by the time of their last beat (s)


def worker_key(worker_id: str) -> str:
    """A worker's heartbeat record (``server.workers``), JSON, expiring unless renewed."""
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


def links(job_id: str) -> dict[str, str]:
    base = f"/jobs/{job_id}"
    return {"self": base, "events": base + "/events", "result": base + "/result"}


def new_document(job_id: str, job_type: str, created_at: str, message: str | None = None) -> dict[str, Any]:
    """A queued job's document: every field of the public shape, in its public order."""
    return {
        "id": job_id,
        "type": job_type,
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
        "eta_s": None,
        "stalled": False,
        "error": None,
        "links": links(job_id),
    }


def event_name(status: str) -> str:
    """SSE ``event:`` and WebSocket ``event``: the status once terminal, else progress."""
    return status if status in TERMINAL else "progress"


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


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


# The one write path for a job document (both server and worker call it).
# KEYS: job hash, tombstone, result, arq queue, arq job key of the webhook delivery, tenant's queued set,
#       webhook payload (``webhook_key``)
# ARGV: expected seq, new seq, new state, packed event, channel, ttl (s) of the document,
#       terminal (1/0), tombstone ttl (s), result JSON ('' for none),
#       webhook delivery arq payload, its ttl (ms), enqueue time (ms), delivery id, wake channel,
#       job id, now (µs), tenant (kept in the tombstone, so a foreign expired job stays a 404)
# Returns {1, seq} when written; {0, current seq, current state} when refused because the
# stored seq is not the expected one, or the job is already terminal (no change after the end).
# A final state of a job that has a webhook enqueues its delivery in the same step, and captures
# what it will send (URL and event) for as long as the delivery may run.
WRITE_SCRIPT = """
local cur = redis.call('HMGET', KEYS[1], 'seq', 'state', 'webhook')
local seq = tonumber(cur[1]) or 0
local state = cur[2] or ''
if seq ~= tonumber(ARGV[1]) or state == 'succeeded' or state == 'failed' or state == 'cancelled' then
  return {0, seq, state}
end
redis.call('HSET', KEYS[1], 'seq', ARGV[2], 'state', ARGV[3], 'ev', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[6])
if ARGV[3] == 'queued' then
  redis.call('ZADD', KEYS[6], ARGV[16], ARGV[15])
else
  redis.call('ZREM', KEYS[6], ARGV[15])
end
if ARGV[7] == '1' then
  redis.call('SET', KEYS[2], ARGV[17], 'EX', ARGV[8])
  if ARGV[9] ~= '' then
    redis.call('SET', KEYS[3], ARGV[9], 'EX', ARGV[6])
  end
  if cur[3] then
    redis.call('HSET', KEYS[7], 'seq', ARGV[2], 'url', cur[3], 'ev', ARGV[4])
    redis.call('PEXPIRE', KEYS[7], ARGV[11])
    redis.call('SET', KEYS[5], ARGV[10], 'PX', ARGV[11])
    redis.call('ZADD', KEYS[4], ARGV[12], ARGV[13])
    redis.call('PUBLISH', ARGV[14], ARGV[13])
  end
end
redis.call('PUBLISH', ARGV[5], ARGV[4])
return {1, tonumber(ARGV[2])}
"""


# A webhook delivery that has ended (delivered, or given up) drops the payload it sent, unless a
# newer final state has replaced it meanwhile. KEYS: webhook payload. ARGV: the delivery's seq.
WEBHOOK_DONE_SCRIPT = """
if redis.call('HGET', KEYS[1], 'seq') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# Running a failed or cancelled job again (POST /jobs/{id}/retry): back to queued, re-enqueued.
# KEYS: job hash, tombstone, result, arq job key, arq queue, tenant's queued set, arq in-progress key
# ARGV: expected seq, new seq, packed event, channel, document ttl (s), arq payload,
#       arq job ttl (ms), enqueue time (ms), wake channel, job id, now (µs)
# Returns {1, seq} or {0, current seq, current state}; refused too while arq is still finishing
# the last attempt (its cleanup would delete the job we enqueue).
REOPEN_SCRIPT = """
local cur = redis.call('HMGET', KEYS[1], 'seq', 'state')
local seq = tonumber(cur[1]) or 0
if seq ~= tonumber(ARGV[1]) or (cur[2] ~= 'failed' and cur[2] ~= 'cancelled') then
  return {0, seq, cur[2] or ''}
end
if redis.call('EXISTS', KEYS[7]) == 1 then return {0, seq, 'busy'} end
redis.call('HSET', KEYS[1], 'seq', ARGV[2], 'state', 'queued', 'ev', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('SET', KEYS[4], ARGV[6], 'PX', ARGV[7])
redis.call('ZADD', KEYS[5], ARGV[8], ARGV[10])
redis.call('ZADD', KEYS[6], ARGV[11], ARGV[10])
redis.call('PUBLISH', ARGV[4], ARGV[3])
redis.call('PUBLISH', ARGV[9], ARGV[10])
return {1, tonumber(ARGV[2])}
"""


# Creating a job: the document, the index entry and arq's job + queue entry, all or nothing.
# Idempotent, so a retry after a lost reply changes nothing: the id is already there, and that
# is checked first, before the rate counter (redis-py re-sends a whole pipeline). With an
# idempotency key, a key seen before returns what it remembers ("<job id> <request hash>")
# instead of creating anything, so concurrent identical requests make exactly one job. A tenant
# with ``queue cap`` jobs already queued gets -1 and nothing is written.
# The submit rate limit is counted here too (as ratelimit.COUNT_SCRIPT does), so a submit is
# one round trip; over the limit it returns -2 and writes nothing else.
# KEYS: job hash, jobs index, arq job key, arq queue, idempotency key, tenant's queued set,
#       the caller's submit-rate counter of this window
# ARGV: job id, type, packed event, document ttl (s), index score, index trim-below score,
#       arq job payload, arq job ttl (ms), enqueue time (ms), channel, wake channel,
#       params JSON, webhook URL ('' for none), idempotency value ('' for no key), its ttl (s),
#       queue cap (0: none), queued-set trim-below score (entries of jobs that expired queued),
#       request id (for the worker's logs), submit rate limit, its window (s)
CREATE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local submits = redis.call('INCR', KEYS[7])
if submits == 1 then redis.call('EXPIRE', KEYS[7], ARGV[20]) end
if submits > tonumber(ARGV[19]) then return -2 end
if ARGV[14] ~= '' then
  local prior = redis.call('GET', KEYS[5])
  if prior then return prior end
end
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', ARGV[17])
if tonumber(ARGV[16]) > 0 and redis.call('ZCARD', KEYS[6]) >= tonumber(ARGV[16]) then return -1 end
if ARGV[14] ~= '' then redis.call('SET', KEYS[5], ARGV[14], 'EX', ARGV[15]) end
redis.call('HSET', KEYS[1], 'seq', 1, 'state', 'queued', 'type', ARGV[2], 'ev', ARGV[3], 'params', ARGV[12], 'rid', ARGV[18])
if ARGV[13] ~= '' then redis.call('HSET', KEYS[1], 'webhook', ARGV[13]) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[6])
redis.call('ZADD', KEYS[6], ARGV[5], ARGV[1])
redis.call('SET', KEYS[3], ARGV[7], 'PX', ARGV[8])
redis.call('ZADD', KEYS[4], ARGV[9], ARGV[1])
redis.call('PUBLISH', ARGV[10], ARGV[3])
redis.call('PUBLISH', ARGV[11], ARGV[1])
return 1
"""


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
