"""The shared contract, without I/O: document shape, event packing, ids, cursors."""

import asyncio
import json
import re

import pytest

from core import contract
from server.events import Event, Mailbox

PUBLIC_FIELDS = [
    "id", "type", "queue", "priority", "status", "progress", "message", "stage", "seq", "attempt", "created_at",
    "started_at", "updated_at", "finished_at", "expires_at", "cancel_when_unwatched", "eta_s", "stalled", "error", "attempts", "links",
]  # fmt: skip


def test_new_document_has_the_public_shape():
    """A new document carries every public field, queued at seq 1, with its links."""
    doc = contract.new_document("j_x", "demo", "2026-01-01T00:00:00.000Z")
    assert list(doc) == PUBLIC_FIELDS
    assert (doc["status"], doc["seq"], doc["progress"]) == ("queued", 1, None)
    assert doc["links"] == {"self": "/jobs/j_x", "events": "/jobs/j_x/events", "result": "/jobs/j_x/result"}


def test_pack_unpack_round_trip_keeps_document_bytes():
    """The packed event carries seq and event name in a header and the JSON untouched."""
    doc = contract.new_document("j_x", "demo", contract.now_iso()) | {"status": "failed", "seq": 7}
    seq, name, tenant, body = contract.unpack(contract.pack(doc, "acme"))
    assert (seq, name, tenant) == (7, "failed", "acme")
    assert json.loads(body) == doc
    assert body == contract.dumps(doc)


def test_with_field_appends_a_field_to_document_json():
    doc = contract.new_document("j_x", "demo", contract.now_iso())
    spliced = contract.with_field(contract.dumps(doc), "token", 'v1.j_x."é')
    assert json.loads(spliced) == {**doc, "token": 'v1.j_x."é'}
    assert list(json.loads(spliced))[-1] == "token"


def test_event_name_is_progress_until_terminal():
    assert [contract.event_name(s) for s in contract.STATES] == ["progress", "progress", "succeeded", "failed", "cancelled"]


def test_dumps_refuses_nan():
    with pytest.raises(ValueError):
        contract.dumps({"progress": float("nan")})


def test_job_ids_are_random_url_safe_and_unique():
    """144 random bits, URL-safe alphabet, no repeats in 10,000."""
    ids = {contract.new_job_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(re.fullmatch(r"j_[A-Za-z0-9_-]{24}", i) for i in ids)


def test_cursor_round_trip_and_malformed_cursor():
    seqs = {"j_a": 3, "j_b:x": 10}
    assert contract.decode_cursor(contract.encode_cursor(seqs)) == seqs
    with pytest.raises(ValueError):
        contract.decode_cursor("!!!not-base64")


def test_iso_timestamps_are_utc_milliseconds():
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", contract.now_iso())


def event(job_id: str, seq: int, status: str = "running") -> Event:
    doc = contract.new_document(job_id, "demo", "t") | {"seq": seq, "status": status}
    return Event(job_id, contract.pack(doc, ""))


def test_event_frames_once_per_transport():
    """SSE frame and WebSocket text are built from the same bytes, once."""
    ev = event("j_a", 5, "succeeded")
    assert ev.sse.startswith(b"id: 5\nevent: succeeded\ndata: {") and ev.sse.endswith(b"}\n\n")
    assert ev.sse is ev.sse
    msg = json.loads(ev.ws)
    assert msg["event"] == "succeeded" and msg["job"]["seq"] == 5


@pytest.mark.anyio
async def test_mailbox_keeps_newest_per_job_and_never_goes_back():
    """A slow reader skips to the newest document; older or repeated seqs are dropped."""
    box = Mailbox()
    for seq in (2, 3, 4):
        box.put(event("j_a", seq))
    box.put(event("j_b", 2))
    box.put(event("j_a", 3))  # older than what is pending: dropped
    assert box.conflated == 2
    first, second = await box.get(), await box.get()
    assert (first.job_id, first.seq) == ("j_a", 4)
    assert (second.job_id, second.seq) == ("j_b", 2)
    box.put(event("j_a", 4))  # already delivered: dropped
    box.put(event("j_a", 5, "succeeded"))
    assert (await box.get()).seq == 5


@pytest.mark.anyio
async def test_mailbox_expect_skips_what_the_client_has():
    box = Mailbox()
    box.expect("j_a", 10)
    box.put(event("j_a", 10))
    box.put(event("j_a", 11))
    assert (await box.get()).seq == 11


def test_event_ws_frame_and_sse_chunk_are_whole_frames():
    """The pre-framed bytes written by core.fastpath.direct: an unmasked final text frame with the
    right length form, and one HTTP/1.1 chunk holding the SSE frame."""
    for size in (10, 200, 70_000):  # 7-bit, 16-bit and 64-bit payload lengths
        doc = contract.new_document("j_a", "demo", "t") | {"seq": 3, "message": "x" * size}
        ev = Event("j_a", contract.pack(doc, ""))
        payload = ev.ws.encode()
        frame = ev.ws_frame
        assert frame[0] == 0x81 and not frame[1] & 0x80  # FIN + text, no mask
        length, start = frame[1], 2
        if length == 126:
            length, start = int.from_bytes(frame[2:4], "big"), 4
        elif length == 127:
            length, start = int.from_bytes(frame[2:10], "big"), 10
        assert length == len(payload) and frame[start:] == payload
        size_line, _, rest = ev.sse_chunk.partition(b"\r\n")
        assert int(size_line, 16) == len(ev.sse) and rest == ev.sse + b"\r\n"


@pytest.mark.anyio
async def test_mailbox_writes_directly_only_to_an_idle_consumer():
    """put() hands an event to the direct writer only while the consumer waits on an empty
    mailbox; a refused write, anything queued, and final events take the mailbox."""
    box = Mailbox()
    written: list[int] = []
    accept = True

    def write(ev: Event) -> bool:
        if accept:
            written.append(ev.seq)
        return accept

    box.direct = write
    box.put(event("j_a", 1))  # no consumer waiting yet: queued
    assert written == [] and (await box.get()).seq == 1
    consumer = asyncio.ensure_future(box.get())
    await asyncio.sleep(0)  # the consumer now waits
    box.put(event("j_a", 2))
    assert written == [2] and not consumer.done()
    accept = False  # e.g. the socket has unsent bytes
    box.put(event("j_a", 3))
    assert (await consumer).seq == 3
    consumer = asyncio.ensure_future(box.get())
    await asyncio.sleep(0)
    accept = True
    box.put(event("j_a", 4, "succeeded"))  # final: the consumer must see it
    assert (await consumer).seq == 4 and written == [2]


def test_the_standalone_client_knows_the_same_final_states():
    """client/ needs only httpx (a receiver may copy the file), so it repeats this one fact."""
    import client

    assert client.TERMINAL == contract.TERMINAL


def test_log_line_is_json_without_seq_and_cut_to_its_bound():
    line = json.loads(contract.log_line("INFO", "page 3\nof 10", {"page": 3, "when": object}))
    assert line["level"] == "INFO" and line["msg"] == "page 3\nof 10" and line["extra"]["page"] == 3
    assert line["extra"]["when"].startswith("<class")  # what JSON cannot say: its str()
    long = contract.log_line("INFO", "x" * 10_000, {"k": "v" * 5_000})
    assert len(long) <= contract.LOG_LINE_BYTES - 16 and json.loads(long)["msg"].endswith("…")
    big_extra = json.loads(contract.log_line("INFO", "a message of 100 characters " * 4, {"k": "v" * 10_000}))
    assert "extra" not in big_extra and big_extra["msg"] == "a message of 100 characters " * 4  # the extra goes first
    loop: dict = {}
    loop["self"] = loop
    odd = [json.loads(contract.log_line("INFO", m, e)) for m, e in [("bad \udc80 bytes", None), ("keys", {1: "a", (2, 3): "b"}), ("loop", loop)]]
    assert odd[0]["msg"] == "bad \udc80 bytes"  # as a JSON escape: valid UTF-8 on the wire, the text round-trips
    assert odd[1]["extra"] == {"1": "a"} and odd[2]["extra"].startswith("{'self'")


def batch(job_id: str, first: int, last: int) -> bytes:
    lines = [b'{"seq":%d,"ts":"t","level":"INFO","msg":"line %d"}' % (i, i) for i in range(first, last + 1)]
    return contract.log_batch(job_id, lines)


@pytest.mark.anyio
async def test_mailbox_gives_log_lines_in_order_before_events_and_never_twice():
    mailbox = Mailbox()
    queue = mailbox.watch_logs(100)
    queue.expect("j_a", 2)
    mailbox.put(event("j_a", 5))
    mailbox.put_log("j_a", batch("j_a", 1, 2))  # the client has these
    mailbox.put_log("j_a", batch("j_a", 2, 4))  # overlaps: 3 and 4 kept
    mailbox.put_log("j_a", batch("j_a", 5, 5))
    first = await mailbox.get()
    assert (first.name, first.first, first.last) == ("log", 3, 4)
    assert [line["seq"] for line in json.loads(first.body)["lines"]] == [3, 4]
    assert json.loads((await mailbox.get()).ws)["log"]["first"] == 5
    assert (await mailbox.get()).seq == 5  # then the event


@pytest.mark.anyio
async def test_a_slow_readers_log_lines_are_bounded_and_the_oldest_become_one_gap():
    mailbox = Mailbox()
    queue = mailbox.watch_logs(10)
    for first in range(1, 31, 3):  # 30 lines in batches of 3
        mailbox.put_log("j_a", batch("j_a", first, first + 2))
    assert queue.lines <= 10
    gap = await mailbox.get()
    assert (gap.name, gap.first) == ("log-gap", 1) and json.loads(gap.body) == {"job": "j_a", "first": 1, "last": gap.last}
    rest = [await mailbox.get() for _ in range(len(queue.entries))]
    assert [(e.first, e.last) for e in rest] == [(n, n + 2) for n in range(gap.last + 1, 31, 3)]  # contiguous after it


@pytest.mark.anyio
async def test_stored_log_lines_go_before_live_ones_that_raced_them():
    mailbox = Mailbox()
    queue = mailbox.watch_logs(100)
    queue.expect("j_a", 2)
    queue.start_snapshot("j_a")
    mailbox.put_log("j_a", batch("j_a", 7, 8))  # live, arrived before the stored lines were read: held
    assert not queue  # nothing to send before the stored lines
    stored = json.loads(batch("j_a", 4, 8))["lines"]  # lines 1-3 no longer kept
    mailbox.log_snapshot("j_a", [json.dumps(line, separators=(",", ":")).encode() for line in stored], 4)
    got = [await mailbox.get() for _ in range(3)]
    assert [(e.name, e.first, e.last) for e in got] == [("log-gap", 3, 3), ("log", 4, 6), ("log", 7, 8)]
    mailbox.put_log("j_a", batch("j_a", 8, 9))  # then only what is new
    assert [(e.first, e.last) for e in [await mailbox.get()]] == [(9, 9)]


@pytest.mark.anyio
async def test_a_slow_readers_gaps_are_one_per_job_however_jobs_interleave():
    mailbox = Mailbox()
    queue = mailbox.watch_logs(10)
    for n in range(1, 61, 2):  # two jobs' batches of two lines, interleaved
        mailbox.put_log("j_a", batch("j_a", n, n + 1))
        mailbox.put_log("j_b", batch("j_b", n, n + 1))
    gaps = [e for e in queue.entries if e.gap]
    assert len(gaps) == 2 and len(queue.entries) <= 2 + 10 // 2 + 1 and queue.lines <= 10
    got = [await mailbox.get() for _ in range(len(queue.entries))]
    for job in ("j_a", "j_b"):  # each job's lines: a gap from 1, then contiguous batches to 60
        mine = [(e.first, e.last) for e in got if e.job_id == job]
        assert mine[0][0] == 1 and mine[-1][1] == 60 and all(a[1] + 1 == b[0] for a, b in zip(mine, mine[1:])), mine
