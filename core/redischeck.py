"""What the Redis in use keeps, and what it would lose: checked by server and worker at start.

Two settings of a Redis server silently break our promises:

* ``maxmemory-policy`` other than ``noeviction``: under memory pressure Redis evicts keys, and
  every key of ours (queued jobs, documents) carries a TTL, so even the ``volatile-*`` policies
  may drop an accepted job. With ``noeviction`` a full Redis refuses writes instead (a ``503``).
* no persistence: with neither AOF nor a replica, a Redis crash loses what was written since the
  last RDB snapshot (or everything, without snapshots), accepted jobs included.

``facts`` reads them with ``INFO`` (allowed on managed services that disable ``CONFIG``) and,
where it is allowed, ``CONFIG GET`` for what ``INFO`` does not say (RDB ``save`` points,
``appendfsync``). Each process logs one warning per problem at start; ``/readyz`` shows the facts.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

log = logging.getLogger("server")


async def facts(redis: Redis) -> dict[str, Any]:
    """``maxmemory_policy``, ``aof``, ``appendfsync``, ``rdb_save``, ``replicas`` and
    ``warnings`` (what can be lost, one sentence each). ``appendfsync``/``rdb_save`` are None
    where ``CONFIG`` is disabled."""
    info = await redis.info()
    config: dict[str, str] = {}
    try:
        for name in ("save", "appendfsync"):
            config.update(await redis.config_get(name))
    except ResponseError:  # CONFIG renamed or disabled (managed services)
        pass
    found = {
        "maxmemory_policy": info.get("maxmemory_policy"),
        "aof": bool(info.get("aof_enabled")),
        "appendfsync": config.get("appendfsync"),
        "rdb_save": config.get("save"),
        "replicas": int(info.get("connected_slaves", 0)),
    }
    return {**found, "warnings": warnings(found)}


def warnings(found: dict[str, Any]) -> list[str]:
    out = []
    policy = found["maxmemory_policy"]
    if policy != "noeviction":
        out.append(
            f"Redis maxmemory-policy is {policy}: under memory pressure it evicts keys, queued jobs and job "
            "documents among them, so a job accepted with 202 can be lost; set maxmemory-policy noeviction"
        )
    if not found["aof"] and not found["replicas"]:
        if found["rdb_save"]:
            lost = f"what was written since the last RDB snapshot (save {found['rdb_save']!r})"
        elif found["rdb_save"] is None:
            lost = "what was written since the last RDB snapshot, if snapshots are configured"
        else:
            lost = "everything (no RDB snapshots either)"
        out.append(
            f"Redis has neither AOF nor a replica: a Redis crash or restart loses {lost}, accepted jobs, "
            "progress and final states included; set appendonly yes (appendfsync everysec)"
        )
    elif found["aof"] and found["appendfsync"] == "no":
        out.append("Redis AOF has appendfsync no: an OS crash may lose about 30 s of writes; use everysec")
    return out


async def check(redis: Redis, who: str) -> dict[str, Any] | None:
    """``facts``, with each warning logged once; None (and a warning) if Redis cannot say."""
    try:
        found = await facts(redis)
    except Exception as e:  # noqa: BLE001 - Redis not there yet: the process starts anyway
        log.warning("%s: could not check the Redis settings (%s)", who, e)
        return None
    for warning in found["warnings"]:
        log.warning("%s: %s", who, warning)
    return found
