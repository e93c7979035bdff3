"""``progress``: the terminal client (also ``python -m client``), built on ``client.Client``.

::

    progress submit demo --param steps=20 --param interval=0.2 --watch   # a live bar, then the result
    ID=$(progress submit demo --params '{"steps": 50}')                   # prints the job id
    progress watch $ID          # bar on stderr until the end; the result on stdout if it succeeded
    progress status $ID         # one line: id, type, status, progress, message, ETA, error
    progress result $ID         # the return value (JSON; a string as it is)
    progress cancel $ID         # a running job is cancelled once its worker stops it (watch it)
    progress retry $ID [--watch]
    progress list [--status S] [--type T] [--queue Q] [--limit N]
    progress types              # the job types and their params
    progress logs $ID [-f]      # the job's log lines; -f: and new ones until the job ends

Options (before or after the command): ``--url`` (env ``PROGRESS_URL``, default
http://127.0.0.1:8000), ``--api-key`` (env ``PROGRESS_API_KEY``), ``--token`` (the watch token
``submit --json`` shows; status, watch and result of that one job), ``--json`` (one JSON document
per line on stdout, no bar: job documents, list items, results), ``--quiet`` (no bar, no notes).

The bar goes to stderr so stdout holds only what a script wants (ids, results, JSON); when stderr
is not a terminal, each update is a plain line instead. ``watch`` survives a cut connection or a
server restart: ``Client.watch`` resumes from the last seq (SSE ``Last-Event-ID``, else long
polls), never repeating or going back, and gives up after a minute without a good answer.

Exit codes: 0 succeeded (or the command did what it was asked), 1 the job failed, 2 it was
cancelled (``watch``, ``submit --watch``, ``retry --watch``, ``result``), 3 a usage error, an error
answer (its problem title and detail on stderr; with ``--json`` the problem document) or no
server, 4 the job is unknown (404) or expired (410), 130 interrupted.

``logs`` prints the lines the server keeps (the newest ``JOB_LOG_LINES``) as
``time LEVEL message``, or with ``--json`` one line object per line; ``-f`` goes on printing new
lines every half second until the job has ended and its last line is printed (plain HTTP, so it
resumes across any cut by itself: it asks for the lines after the last one it printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import httpx
from tqdm import tqdm

from client import DEFAULT_URL, Client, Conflict, ProblemError

SUCCEEDED, FAILED, CANCELLED, PROBLEM, MISSING, INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT = {"succeeded": SUCCEEDED, "failed": FAILED, "cancelled": CANCELLED}
BAR = "{percentage:3.0f}%|{bar}| {elapsed} {desc}"  # desc: status, stage, message, ETA (the job's eta_s)


# -- output ------------------------------------------------------------------------------


def emit(value: Any, args: argparse.Namespace) -> None:
    """A value on stdout: JSON (one line) with ``--json``, else a string as it is, else JSON."""
    text = value if isinstance(value, str) and not args.json else json.dumps(value, ensure_ascii=False)
    print(text, flush=True)


def note(text: str, args: argparse.Namespace) -> None:
    """A human note on stderr (not with ``--json`` or ``--quiet``)."""
    if not (args.json or args.quiet):
        print(text, file=sys.stderr, flush=True)


def describe(doc: dict[str, Any], percent: bool = True) -> str:
    """``running  42%  [render]  step 17 of 40  ETA 6s``, and the error of a failed job."""
    parts = [doc["status"]]
    if percent and doc.get("progress") is not None:
        parts.append(f"{doc['progress']:3.0f}%")
    if doc.get("stage"):
        parts.append(f"[{doc['stage']}]")
    if doc.get("message"):
        parts.append(doc["message"][:80])
    if doc.get("eta_s") is not None and doc["status"] == "running":
        parts.append(f"ETA {doc['eta_s']:.0f}s")
    if doc.get("error"):
        parts.append(f"error: {doc['error'].get('type')}: {doc['error'].get('message')}")
    return "  ".join(parts)


def row(doc: dict[str, Any]) -> str:
    return f"{doc['id']}  {doc['type']}  {describe(doc)}"


# -- commands ----------------------------------------------------------------------------


def follow(client: Client, doc: dict[str, Any], args: argparse.Namespace) -> int:
    """Watch a job from ``doc`` (a document of it already shown) to its end; its exit code."""
    bar = None
    if not (args.json or args.quiet) and sys.stderr.isatty():
        bar = tqdm(total=100, file=sys.stderr, bar_format=BAR, dynamic_ncols=True, leave=False)
    try:
        for doc in client.watch(doc["id"], since=doc["seq"]):
            if args.json:
                emit(doc, args)
            elif bar is not None:
                bar.n = doc["progress"] if doc.get("progress") is not None else bar.n
                bar.set_description_str(describe(doc, percent=False))  # redraws
            else:
                note(describe(doc), args)
    finally:
        if bar is not None:
            bar.close()
    if doc["status"] not in EXIT:  # the watch had nothing newer: ask
        doc = client.status(doc["id"])
    if bar is not None:  # the bar is gone: the final state stays
        note(describe(doc), args)
    if doc["status"] == "succeeded" and not args.json:
        emit(client.result(doc["id"]), args)
    return EXIT.get(doc["status"], PROBLEM)


def submit(client: Client, args: argparse.Namespace) -> int:
    try:
        params = json.loads(args.params) if args.params else {}
    except ValueError as e:
        raise Usage(f"--params is not JSON: {e}") from None
    if not isinstance(params, dict):
        raise Usage("--params must be a JSON object")
    for pair in args.param:
        name, eq, value = pair.partition("=")
        if not eq:
            raise Usage(f"--param {pair!r}: expected NAME=VALUE")
        try:
            params[name] = json.loads(value)  # 20, 0.5, true, null, [1,2], "x" ...
        except ValueError:
            params[name] = value  # ... or a plain string
    doc = client.submit(args.type, params, priority=args.priority)
    return started(client, doc, args)


def started(client: Client, doc: dict[str, Any], args: argparse.Namespace) -> int:
    """After submit or retry: the document (``--json``) or the id; then the watch if asked."""
    if args.json:
        emit(doc, args)
    elif args.watch:
        note(doc["id"], args)
    else:
        emit(doc["id"], args)
    return follow(client, doc, args) if args.watch else SUCCEEDED


def watch(client: Client, args: argparse.Namespace) -> int:
    return follow(client, {"id": args.id, "seq": 0, "status": None}, args)


def status(client: Client, args: argparse.Namespace) -> int:
    doc = client.status(args.id)
    emit(doc if args.json else row(doc), args)
    return SUCCEEDED


def result(client: Client, args: argparse.Namespace) -> int:
    try:
        emit(client.result(args.id), args)
    except Conflict as e:
        if e.job_status not in ("failed", "cancelled"):
            raise
        complain(e, args)
        return EXIT[e.job_status]
    return SUCCEEDED


def cancel(client: Client, args: argparse.Namespace) -> int:
    doc = client.cancel(args.id)
    running = doc["status"] == "running"
    emit(doc if args.json else f"{doc['id']}  {'cancelling (the worker stops it)' if running else doc['status']}", args)
    return SUCCEEDED


def retry(client: Client, args: argparse.Namespace) -> int:
    return started(client, client.retry(args.id), args)


def list_jobs(client: Client, args: argparse.Namespace) -> int:
    shown, cursor = 0, None
    while shown < args.limit:  # pages until --limit jobs (a filtered page may come short)
        page = client.list_jobs(status=args.status, type=args.type, queue=args.queue, limit=min(100, args.limit - shown), cursor=cursor)
        for doc in page["items"]:
            emit(doc if args.json else row(doc), args)
        shown, cursor = shown + len(page["items"]), page["next"]
        if cursor is None:
            break
    return SUCCEEDED


FOLLOW_EVERY = 0.5  # seconds between reads of ``logs -f``


def logs(client: Client, args: argparse.Namespace) -> int:
    after = args.after
    while True:
        ended = args.follow and client.status(args.id)["status"] in EXIT  # read first: no line is missed
        page = client.logs(args.id, after=after)
        if page["dropped"]:
            note(f"({page['dropped']} earlier lines are no longer kept)", args)
        for line in page["items"]:
            emit(line if args.json else f"{line['ts']} {line['level']:<7} {line['msg']}", args)
        after = page["next"]
        if page["items"] and after < page["last"]:
            continue  # more stored than one page
        if not args.follow or ended:
            return SUCCEEDED
        time.sleep(FOLLOW_EVERY)


def types(client: Client, args: argparse.Namespace) -> int:
    for t in client.job_types():
        params = ", ".join(t.get("params_schema", {}).get("properties", {}))
        emit(t if args.json else f"{t['name']}({params})  {t.get('description') or ''}".rstrip(), args)
    return SUCCEEDED


# -- arguments and errors ----------------------------------------------------------------


class Usage(Exception):
    """A bad argument found after parsing (exit 3, like argparse's own)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2, which here means "cancelled"
        self.print_usage(sys.stderr)
        self.exit(PROBLEM, f"{self.prog}: error: {message}\n")


DEFAULTS = {"url": None, "api_key": None, "token": None, "json": False, "quiet": False}


def parser() -> Parser:
    # The shared options, on the program and on each command, so they go before or after it.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--url", help=f"the server (env PROGRESS_URL, default {DEFAULT_URL})")
    common.add_argument("--api-key", help="API key (env PROGRESS_API_KEY)")
    common.add_argument("--token", help="a job's watch token, instead of the API key")
    common.add_argument("--json", action="store_true", help="JSON lines on stdout, no bar")
    common.add_argument("--quiet", "-q", action="store_true", help="no bar and no notes on stderr")
    top = Parser(prog="progress", description="The terminal client of the progress server.", parents=[common])
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Any, help: str, job_id: bool = False) -> argparse.ArgumentParser:
        p = commands.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(run=run)
        if job_id:
            p.add_argument("id", help="the job id")
        return p

    p = command("submit", submit, "submit a job: prints its id (--watch: its progress, then its result)")
    p.add_argument("type", help="the job type (see: progress types)")
    p.add_argument("--param", "-p", action="append", default=[], metavar="NAME=VALUE", help="VALUE: JSON, or a string")
    p.add_argument("--params", metavar="JSON", help="all params as a JSON object (--param adds to it)")
    p.add_argument("--priority", type=int, choices=range(10), metavar="0-9", help="higher starts first in its queue (default: the type's)")
    p.add_argument("--watch", "-w", action="store_true", help="watch it to the end (exit code: its final state)")
    command("watch", watch, "a live bar until the job ends; its result if it succeeded", job_id=True)
    command("status", status, "the job's current state, one line", job_id=True)
    command("result", result, "the return value of a succeeded job", job_id=True)
    command("cancel", cancel, "cancel a queued or running job", job_id=True)
    p = command("retry", retry, "run a failed or cancelled job again", job_id=True)
    p.add_argument("--watch", "-w", action="store_true", help="watch it to the end (exit code: its final state)")
    p = command("list", list_jobs, "jobs, newest first")
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.add_argument("--type")
    p.add_argument("--queue")
    p.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    command("types", types, "the job types and their params")
    p = command("logs", logs, "the job's log lines (-f: and new ones until the job ends)", job_id=True)
    p.add_argument("--follow", "-f", action="store_true", help="print new lines as they come, until the job ends")
    p.add_argument("--after", type=int, default=0, help="only lines after this seq")
    return top


def complain(error: ProblemError, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(error.body), file=sys.stderr, flush=True)
        return
    fields = [f"{e.get('field')}: {e.get('message')}" for e in error.errors]
    lines = [f"progress: {error}"] + [f"  {f}" for f in fields if f not in (error.detail or "")]
    print("\n".join(lines), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for name, default in DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    args.url = args.url or os.environ.get("PROGRESS_URL") or DEFAULT_URL
    api_key = None if args.token else args.api_key or os.environ.get("PROGRESS_API_KEY") or None
    try:
        with Client(args.url, api_key=api_key, token=args.token) as client:
            return args.run(client, args)
    except Usage as e:
        print(f"progress: {e}", file=sys.stderr)
        return PROBLEM
    except ProblemError as e:
        complain(e, args)
        return MISSING if e.status in (404, 410) else PROBLEM
    except httpx.HTTPError as e:
        print(f"progress: no answer from {args.url}: {e!r}", file=sys.stderr)
        return PROBLEM
    except KeyboardInterrupt:
        return INTERRUPTED
