"""``GET /jobs/{id}/logs``: a job's log lines after a seq, as JSON or (``Accept: text/plain``) as
text. Lines come from ``ctx.log`` in the job (and the worker's word on each attempt); the newest
``JOB_LOG_LINES`` are kept, for as long as the job's document. The same lines arrive live on the
job's SSE stream with ``?logs=1`` and on the WebSocket with ``"logs": true`` (``server.events``).

``{"items": [{"seq", "ts", "level", "msg", "extra"?}, ...], "next": N, "last": L, "dropped": D}``:
pass ``next`` as ``after`` to read on; ``last`` is the newest line's seq; ``dropped`` counts lines
after ``after`` that are no longer kept.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response

from server.requests import JSONAnswer, deadline, int_param, load, reader

MAX_LINES = 1000  # per answer


@deadline
async def job_log(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    after = int_param(request, "after", 0)
    limit = int_param(request, "limit", MAX_LINES, low=1, high=MAX_LINES)
    caller = await reader(request)
    await load(request, job_id, caller)  # 404 / 410 as for the job itself
    last, first, lines = await request.app.state.store.read_log(job_id, after, limit)
    start = max(after + 1, first)
    following = start + len(lines) - 1 if lines else max(after, min(first - 1, last))  # past lines gone
    dropped = max(0, first - 1 - after)
    headers = {"Cache-Control": "no-store"}
    accept = request.headers.get("accept", "")
    if "text/plain" in accept and "json" not in accept:
        text = "".join(text_line(json.loads(line)) for line in lines)
        if dropped:
            text = f"({dropped} earlier lines no longer kept)\n" + text
        return Response(text, 200, headers, media_type="text/plain")
    body = b'{"items":[%s],"next":%d,"last":%d,"dropped":%d}' % (b",".join(lines), following, last, dropped)
    return JSONAnswer(body, 200, headers)


def text_line(line: dict) -> str:
    """``2026-12-07T10:00:00.000Z INFO  page 3 of 10``, a message's further lines indented."""
    message = line["msg"].replace("\n", "\n    ")
    return f"{line['ts']} {line['level']:<7} {message}\n"
