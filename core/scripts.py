"""The Lua scripts, each defined once with named fields.

A ``Script`` names its keys and arguments; its Lua source starts with a prelude that binds each
name (``local job = KEYS[1]``, ``local seq = ARGV[2]``, ...), and a call passes them by name
(``WRITE.fields(job=..., seq=...)``), so a field cannot be misplaced between the two. Every
document change goes through ``WRITE``: a compare-and-set on ``seq`` that stores the packed event
and publishes the same bytes in one atomic step. ``tests/test_scripts.py`` runs each against a
real server, twice where a retry may send it twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from core.queue import AFTER_LUA, ENQUEUE_LUA


@dataclass(frozen=True)
class Script:
    keys: tuple[str, ...]
    args: tuple[str, ...]
    body: str
    prefix: str = ""  # Lua shared with other scripts (e.g. ``queue.ENQUEUE_LUA``)

    @property
    def lua(self) -> str:
        bind = [f"local {name} = KEYS[{i}]" for i, name in enumerate(self.keys, 1)]
        bind += [f"local {name} = ARGV[{i}]" for i, name in enumerate(self.args, 1)]
        return "\n".join(bind) + "\n" + self.prefix + self.body

    def fields(self, **values: Any) -> tuple[list[Any], list[Any]]:
        """``(keys, args)`` in the script's order; every field given, and no other."""
        if len(values) == len(self.keys) + len(self.args):
            try:
                return [values[name] for name in self.keys], [values[name] for name in self.args]
            except KeyError:
                pass
        names = set(self.keys + self.args)
        raise TypeError(f"script fields: missing {sorted(names - set(values))}, unknown {sorted(set(values) - names)}")


# Redis's clock in unix ms: every replica and worker reads one clock for ``seen`` (when someone last
# watched a job with ``cancel_when_unwatched``: ``contract.WATCH_BEAT``).
TIME_LUA = r"""
local function time_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""


# Appends lines to a job's log (``contract.log_key``): ``lines`` holds one JSON object per line
# (``contract.log_line``, without "seq"), "\n" between them; they are numbered on from the job's
# stored ``logseq`` (so seqs have no holes), the newest ``max`` kept, the list given the job
# document's TTL, and the batch published on ``log_channel`` in its wire form (``contract``).
# ``base``: the stored seq the writer expects (-1: unknown); a call whose lines are already there
# (stored = base + count: a pipeline sent again) appends nothing. A job without a document
# (expired) gets no log. Returns the last seq (-1: no job).
LOG_LUA = r"""
local function append_log(job, log, log_channel, job_id, base, lines, max)
  local ttl = redis.call('PTTL', job)
  if ttl == -2 then return -1 end
  local stored = tonumber(redis.call('HGET', job, 'logseq') or '0')
  local out = {}
  for line in string.gmatch(lines, '[^\n]+') do out[#out + 1] = line end
  if #out == 0 or (tonumber(base) >= 0 and stored == tonumber(base) + #out) then return stored end
  for i, line in ipairs(out) do out[i] = '{"seq":' .. (stored + i) .. ',' .. string.sub(line, 2) end
  local seq = stored + #out
  for i = 1, #out, 500 do redis.call('RPUSH', log, unpack(out, i, math.min(i + 499, #out))) end
  redis.call('LTRIM', log, -tonumber(max), -1)
  if ttl > 0 then redis.call('PEXPIRE', log, ttl) end
  redis.call('HSET', job, 'logseq', seq)
  redis.call('PUBLISH', log_channel, '{"job":"' .. job_id .. '","first":' .. (seq - #out + 1) .. ',"last":' .. seq
    .. ',"lines":[' .. table.concat(out, ',') .. ']}')
  return seq
end
"""

LOG = Script(
    keys=("job", "log", "log_channel"),
    args=("job_id", "base", "lines", "max"),
    prefix=LOG_LUA,
    body="""
return append_log(job, log, log_channel, job_id, base, lines, max)
""",
)


# Reading a job's log: up to ``limit`` lines after seq ``after``. Returns {last seq, first seq
# kept, {lines...}}: lines before "first" are gone (only the newest JOB_LOG_LINES are kept).
LOG_READ = Script(
    keys=("job", "log"),
    args=("after", "limit"),
    body="""
local last = tonumber(redis.call('HGET', job, 'logseq') or '0')
local first = last - redis.call('LLEN', log) + 1
local from = math.max(tonumber(after) + 1, first)
if from > last then return {last, first, {}} end
return {last, first, redis.call('LRANGE', log, from - first, from - first + tonumber(limit) - 1)}
""",
)


# A group's document follows its children (``contract``, "groups"): ``rollup`` runs in the step
# that writes a child (``WRITE``), so the group never misses a change and never goes back. Its
# ``group`` hash holds ``tpl`` (the group's document with each changing field a "@name@" string),
# ``ids`` (its children, in order, space-separated), ``tenant``, per child ``<id>`` = "<status>
# <progress JSON, or ''>", ``w:<id>`` (its weight) and ``j:<id>`` (its entry's JSON, open at the
# end), and what the group's document is made of, kept up to date with each change: ``done`` (the
# sum of weight x progress, a finished child counting 100), ``weight`` (of them all), ``count``,
# how many are ``queued``, have ``ended``, ``failed`` or were ``cancelled``, ``progress`` (the last
# shown), ``started`` (when a first child ran) and ``members`` (the children's entries with their
# statuses, made again only when a status changes: a child's progress costs the same however big
# its group). The group: ``progress`` the children's mean by weight, never lower than before;
# ``status`` queued while all are, running until all have ended, then failed if any failed, else
# cancelled if any was, else succeeded; with ``fast`` (fail fast: JSON with the cancel key prefix,
# channel and TTL), failed as soon as one child has, its other children then told to stop as a
# ``DELETE`` would (a queued one is cancelled when a worker takes it). Its packed event is
# ``contract.pack``'s form; a final state
# gets the result's TTL, a tombstone and, as its result, the children, and, if the group has a
# webhook (``hook``: JSON with its URL, webhook key, TTL, wake channel, and the delivery's id,
# record key, queue, order key and arq payload with "@seq@" and "@et@" for the final seq and the
# time, ``Store.create_group``), its delivery, as ``WRITE`` enqueues a job's. Nothing changes once
# the group has ended, or if it has expired. A job's spawned children (``SPAWN``) keep the same
# hash without ``tpl``: their changes are summed up there (also once the job has ended, so that a
# re-run finds them as they are), each change counted in ``v``, and the job's worker reads and
# shows them (``Store.family``).
ROLLUP_LUA = r"""
local function ended(st) return st == 'succeeded' or st == 'failed' or st == 'cancelled' end
local function share(st, p) if ended(st) then return 100 end return tonumber(p) or 0 end
-- ``packed``: ``WRITE``'s field ``group`` (``Store._group_fields``); ``progress``: the child's new
-- progress as JSON ('' for null), or nil for the one ``packed`` carries
local function rollup(packed, child_id, state, progress)
  local f = {}
  for word in string.gmatch(packed, '%S+') do f[#f + 1] = word end
  local parent, group, parent_channel, parent_tombstone, parent_result = f[1], f[2], f[3], f[4], f[5]
  if progress == nil then progress = f[6] == 'null' and '' or f[6] end
  local now_iso, expires_iso, live_ttl, final_ttl, tombstone_ttl, now_ms = f[7], f[8], f[9], f[10], f[11], f[12]
  local g = redis.call('HMGET', group, child_id, 'w:' .. child_id, 'done', 'weight', 'count', 'queued', 'ended', 'failed',
                       'cancelled', 'progress', 'started', 'tenant', 'tpl', 'members', 'ids', 'hook', 'fast')
  if not g[1] or not g[15] then return end  -- (its group's hash is gone)
  local head = g[13] and redis.call('HMGET', parent, 'seq', 'state')
  if head and (not head[2] or ended(head[2])) then return end  -- (a group that has ended stays as it ended)
  local was, was_progress = string.match(g[1], '^(%S+) (.*)$')
  if state == was and progress == was_progress then return end  -- (a message or stage: the group is as it was)
  local done = tonumber(g[3]) + tonumber(g[2]) * (share(state, progress) - share(was, was_progress))
  local weight, count = tonumber(g[4]), tonumber(g[5])
  local n = {queued = tonumber(g[6]), ended = tonumber(g[7]), failed = tonumber(g[8]), cancelled = tonumber(g[9])}
  redis.call('HSET', group, child_id, state .. ' ' .. progress, 'done', done)
  local members, h = g[14], nil
  if state ~= was then
    for st, step in pairs({[was] = -1, [state] = 1}) do
      if st == 'queued' then n.queued = n.queued + step end
      if ended(st) then n.ended = n.ended + step end
      if st == 'failed' then n.failed = n.failed + step elseif st == 'cancelled' then n.cancelled = n.cancelled + step end
    end
    local all = redis.call('HGETALL', group)
    h = {}
    for i = 1, #all, 2 do h[all[i]] = all[i + 1] end
    local entries = {}
    for id in string.gmatch(g[15], '%S+') do
      entries[#entries + 1] = h['j:' .. id] .. ',"status":"' .. string.match(h[id], '^%S+') .. '"}'
    end
    members = '[' .. table.concat(entries, ',') .. ']'
    redis.call('HSET', group, 'queued', n.queued, 'ended', n.ended, 'failed', n.failed, 'cancelled', n.cancelled, 'members', members)
  end
  if not g[13] then  -- a job's spawned children (no template): its worker shows them, as of version ``v``
    redis.call('HINCRBY', group, 'v', 1)
    redis.call('EXPIRE', group, live_ttl)
    return
  end
  local all_ended = n.ended == count
  local terminal = all_ended or (g[17] ~= false and n.failed > 0)
  local status = 'running'
  if terminal then
    status = (n.failed > 0 and 'failed') or (n.cancelled > 0 and 'cancelled') or 'succeeded'
  elseif n.queued == count then
    status = 'queued'
  end
  if terminal and not all_ended then  -- failing fast: the others stop
    local fast = cjson.decode(g[17])
    for id in string.gmatch(g[15], '%S+') do
      if not ended(string.match(h[id], '^%S+')) then
        redis.call('SET', fast.prefix .. id, 1, 'EX', fast.ttl)
        redis.call('PUBLISH', fast.channel, id)
      end
    end
  end
  local pct = all_ended and 100 or math.max(tonumber(g[10]), math.floor(done / weight * 100 + 0.5) / 100)
  local started = g[11]
  if not started and status ~= 'queued' then
    started = now_iso
    redis.call('HSET', group, 'started', now_iso)
  end
  local function text(v) return v and ('"' .. v .. '"') or 'null' end
  local seq = tonumber(head[1]) + 1
  local doc = string.gsub(g[13], '"@([%w_]+)@"', {
    status = '"' .. status .. '"', progress = (status == 'queued' and pct == 0) and 'null' or tostring(pct), seq = tostring(seq),
    updated_at = text(now_iso), started_at = text(started), finished_at = terminal and text(now_iso) or 'null',
    expires_at = terminal and text(expires_iso) or 'null', children = members,
  })
  local event = seq .. ' ' .. (terminal and status or 'progress') .. ' ' .. g[12] .. '\n' .. doc
  redis.call('HSET', parent, 'seq', seq, 'state', status, 'ev', event)
  redis.call('HSET', group, 'progress', pct)
  local ttl = terminal and final_ttl or live_ttl
  redis.call('EXPIRE', parent, ttl)
  redis.call('EXPIRE', group, ttl)
  if terminal then
    redis.call('SET', parent_tombstone, g[12], 'EX', tombstone_ttl)
    redis.call('SET', parent_result, members, 'EX', final_ttl)
  end
  redis.call('PUBLISH', parent_channel, event)
  if terminal and g[16] then
    local hook = cjson.decode(g[16])
    local id = (string.gsub(hook.id, '@seq@', seq))
    local payload = (string.gsub((string.gsub(hook.payload, '"@seq@"', seq)), '"@et@"', now_ms))
    redis.call('HSET', hook.key, 'seq', seq, 'url', hook.url, 'ev', event)
    redis.call('PEXPIRE', hook.key, hook.ttl)
    enqueue((string.gsub(hook.record, '@seq@', seq)), payload, hook.ttl, hook.queue, clock(hook.order), id)
    redis.call('PUBLISH', hook.wake, id)
  end
end
"""


# A document change. Returns {1, seq, last log seq (-1: no lines)} when written; {0, stored seq, stored state} when refused
# because the stored seq is not ``expected`` or the job already ended (no change after the end).
# Safe to run twice: a write whose exact event is already stored (its reply was lost) answers
# as written. A final state of a job that has a webhook enqueues its delivery in the same step and
# captures what it will send (URL and event) for as long as the delivery may run
# (``contract.webhook_key``), next in line on the job's queue (``order``: ``queue.order_key``).
# ``queued``: the tenant's set of queued jobs (the queue cap counts it); ``waiting``, the queue's.
# ``after``: what the worker's attempt does to the queue in the same step ('' nothing;
# ``queue.FINISH``, ``queue.REQUEUE`` at ``due_ms``, ``queue.RELEASE``: ``queue.AFTER_LUA``).
# ``log_lines`` (may be ''): log lines appended in the same step, before the event is published
# (``LOG_LUA``); a final state gives the job's log the result's TTL. A child of a group changes its
# group in the same step (``ROLLUP_LUA``): ``group`` ('' for a job outside a group) holds, space-
# separated, the group's document key, group key, channel, tombstone key and result key, the
# child's new progress as JSON, the time of the change, when the group would expire were it to end
# now, its TTL before and after its end, its tombstone's, and the time in ms (``Store._group_fields``: one field, so that the
# writes of other jobs carry one empty argument more, not ten).
WRITE = Script(
    keys=(
        "job", "tombstone", "result", "queue", "delivery_record", "queued", "webhook", "record", "lease", "tries", "log",
        "log_channel", "order", "waiting",
    ),  # fmt: skip
    args=(
        "expected", "seq", "state", "event", "channel", "ttl", "terminal", "tombstone_ttl", "result_json",
        "delivery_payload", "delivery_ttl_ms", "delivery_id", "wake_channel", "job_id", "now_us", "tenant",
        "after", "due_ms", "log_base", "log_lines", "log_max", "group",
    ),  # fmt: skip
    prefix=ENQUEUE_LUA + AFTER_LUA + LOG_LUA + ROLLUP_LUA,
    body="""
local cur = redis.call('HMGET', job, 'seq', 'state', 'webhook')
local stored = tonumber(cur[1]) or 0
local was = cur[2] or ''
if stored == tonumber(seq) and redis.call('HGET', job, 'ev') == event then
  return {1, stored, tonumber(redis.call('HGET', job, 'logseq') or '0')}
end
if stored ~= tonumber(expected) or was == 'succeeded' or was == 'failed' or was == 'cancelled' then
  return {0, stored, was}
end
redis.call('HSET', job, 'seq', seq, 'state', state, 'ev', event)
redis.call('EXPIRE', job, ttl)
if state == 'queued' then  -- (since it was queued: a change while queued keeps that time)
  redis.call('ZADD', queued, 'NX', now_us, job_id)
  redis.call('ZADD', waiting, 'NX', now_us, job_id)
elseif was == 'queued' then
  redis.call('ZREM', queued, job_id)
  redis.call('ZREM', waiting, job_id)
end
local logseq = -1
if log_lines ~= '' then logseq = append_log(job, log, log_channel, job_id, log_base, log_lines, log_max) end
if terminal == '1' then
  redis.call('EXPIRE', log, ttl)
  redis.call('SET', tombstone, tenant, 'EX', tombstone_ttl)
  if result_json ~= '' then redis.call('SET', result, result_json, 'EX', ttl) end
  if cur[3] then
    redis.call('HSET', webhook, 'seq', seq, 'url', cur[3], 'ev', event)
    redis.call('PEXPIRE', webhook, delivery_ttl_ms)
    enqueue(delivery_record, delivery_payload, delivery_ttl_ms, queue, clock(order), delivery_id)
    redis.call('PUBLISH', wake_channel, delivery_id)
  end
end
redis.call('PUBLISH', channel, event)
if group ~= '' then rollup(group, job_id, state) end
after_attempt(after, queue, job_id, record, lease, tries, due_ms)
return {1, tonumber(seq), logseq}
""",
)


# ``AFTER_LUA`` on its own: an attempt's end when its last write was refused (the job was cancelled
# or ended elsewhere) or there was no document to write (a webhook delivery, an unknown type).
AFTER = Script(
    keys=("queue", "record", "lease", "tries"),
    args=("after", "job_id", "due_ms"),
    prefix=AFTER_LUA,
    body="""
after_attempt(after, queue, job_id, record, lease, tries, due_ms)
return 0
""",
)


# A worker takes up to ``limit`` due jobs from its queues: ``queues`` holds, space-separated, a queue
# key, its order key (``queue.order_key``) and how many jobs at most to take from it, for each
# queue in the order to look at them. In each queue, deferred jobs that are now due (scores from
# ``DEFERRED`` up) first get their place in line (``core.queue``), then the first due jobs in line
# are taken, and the queue's virtual clock moves up to the last place taken. For each job: its
# lease (``owner`` for ``lease_ms``), its try counter counted up, and what running it needs, in one
# step (each job id's keys are made here from the prefixes ``core.queue`` gives, as arq's own
# worker does: one Redis, not a cluster). Jobs leased by any worker, and the ids in ``skip``
# (space-separated), are passed over. Returns a row per job (``Claimed``: job id, try, record,
# event, request id, cancelled (0/1), traceparent, last log seq, queue key); a missing record,
# document or trace context is absent (nil).
CLAIM = Script(
    keys=(),
    args=(
        "now_ms", "limit", "queues", "step", "lease_ms", "owner", "skip", "lease_prefix", "tries_prefix",
        "tries_ttl", "record_prefix", "job_prefix", "cancel_prefix",
    ),  # fmt: skip
    prefix=ENQUEUE_LUA,
    body="""
local skipped = {}
for id in string.gmatch(skip, '%S+') do skipped[id] = true end
local words = {}
for word in string.gmatch(queues, '%S+') do words[#words + 1] = word end
local left = tonumber(limit)
local out = {}
for q = 1, #words, 3 do
  if left <= 0 then break end
  local queue, order, want = words[q], words[q + 1], math.min(tonumber(words[q + 2]), left)
  local v = clock(order)
  local moved = false
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', queue, DEFERRED, now_ms, 'LIMIT', 0, 100)) do
    local priority = tonumber(redis.call('HGET', job_prefix .. id, 'pri') or '0')
    redis.call('ZADD', queue, v - priority * tonumber(step), id)
  end
  local taken, offset = 0, 0
  while taken < want and offset < 1000 do
    local found = redis.call('ZRANGEBYSCORE', queue, '-inf', now_ms, 'WITHSCORES', 'LIMIT', offset, want - taken + 20)
    if #found == 0 then break end
    offset = offset + #found / 2
    for i = 1, #found, 2 do
      if taken >= want then break end
      local id, score = found[i], tonumber(found[i + 1])
      if not skipped[id] and redis.call('SET', lease_prefix .. id, owner, 'PX', lease_ms, 'NX') then
        local try = redis.call('INCR', tries_prefix .. id)
        redis.call('EXPIRE', tries_prefix .. id, tries_ttl)
        local doc = redis.call('HMGET', job_prefix .. id, 'ev', 'rid', 'tp', 'logseq')
        out[#out + 1] = {id, try, redis.call('GET', record_prefix .. id), doc[1], doc[2], redis.call('EXISTS', cancel_prefix .. id),
          doc[3], tonumber(doc[4] or '0'), queue}
        taken = taken + 1
        if score > v and score < DEFERRED then v, moved = score, true end
      end
    end
  end
  left = left - taken
  if moved then redis.call('HSET', order, 'v', v) end
end
return out
""",
)


class Claimed(NamedTuple):
    """A row of ``CLAIM``'s answer: what running a claimed job needs."""

    job_id: bytes
    tries: int
    record: bytes | None
    event: bytes | None
    request_id: bytes | None
    cancelled: int
    traceparent: bytes | None
    log_seq: int  # the job's log's last seq, where this attempt's lines go on from
    queue: bytes  # the key of the queue it was taken from


# A worker's running jobs keep their leases: ``jobs`` holds, space-separated, a queue key and a job
# id for each. A job whose lease is ``owner``'s is renewed; one whose lease lapsed (a Redis outage)
# is taken back if the job is still due in its queue (not finished, not re-queued for later) and no
# other worker took it meanwhile.
RENEW = Script(
    keys=(),
    args=("now_ms", "lease_ms", "owner", "lease_prefix", "jobs"),
    body="""
for queue, id in string.gmatch(jobs, '(%S+) (%S+)') do
  local lease = lease_prefix .. id
  local holder = redis.call('GET', lease)
  if holder == owner then
    redis.call('PEXPIRE', lease, lease_ms)
  elseif not holder then
    local due = redis.call('ZSCORE', queue, id)
    if due and tonumber(due) <= tonumber(now_ms) then redis.call('SET', lease, owner, 'PX', lease_ms) end
  end
end
return 0
""",
)


# A webhook delivery that has ended (delivered, or given up) drops the payload it sent, unless a
# newer final state has replaced it meanwhile.
WEBHOOK_DONE = Script(
    keys=("webhook",),
    args=("seq",),
    body="""
if redis.call('HGET', webhook, 'seq') == seq then return redis.call('DEL', webhook) end
return 0
""",
)


# Running a failed or cancelled job again (POST /jobs/{id}/retry): back to queued, re-enqueued (a
# group's child: its group, if it has not ended, waits for it again; ``group`` as in ``WRITE``).
# Returns {1, seq} or {0, stored seq, stored state}; refused too while arq is still finishing
# the last attempt (``lease`` exists: its cleanup would delete the job we enqueue).
REOPEN = Script(
    keys=("job", "tombstone", "result", "record", "queue", "queued", "lease", "log", "order", "waiting"),
    args=(
        "expected", "seq", "event", "channel", "ttl", "payload", "record_ttl_ms", "wake_channel", "job_id", "now_us",
        "tenant", "priority", "step", "group",
    ),  # fmt: skip
    prefix=ENQUEUE_LUA + TIME_LUA + ROLLUP_LUA,
    body="""
local cur = redis.call('HMGET', job, 'seq', 'state')
local stored = tonumber(cur[1]) or 0
if stored ~= tonumber(expected) or (cur[2] ~= 'failed' and cur[2] ~= 'cancelled') then
  return {0, stored, cur[2] or ''}
end
if redis.call('EXISTS', lease) == 1 then return {0, stored, 'busy'} end
redis.call('HSET', job, 'seq', seq, 'state', 'queued', 'ev', event)
redis.call('EXPIRE', job, ttl)
redis.call('EXPIRE', log, ttl)  -- the log lives as long as the document again
redis.call('DEL', tombstone, result)
enqueue(record, payload, record_ttl_ms, queue, place(order, tenant, priority, step, queued), job_id)
redis.call('ZADD', queued, now_us, job_id)
redis.call('ZADD', waiting, now_us, job_id)
if redis.call('HEXISTS', job, 'unwatched') == 1 then redis.call('HSET', job, 'seen', time_ms()) end  -- a retry is watched
redis.call('PUBLISH', channel, event)
redis.call('PUBLISH', wake_channel, job_id)
if group ~= '' then rollup(group, job_id, 'queued', '') end  -- a child of a group that has not ended: it waits for it again
return {1, tonumber(seq)}
""",
)


# Creating jobs (``CREATE``, ``CREATE_GROUP``). ``admit``: the submit's checks, in this order: the
# rate (``rate_limit`` per ``rate_window`` s, counted in ``rate``: -2 over it), a remembered
# idempotency key (its value, "<job id> <request hash>", returned instead of creating anything, so
# concurrent identical requests make exactly one job), the tenant's queue cap (``count`` more jobs
# would pass ``queue_cap`` queued: -1; 0: no cap); nil to go on. ``store_job(j)``: one queued job
# from the fields of table ``j``: its document, index entry and arq's job + queue entry at its place
# in line (``place`` in ``queue.ENQUEUE_LUA``; a priority above 0 kept in the job's field ``pri``);
# ``index_trim_below`` drops index entries older than the tombstones, ``queued_trim_below`` the
# queued and waiting sets' entries of jobs that expired while queued; ``unwatched``: the job's
# ``cancel_when_unwatched`` in seconds ('': none), the submit counting as watching it
# (``contract.WATCH_BEAT``).
CREATE_LUA = r"""
local function admit(rate, rate_limit, rate_window, idempotency, idempotency_value, idempotency_ttl, queued, queued_trim_below, queue_cap, count)
  local submits = redis.call('INCR', rate)
  if submits == 1 then redis.call('EXPIRE', rate, rate_window) end
  if submits > tonumber(rate_limit) then return -2 end
  if idempotency_value ~= '' then
    local prior = redis.call('GET', idempotency)
    if prior then return prior end
  end
  redis.call('ZREMRANGEBYSCORE', queued, '-inf', queued_trim_below)
  if tonumber(queue_cap) > 0 and redis.call('ZCARD', queued) + count > tonumber(queue_cap) then return -1 end
  if idempotency_value ~= '' then redis.call('SET', idempotency, idempotency_value, 'EX', idempotency_ttl) end
  return nil
end
local function store_job(j)
  redis.call('HSET', j.job, 'seq', 1, 'state', 'queued', 'type', j.job_type, 'ev', j.event, 'params', j.params_json, 'rid', j.request_id)
  if j.webhook_url ~= '' then redis.call('HSET', j.job, 'webhook', j.webhook_url) end
  if j.traceparent ~= '' then redis.call('HSET', j.job, 'tp', j.traceparent) end
  if j.priority ~= '0' then redis.call('HSET', j.job, 'pri', j.priority) end
  if j.unwatched ~= '' then redis.call('HSET', j.job, 'unwatched', j.unwatched, 'seen', time_ms()) end  -- the submit watches
  redis.call('EXPIRE', j.job, j.ttl)
  redis.call('ZADD', j.index, j.now_us, j.job_id)
  redis.call('ZREMRANGEBYSCORE', j.index, '-inf', j.index_trim_below)
  enqueue(j.record, j.payload, j.record_ttl_ms, j.queue, place(j.order, j.tenant, j.priority, j.step, j.queued), j.job_id)
  redis.call('ZADD', j.queued, j.now_us, j.job_id)
  redis.call('ZREMRANGEBYSCORE', j.waiting, '-inf', j.queued_trim_below)
  redis.call('ZADD', j.waiting, j.now_us, j.job_id)
end
"""


# ``store_job`` of the job that the script's own fields name (``CREATE``, ``SPAWN``).
STORE_THIS_JOB = """
store_job({
  job = job, index = index, record = record, queue = queue, queued = queued, waiting = waiting, order = order, job_id = job_id,
  job_type = job_type, event = event, ttl = ttl, now_us = now_us, index_trim_below = index_trim_below,
  queued_trim_below = queued_trim_below, payload = payload, record_ttl_ms = record_ttl_ms, params_json = params_json,
  webhook_url = webhook_url, request_id = request_id, traceparent = traceparent, tenant = tenant, priority = priority,
  step = step, unwatched = unwatched,
})
"""


# Creating a job: ``admit``, then ``store_job``, then its first event and a wake-up for the
# workers, all or nothing. Safe to run twice (a retry after a lost reply changes nothing: the job
# is there, and that is checked first, before the rate counter). Returns 1 (created), 0 (already
# there), or what ``admit`` refused with.
CREATE = Script(
    keys=("job", "index", "record", "queue", "idempotency", "queued", "rate", "order", "waiting"),
    args=(
        "job_id", "job_type", "event", "ttl", "now_us", "index_trim_below", "payload", "record_ttl_ms",
        "channel", "wake_channel", "params_json", "webhook_url", "idempotency_value", "idempotency_ttl",
        "queue_cap", "queued_trim_below", "request_id", "traceparent", "rate_limit", "rate_window",
        "tenant", "priority", "step", "unwatched",
    ),  # fmt: skip
    prefix=ENQUEUE_LUA + TIME_LUA + CREATE_LUA,
    body="""
if redis.call('EXISTS', job) == 1 then return 0 end
local refused = admit(rate, rate_limit, rate_window, idempotency, idempotency_value, idempotency_ttl, queued, queued_trim_below, queue_cap, 1)
if refused then return refused end
""" + STORE_THIS_JOB + """
redis.call('PUBLISH', channel, event)
redis.call('PUBLISH', wake_channel, job_id)
return 1
""",
)


# Creating a group (``contract``, "groups"): its document (``parent``, with the fields of
# ``group``: its template, children and tenant, as ``ROLLUP_LUA`` reads them) and each of its
# ``children`` (a JSON array of objects with ``store_job``'s fields that differ between children:
# job, record, queue, order, waiting, job_id, job_type, event, payload, params_json, priority),
# after one ``admit`` for them all, all or nothing. Safe to run twice, as ``CREATE``. Returns as
# ``CREATE``.
CREATE_GROUP = Script(
    keys=("parent", "group", "index", "idempotency", "queued", "rate"),
    args=(
        "parent_id", "event", "group_fields", "children", "ttl", "now_us", "index_trim_below", "record_ttl_ms",
        "channel", "wake_channel", "idempotency_value", "idempotency_ttl", "queue_cap", "queued_trim_below",
        "request_id", "traceparent", "rate_limit", "rate_window", "tenant", "step", "webhook_url",
    ),  # fmt: skip
    prefix=ENQUEUE_LUA + TIME_LUA + CREATE_LUA,
    body="""
if redis.call('EXISTS', parent) == 1 then return 0 end
local kids = cjson.decode(children)
local refused = admit(rate, rate_limit, rate_window, idempotency, idempotency_value, idempotency_ttl, queued, queued_trim_below, queue_cap, #kids)
if refused then return refused end
for i, j in ipairs(kids) do  -- (each its own time in µs, so that GET /jobs pages through them all)
  j.index, j.queued, j.ttl, j.now_us, j.index_trim_below, j.queued_trim_below = index, queued, ttl, now_us + i - 1, index_trim_below, queued_trim_below
  j.record_ttl_ms, j.webhook_url, j.request_id, j.traceparent, j.tenant, j.step, j.unwatched = record_ttl_ms, '', request_id, traceparent, tenant, step, ''
  store_job(j)
end
redis.call('HSET', parent, 'seq', 1, 'state', 'queued', 'type', 'group', 'ev', event, 'rid', request_id)
if webhook_url ~= '' then redis.call('HSET', parent, 'webhook', webhook_url) end
redis.call('EXPIRE', parent, ttl)
redis.call('HSET', group, unpack(cjson.decode(group_fields)))
redis.call('EXPIRE', group, ttl)
redis.call('ZADD', index, now_us + #kids, parent_id)  -- (listed first: newest)
redis.call('PUBLISH', channel, event)
redis.call('PUBLISH', wake_channel, parent_id)
return 1
""",
)


# A running job's child (``ctx.spawn``): ``store_job`` (no rate, idempotency or queue cap: the job
# was admitted), and the child added to its parent's ``group`` hash (created on the first spawn, in
# ``ROLLUP_LUA``'s form, without a template): ``entry`` (``contract.child_entry``) and ``weight``.
# Its id is the same in every attempt of the parent (``contract.spawned_id``): a child already there
# is left as it is, but for a cancel its parent's end asked (``cancel``), which the re-run takes
# back; a child whose document expired is stored again without being added twice. Returns {'new',
# the state of the child that was there, or 'stopped' (the parent is not running: nothing done),
# then the hash's v, done, weight, ended, count and members: ``Store.family``'s read}.
SPAWN = Script(
    keys=("parent", "job", "group", "cancel", "index", "record", "queue", "queued", "order", "waiting"),
    args=(
        "job_id", "job_type", "event", "ttl", "now_us", "index_trim_below", "queued_trim_below", "payload", "record_ttl_ms",
        "params_json", "request_id", "traceparent", "tenant", "priority", "step", "channel", "wake_channel", "entry", "weight",
    ),  # fmt: skip
    prefix=ENQUEUE_LUA + TIME_LUA + CREATE_LUA,
    body="""
local function family(state)
  local f = redis.call('HMGET', group, 'v', 'done', 'weight', 'ended', 'count', 'members')
  return {state, f[1] or '0', f[2] or '0', f[3] or '0', f[4] or '0', f[5] or '0', f[6] or '[]'}
end
if redis.call('HGET', parent, 'state') ~= 'running' then return family('stopped') end
local was = redis.call('HGET', job, 'state')
if was then
  if was ~= 'succeeded' and was ~= 'failed' and was ~= 'cancelled' then redis.call('DEL', cancel) end
  return family(was)
end
local webhook_url, unwatched = '', ''  -- (a child has neither)
""" + STORE_THIS_JOB + """
local g = redis.call('HMGET', group, 'ids', 'members', job_id)
local member = entry .. ',"status":"queued"}'
if not g[1] then
  redis.call('HSET', group, 'ids', job_id, 'members', '[' .. member .. ']', 'done', 0, 'weight', weight, 'count', 1, 'queued', 1,
             'ended', 0, 'failed', 0, 'cancelled', 0, 'progress', 0)
elseif not g[3] then
  redis.call('HSET', group, 'ids', g[1] .. ' ' .. job_id, 'members', string.sub(g[2], 1, -2) .. ',' .. member .. ']')
  redis.call('HINCRBYFLOAT', group, 'weight', weight)
  redis.call('HINCRBY', group, 'count', 1)
  redis.call('HINCRBY', group, 'queued', 1)
end  -- (else: listed already, its document expired; its writes take it on from the state listed)
if not g[3] then redis.call('HSET', group, job_id, 'queued ', 'w:' .. job_id, weight, 'j:' .. job_id, entry) end
redis.call('HINCRBY', group, 'v', 1)
redis.call('EXPIRE', group, ttl)
redis.call('PUBLISH', channel, event)
redis.call('PUBLISH', wake_channel, job_id)
return family('new')
""",
)


# A rate-limit count, optionally with a job's stored event: a poll's count and read in one round
# trip. Returns {count after this request, the event (absent if ``job`` is '' or has none)}.
# Run twice after a lost reply, it counts the request twice, which a rate limit can afford.
COUNT = Script(
    keys=("counter", "job"),
    args=("window",),
    body="""
local n = redis.call('INCR', counter)
if n == 1 then redis.call('EXPIRE', counter, window) end
if job ~= '' then return {n, redis.call('HGET', job, 'ev')} end
return {n}
""",
)


# A server's beat (``server.watched``, every ``contract.WATCH_BEAT``, also with no ``ids``): each
# job of ``ids`` (space-separated) with ``cancel_when_unwatched`` gets ``seen`` = now, and the
# servers' beat (``contract.WATCHING``) is recorded: ``last`` = now, and ``since`` = now when no
# server beat for ``gap_ms`` (Redis was away, or no server ran). Returns the ids that have no such
# option (or no document), which the server then leaves out while they stay watched.
SEEN = Script(
    keys=("watching",),
    args=("job_prefix", "ids", "gap_ms"),
    prefix=TIME_LUA,
    body="""
local now = time_ms()
if now - tonumber(redis.call('HGET', watching, 'last') or '0') > tonumber(gap_ms) then
  redis.call('HSET', watching, 'since', now)
end
redis.call('HSET', watching, 'last', now)
redis.call('EXPIRE', watching, 86400)
local without = {}
for id in string.gmatch(ids, '%S+') do
  local job = job_prefix .. id
  if redis.call('HEXISTS', job, 'unwatched') == 1 then
    redis.call('HSET', job, 'seen', now)
  else
    without[#without + 1] = id
  end
end
return without
""",
)


# A worker's look at its jobs with ``cancel_when_unwatched`` (``ids`` space-separated): returns the
# ids nobody watched for more than ``unwatched`` seconds, by Redis's clock (the one ``seen`` is in).
# Only the time while servers beat counts: none if no server beat within ``gap_ms`` (Redis is just
# back, or no server runs), and not before their beat's ``since`` (``contract.WATCHING``).
UNWATCHED = Script(
    keys=("watching",),
    args=("job_prefix", "ids", "gap_ms"),
    prefix=TIME_LUA,
    body="""
local now = time_ms()
local beat = redis.call('HMGET', watching, 'last', 'since')
if now - tonumber(beat[1] or '0') > tonumber(gap_ms) then return {} end
local since = tonumber(beat[2] or '0')
local out = {}
for id in string.gmatch(ids, '%S+') do
  local job = redis.call('HMGET', job_prefix .. id, 'unwatched', 'seen')
  if job[1] and job[2] and now - math.max(tonumber(job[2]), since) > tonumber(job[1]) * 1000 then out[#out + 1] = id end
end
return out
""",
)
