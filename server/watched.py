"""Who watches a job with ``cancel_when_unwatched``: one task per server process marks, every
``contract.WATCH_BEAT`` seconds and in one Redis call (``scripts.SEEN``), the jobs its clients
watch, so that a worker anywhere can tell an abandoned job (``contract``, "abandoned work").

Watching is what the hub routes per job (``Hub.watched``): a job's SSE stream, ``/events?job=``, a
WebSocket subscription, a long poll; a dashboard's every-job feed is not (it would keep every job
alive). A poll of a job with the option (``server.jobs.status``, which reads the document anyway)
is remembered (``polled``) and marked with the next beat. The per-event fan-out path does nothing
for this, nor does a poll of a job without the option: the task reads the hub's table of watched
jobs once per beat. A job without the option is asked about once, on the first beat it is
watched, and left out while it stays watched; a job whose last watcher here left is marked once
more on the next beat, so it counts as watched until then (at most one beat after the client left).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from redis.asyncio import Redis

from core import contract, scripts

log = logging.getLogger("server.watched")


class Watched:
    """The beat: ``run`` marks, every ``beat`` seconds, the jobs ``watched()`` names (the hub's)."""

    def __init__(self, redis: Redis, watched: Callable[[], Iterable[str]], beat: float = contract.WATCH_BEAT) -> None:
        self.watched = watched
        self.beat = beat
        self._seen = redis.register_script(scripts.SEEN.lua)
        self._without: set[str] = set()  # watched jobs that have no cancel_when_unwatched
        self._marked: set[str] = set()  # the jobs with the option watched on the last beat
        self._polled: set[str] = set()  # jobs with the option polled since the last beat

    def polled(self, job_id: str) -> None:
        """A poll of a job with ``cancel_when_unwatched``: marked with the next beat."""
        self._polled.add(job_id)

    async def mark(self) -> None:
        """One beat: mark the jobs watched now that may have the option, those polled since the
        last beat, and (a last time) those marked on the last beat that nobody here watches any
        more. One call, even with none: the servers' beat (``contract.WATCHING``) says that
        someone could watch."""
        now = set(self.watched())
        self._without &= now  # forget the jobs no longer watched here
        ids = (now - self._without) | self._marked | self._polled
        self._polled = set()
        keys, args = scripts.SEEN.fields(
            watching=contract.WATCHING, job_prefix=contract.job_key(""), ids=" ".join(ids), gap_ms=int(contract.WATCH_GAP * 1000)
        )
        without = {job_id.decode() for job_id in await self._seen(keys=keys, args=args)}
        self._without |= without & now
        self._marked = (ids & now) - without

    async def run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.beat)
            try:
                async with asyncio.timeout(self.beat * 2):
                    await self.mark()
            except Exception as e:  # noqa: BLE001 - Redis away: the next beat marks them again
                if not failing:
                    log.warning("marking the watched jobs failed (%r); trying every %g s", e, self.beat)
                failing = True
            else:
                failing = False
