"""RedisJournal: the SQLite journal's protocol, kept in Redis so any member can take over.

Same promises as ``wujie_async._journal.Journal``: an intent is written (and acknowledged by
Redis) before the request is sent, the key before ``submit()`` returns, a lost reply is
``uncertain``, never resent silently. Every write is one Lua script, so it is atomic and lands
in Redis' AOF as one unit; how durable an acknowledged write is depends on ``appendfsync``
(see ``RedisFleet.start``'s check).

Rows carry an owner, the member that wrote them; a member only changes its own rows (a write
for a row claimed by someone else is ignored). :meth:`RedisJournal.claim_dead`, in one atomic
script, finds the members whose heartbeat is older than ``member_timeout``, makes the claimer
the owner of their ``accepted`` rows, turns their ``intent`` rows into ``uncertain`` (they died
mid-request), and removes them from the member list: two claimers can never get the same row.

Rows also record their job's ``job.save()``, as the SQLite journal's do (see
``wujie_async._save_record``): ``save_asked`` (written and acknowledged before the save's
download starts), ``save_ended``, and ``saver``, the member that asked. A ``succeeded`` row
asked and not ended is a save cut off (the member was killed mid-download, its client closed,
the save was cancelled): :meth:`RedisJournal.saves_cut_off` lists the member's own, and
``claim_dead`` makes the claimer the saver of a dead member's, in the same atomic script as
its accepted rows, so each goes to exactly one member.

Layout, all under the fleet's hash tag (prefix ``{wujie:<name>}:journal:``): ``seq`` (row
ids), ``row:<id>`` (a hash), ``state:<state>`` / ``tag:<tag>`` / ``owner:<member>`` (sorted
sets of ids; ``owner:`` holds only open rows, intent and accepted), ``saves:<member>`` (a
sorted set of the ids of rows whose save that member asked for and that has not ended),
``key:<job key>`` (the row id) and ``once:<token>`` (the row an intent write made, kept a
day, so that a retried write makes no second row). Scripts build these names from the
prefix; all share one slot, which Redis Cluster accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .._errors import ClientStateError, shown_key, snippet
from .._journal import JournalEntry, read_stored_request
from ._errors import FleetUnavailableError
from ._link import REDIS_MS, RedisLink, Script, refused_for_its_data

logger = logging.getLogger("wujie_async.fleet")

FINAL_STATES = ("succeeded", "failed", "cancelled", "rejected", "uncertain", "unsent")
ALL_STATES = ("intent", "accepted", *FINAL_STATES)
_ERROR_CHARS = 2000
_RETRY = 0.25  # a record that met Redis away is tried again this often

# A new row (its id from the seq counter) and its indexes, its job key's too when it has one
# ('' for none), shared by the scripts that make one.
# Row ids never come round again: a counter Redis lost (a FLUSHALL, a restart without AOF)
# starts again from Redis' time in microseconds, past every id given before (ids count up from
# the time they started at, one per script, and a script takes more than a microsecond), so a
# submit still on the wire with an id of before cannot write its key onto a row made since
# (2**53, where a score stops being exact, is in the year 2255).
_NEW_ROW = """
local function new_row(p, seq, owner, state, path, request, tag, created, updated, key)
  if redis.call('EXISTS', seq) == 0 then
    -- Past every id of before: each id took Redis more than a microsecond to give.
    local t = redis.call('TIME')
    redis.call('SET', seq, string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2])))
  end
  local id = string.format('%.0f', redis.call('INCR', seq))  -- never "1.7e+15"
  redis.call('HSET', p .. 'row:' .. id, 'path', path, 'request', request, 'state', state,
             'tag', tag, 'owner', owner, 'created', created, 'updated', updated)
  redis.call('ZADD', p .. 'state:' .. state, id, id)
  redis.call('ZADD', p .. 'owner:' .. owner, id, id)
  if tag ~= '' then redis.call('ZADD', p .. 'tag:' .. tag, id, id) end
  if key ~= '' then
    redis.call('HSET', p .. 'row:' .. id, 'job_key', key)
    redis.call('SET', p .. 'key:' .. key, id)
  end
  return id
end
"""

# A row's move from one state to another, shared by the scripts below.
_TRANSITION = """
local function transition(p, id, from, to, job_key, err, now, owner)
  local row = p .. 'row:' .. id
  local cur = redis.call('HGET', row, 'state')
  if cur ~= from then return 0 end
  local row_owner = redis.call('HGET', row, 'owner')
  if owner ~= '' and row_owner ~= owner then return 0 end
  redis.call('ZREM', p .. 'state:' .. cur, id)
  redis.call('ZADD', p .. 'state:' .. to, id, id)
  redis.call('HSET', row, 'state', to, 'updated', now)
  if job_key ~= '' then
    redis.call('HSET', row, 'job_key', job_key)
    redis.call('SET', p .. 'key:' .. job_key, id)
  end
  if err ~= '' then redis.call('HSET', row, 'error', err) end
  if to ~= 'intent' and to ~= 'accepted' then
    redis.call('ZREM', p .. 'owner:' .. row_owner, id)
  end
  return 1
end
"""

# KEYS: seq, members, gateway. ARGV: prefix, owner, path, request, tag ('' = none), now, once
# (the write's token), the owner's gateway fingerprint, base URL and epoch ('' = not told, or
# not joined: see _membership). Reply: the row id; the same id again for a retry of the same
# write (its first try may have run after all, late, once a frozen Redis woke: one row, not
# two), 0 for a write its submit gave up on (see record_intent).
# An owner the member list does not hold (Redis lost it, or the fleet claimed it as dead) is
# put back with a heartbeat of now, and without its info: rows it writes until it joins again
# are a member's, claimable if it dies first. It finds its info missing within a second (or at
# its next heartbeat) and joins again (see _membership), which registers its keys again.
# A fleet gateway record Redis lost is written again from the owner's (a member that joined
# and was not refused since), with its epoch (see _membership): a client of another gateway
# opening before the members joined again took the fleet, and kept every member out.
_INTENT = (
    REDIS_MS
    + _NEW_ROW
    + """
local p = ARGV[1]
if not redis.call('ZSCORE', KEYS[2], ARGV[2]) then
  redis.call('ZADD', KEYS[2], redis_ms(), ARGV[2])
end
if ARGV[10] ~= '' and redis.call('HEXISTS', KEYS[3], 'fingerprint') == 0 then
  redis.call('HSET', KEYS[3], 'fingerprint', ARGV[8], 'base_url', ARGV[9], 'epoch', ARGV[10])
end
local once = p .. 'once:' .. ARGV[7]
local done = redis.call('GET', once)
if done then return tonumber(done) end
local id = new_row(p, KEYS[1], ARGV[2], 'intent', ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[6],
                   '')
redis.call('SET', once, id, 'EX', 86400)
return id
"""
)

# KEYS: seq. ARGV: prefix, id ('' = look up job_key; 'once:<token>' = the row an intent
# write with that token made, if it ran, and it may not run later), from, to, job_key, error,
# now, owner, then optionally the intent as written (path, request, tag, created). Reply: 1
# moved, 0 not (the row is not in ``from``, or another member's), 2 for a key another row holds
# (an earlier job's key handed out again: not written).
# An intent's row that Redis lost while its submit was out (a FLUSHALL, a restart without AOF)
# is written again from those when the submit may have been charged (its key came, or it is
# uncertain), as this member's: the job is neither lost nor filed under another submit.
_MOVE = (
    _NEW_ROW
    + _TRANSITION
    + """
local p = ARGV[1]
local id = ARGV[2]
if id == '' then
  id = redis.call('GET', p .. 'key:' .. ARGV[5])
  if not id then return 0 end
elseif string.sub(id, 1, 5) == 'once:' then
  local once = p .. id
  id = redis.call('GET', once)
  redis.call('SET', once, '0', 'EX', 86400)
  if not id or id == '0' then return 0 end
elseif ARGV[9] and redis.call('EXISTS', p .. 'row:' .. id) == 0 then
  local to, key, owner = ARGV[4], ARGV[5], ARGV[8]
  if to ~= 'accepted' and to ~= 'uncertain' then return 1 end  -- never charged: no row
  if key ~= '' then
    local held = redis.call('GET', p .. 'key:' .. key)
    if held then
      if redis.call('HGET', p .. 'row:' .. held, 'owner') == owner then return 1 end
      return 0
    end
  end
  local row = new_row(p, KEYS[1], owner, to, ARGV[9], ARGV[10], ARGV[11], ARGV[12], ARGV[7],
                      key)
  if ARGV[6] ~= '' then redis.call('HSET', p .. 'row:' .. row, 'error', ARGV[6]) end
  return 1
end
if ARGV[4] == 'accepted' and ARGV[5] ~= '' then
  local held = redis.call('GET', p .. 'key:' .. ARGV[5])
  if held and held ~= id then return 2 end  -- an earlier job's key, handed out again
  -- This very write, asked again (its reply was lost, or read after its deadline): done.
  local row = redis.call('HMGET', p .. 'row:' .. id, 'state', 'job_key', 'owner')
  if held and row[1] == 'accepted' and row[2] == ARGV[5] and row[3] == ARGV[8] then
    return 1
  end
end
return transition(p, id, ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
"""
)

# KEYS: seq, members, member-info, kept-out, kept-out-gateway. ARGV: prefix, claimer,
# timeout_ms, now, the claimer's gateway fingerprint ('' = not told).
# Reply: {-1} when the claimer itself is not a live member, else {1, {dead...}, {claimed ids}}.
# A member kept out by the gateway check (see _membership) sends no heartbeat, but marks itself
# kept out at each try to join: while that mark is fresh, it is alive and its rows stay its own
# (a claimer would ask its own gateway about them, which does not know them). Dead (killed
# while kept out, or it left), its rows go to a member of the gateway it was kept out with
# alone: until one claims them, they stay its own.
_CLAIM_DEAD = (
    REDIS_MS
    + _TRANSITION
    + """
local p, claimer, timeout, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local now_ms = redis_ms()
local mine = redis.call('ZSCORE', KEYS[2], claimer)
if not mine or now_ms - tonumber(mine) > timeout then return {-1} end
local dead, claimed = {}, {}
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now_ms - timeout)
local all = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = 1, #all, 2 do
  local member = all[i]
  local theirs = redis.call('HGET', KEYS[5], member)
  if member ~= claimer and now_ms - tonumber(all[i + 1]) > timeout
     and not redis.call('ZSCORE', KEYS[4], member) and (not theirs or theirs == ARGV[5]) then
    dead[#dead + 1] = member
    local set = p .. 'owner:' .. member
    for _, id in ipairs(redis.call('ZRANGE', set, 0, -1)) do
      local row = p .. 'row:' .. id
      local state = redis.pcall('HGET', row, 'state')  -- an error table for a garbled row
      if state == 'accepted' then
        redis.call('HSET', row, 'owner', claimer, 'updated', now)
        redis.call('ZADD', p .. 'owner:' .. claimer, id, id)
        claimed[#claimed + 1] = id
      elseif state == 'intent' then
        transition(p, id, 'intent', 'uncertain', '',
                   'member ' .. member .. ' died before the gateway reply was recorded', now, '')
      end
    end
    redis.call('DEL', set)
    -- Its saves cut off: the claimer's to resume (a row another member asked since is theirs).
    local saves = p .. 'saves:' .. member
    for _, id in ipairs(redis.call('ZRANGE', saves, 0, -1)) do
      local row = p .. 'row:' .. id
      if redis.pcall('HGET', row, 'saver') == member then
        redis.call('HSET', row, 'saver', claimer)
        redis.call('ZADD', p .. 'saves:' .. claimer, id, id)
      end
    end
    redis.call('DEL', saves)
    redis.call('ZREM', KEYS[2], member)
    redis.call('HDEL', KEYS[3], member)
    redis.call('HDEL', KEYS[5], member)
  end
end
return {1, dead, claimed}
"""
)

# KEYS: seq. ARGV: prefix, id, job_key, now, owner. An uncertain row whose key was found since
# becomes accepted, the writer's (resume() collects it); 0 when the row is not uncertain, or a
# row already holds the key.
_FOUND_KEY = (
    _TRANSITION
    + """
local p, id = ARGV[1], ARGV[2]
if redis.call('EXISTS', p .. 'key:' .. ARGV[3]) == 1 then return 0 end
if transition(p, id, 'uncertain', 'accepted', ARGV[3], '', ARGV[4], '') == 0 then return 0 end
redis.call('HSET', p .. 'row:' .. id, 'owner', ARGV[5])
redis.call('HDEL', p .. 'row:' .. id, 'error')
redis.call('ZADD', p .. 'owner:' .. ARGV[5], id, id)
return 1
"""
)

# KEYS: seq, members. ARGV: prefix, owner, now, then (job_key, row id of its intent, path,
# request, tag, created) for each row to restore. A row whose key Redis holds no more (a
# FLUSHALL, a restart without AOF) is written again, accepted and the owner's: were the owner
# to die, its job is claimed. A key some row holds (another member claimed it meanwhile) is
# left alone, and so is a key whose intent row Redis still holds as the owner's intent: the
# key's own write, waiting for Redis, lands in that row (a copy would make the key look like
# an earlier job's to it). Reply: how many.
_RESTORE = (
    _NEW_ROW
    + """
local p, owner, now, n = ARGV[1], ARGV[2], ARGV[3], 0
for i = 4, #ARGV, 6 do
  local key, intent = ARGV[i], p .. 'row:' .. ARGV[i + 1]
  local waiting = redis.call('HGET', intent, 'state') == 'intent'
                  and redis.call('HGET', intent, 'owner') == owner
  if redis.call('EXISTS', p .. 'key:' .. key) == 0 and not waiting then
    new_row(p, KEYS[1], owner, 'accepted', ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5],
            now, key)
    n = n + 1
  end
end
return n
"""
)
_RESTORE_BATCH = 200  # rows per script call: one call must not hold Redis long

# A queued record: the script and its arguments (KEYS: seq); or a flush() barrier.
_Write = tuple[Script, tuple[Any, ...]]
_Later = _Write | asyncio.Future[None] | None
_FIELDS = ("path", "request", "state", "job_key", "tag", "error", "created", "owner")

# KEYS: seq. ARGV: prefix, tag ('' = any), owner ('' = any), state1, state2, ...
# Reply: {{id1, fields1..., id2, ...}, {garbled ids}}: len(_FIELDS) + 1 items per row, ids
# ascending; a row key that is not a hash (another process wrote over it) is listed apart.
_ENTRIES = """
local p, tag, owner = ARGV[1], ARGV[2], ARGV[3]
local wanted, ids = {}, {}
local only_open = owner ~= ''
for i = 4, #ARGV do
  wanted[ARGV[i]] = true
  if ARGV[i] ~= 'intent' and ARGV[i] ~= 'accepted' then only_open = false end
end
if tag ~= '' then
  ids = redis.call('ZRANGE', p .. 'tag:' .. tag, 0, -1)
elseif only_open then
  -- one member's open rows: its own index, not every member's rows in those states
  ids = redis.call('ZRANGE', p .. 'owner:' .. owner, 0, -1)
else
  for state, _ in pairs(wanted) do
    for _, id in ipairs(redis.call('ZRANGE', p .. 'state:' .. state, 0, -1)) do
      ids[#ids + 1] = id
    end
  end
end
table.sort(ids, function(a, b) return tonumber(a) < tonumber(b) end)
local reply, garbled = {}, {}
for _, id in ipairs(ids) do
  local f = redis.pcall('HMGET', p .. 'row:' .. id,
    'path', 'request', 'state', 'job_key', 'tag', 'error', 'created', 'owner')
  if f.err then
    garbled[#garbled + 1] = id
  elseif f[3] and wanted[f[3]] and (owner == '' or f[8] == owner) then
    reply[#reply + 1] = id
    for j = 1, 8 do reply[#reply + 1] = f[j] or '' end
  end
end
return {reply, garbled}
"""

# KEYS: seq. ARGV: prefix, id1, id2, ... Reply: how many rows were deleted.
_FORGET = """
local p, n = ARGV[1], 0
for i = 2, #ARGV do
  local id = ARGV[i]
  local row = p .. 'row:' .. id
  local f = redis.call('HMGET', row, 'state', 'job_key', 'tag', 'owner', 'saver')
  if f[1] then
    redis.call('ZREM', p .. 'state:' .. f[1], id)
    if f[5] then redis.call('ZREM', p .. 'saves:' .. f[5], id) end
    if f[2] and f[2] ~= '' then redis.call('DEL', p .. 'key:' .. f[2]) end
    if f[3] and f[3] ~= '' then redis.call('ZREM', p .. 'tag:' .. f[3], id) end
    if f[4] then redis.call('ZREM', p .. 'owner:' .. f[4], id) end
    redis.call('DEL', row)
    n = n + 1
  end
end
return n
"""

# KEYS: seq. ARGV: prefix, job_key, member, now. The member saves the key's job: the row reads
# asked and not ended, the member its saver (another member's save of it before is replaced:
# this one is resumed if it is cut off). Reply: 1, or 0 for a key no row holds.
_SAVE_ASKED = """
local p, member = ARGV[1], ARGV[3]
local id = redis.call('GET', p .. 'key:' .. ARGV[2])
if not id then return 0 end
local row = p .. 'row:' .. id
local before = redis.call('HGET', row, 'saver')
if before and before ~= member then redis.call('ZREM', p .. 'saves:' .. before, id) end
redis.call('HSET', row, 'save_asked', ARGV[4], 'saver', member)
redis.call('HDEL', row, 'save_ended')
redis.call('ZADD', p .. 'saves:' .. member, id, id)
return 1
"""

# KEYS: seq. ARGV: prefix, job_key, member, now. The member's save of the key's job ended;
# a row whose saver is another member now (it claimed the save, the member having been
# declared dead) is theirs to end. Reply: 1 ended, 0 not.
_SAVE_ENDED = """
local p, member = ARGV[1], ARGV[3]
local id = redis.call('GET', p .. 'key:' .. ARGV[2])
if not id then return 0 end
local row = p .. 'row:' .. id
if redis.call('HGET', row, 'saver') ~= member then return 0 end
redis.call('HSET', row, 'save_ended', ARGV[4])
redis.call('ZREM', p .. 'saves:' .. member, id)
return 1
"""

# KEYS: seq. ARGV: prefix, member. The member's succeeded rows whose save never ended, in the
# entries script's reply form ({{id1, fields1..., id2, ...}, {garbled ids}}). A save asked
# while the job ran is left to its accepted row until the job has succeeded.
_SAVES_CUT_OFF = """
local p = ARGV[1]
local reply, garbled = {}, {}
for _, id in ipairs(redis.call('ZRANGE', p .. 'saves:' .. ARGV[2], 0, -1)) do
  local f = redis.pcall('HMGET', p .. 'row:' .. id,
    'path', 'request', 'state', 'job_key', 'tag', 'error', 'created', 'owner', 'save_ended')
  if f.err then
    garbled[#garbled + 1] = id
  elseif f[3] == 'succeeded' and not f[9] then
    reply[#reply + 1] = id
    for j = 1, 8 do reply[#reply + 1] = f[j] or '' end
  end
end
return {reply, garbled}
"""


@dataclass(frozen=True, slots=True)
class Claim:
    """What :meth:`RedisJournal.claim_dead` took over.

    Attributes:
        dead_members: the members found dead (now removed from the member list); their report
            streams may still hold reports for the claimed keys.
        entries: their ``accepted`` rows, now owned by the claimer, oldest first.
    """

    dead_members: list[str]
    entries: list[JournalEntry]


class RedisJournal:
    """The fleet's journal, as written by one member: a ``SubmitJournal`` (``wujie_async._journal``,
    whose docstrings say what each record does). Open with :meth:`open`."""

    def __init__(self, link: RedisLink, member_id: str) -> None:
        self._link = link
        self.member_id = member_id
        self._prefix = link.keys.journal_prefix
        self._seq = self._prefix + "seq"
        self._intent = Script(link, _INTENT)
        self._move = Script(link, _MOVE)
        self._claim = Script(link, _CLAIM_DEAD)
        self._entries = Script(link, _ENTRIES)
        self._forget = Script(link, _FORGET)
        self._found_key = Script(link, _FOUND_KEY)
        self._restore = Script(link, _RESTORE)
        self._save_asked = Script(link, _SAVE_ASKED)
        self._save_ended = Script(link, _SAVE_ENDED)
        self._saves_cut_off = Script(link, _SAVES_CUT_OFF)
        # What this member wrote of its submits still open (path, request, tag, created): by
        # row id until the key comes, then by key until the outcome. Redis may lose the rows
        # (a FLUSHALL, a restart without AOF): restore() writes them again from here.
        self._intents: dict[int, tuple[str, str, str, float]] = {}
        self._open: dict[str, tuple[str, str, str, float]] = {}
        self._row_of: dict[str, int] = {}  # an open key's row id (its intent's), for restore()
        # Writes that are not awaited go through one queue, in order (accepted before outcome).
        self._later: asyncio.Queue[_Later] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._trying: _Write | None = None  # the record the writer is on
        self._warned_rows: set[str] = set()  # damaged rows already warned about
        self.commits = 0  # writes Redis acknowledged (for client.stats)
        # This member's gateway: fingerprint, base URL, epoch ("": not told).
        self._gateway = ("", "", "")

    def __repr__(self) -> str:
        return f"RedisJournal({self._link.config.name!r}, member={self.member_id!r})"

    def use_gateway(self, fingerprint: str, base_url: str, epoch: str) -> None:
        """This member's gateway (see ``Membership.gateway``): an intent written after
        Redis lost the fleet's gateway record writes it again, with its epoch."""
        self._gateway = (fingerprint, base_url, epoch)

    # --- lifecycle -----------------------------------------------------------------------------
    async def open(self) -> None:
        """Start the writer of not-awaited records."""
        self._later = asyncio.Queue()
        self._writer = asyncio.create_task(
            self._write_later(self._later), name="wujie fleet journal"
        )

    async def warm(self) -> None:
        """Load the intent's script into Redis, which a submit runs between its rate slot
        and its send: that way should be short, and the same for every submit.

        Raises:
            FleetUnavailableError: Redis is unreachable or missed its deadline.
        """
        await self._intent.load()

    async def close(self) -> None:
        """Write what is queued, then stop; gives up after two command deadlines.

        What is given up stays in its earlier state: an intent becomes ``uncertain`` when the
        member's jobs are claimed, the safe reading.
        """
        queue, writer = self._later, self._writer
        self._later = self._writer = None
        if queue is None or writer is None:
            return
        queue.put_nowait(None)
        try:
            async with asyncio.timeout(2 * self._link.config.command_timeout):
                await writer
        except TimeoutError:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            left = int(self._trying is not None)  # taken out of the queue, not written
            while not queue.empty():
                item = queue.get_nowait()
                if isinstance(item, asyncio.Future):
                    if not item.done():
                        item.set_result(None)  # a flush() waiting: given up, as it says
                elif item is not None:
                    left += 1
            logger.warning("fleet journal: %d records not written at close", left)

    async def _write_later(self, queue: asyncio.Queue[_Later]) -> None:
        """Write queued records in order; one that meets Redis away is tried again until it
        lands (or the journal closes), so an outage shorter than ``member_timeout`` loses no
        outcome and no late key: the records after it wait, in order."""
        while (args := await queue.get()) is not None:
            if isinstance(args, asyncio.Future):  # a flush() barrier
                if not args.done():
                    args.set_result(None)
                continue
            self._trying = args
            await self._write_until_landed(args)
            self._trying = None

    async def _write_until_landed(self, write: _Write) -> None:
        """One queued record, tried every ``_RETRY`` seconds while Redis is away."""
        script, args = write
        waited = False
        while True:
            try:
                await script((self._seq,), args)
            except FleetUnavailableError as exc:
                if refused_for_its_data(exc):
                    # Its row is garbled (another process wrote over it): this record can
                    # never land, and must not hold up the ones after it.
                    logger.warning("fleet journal: a record was not written: %s", exc)
                    return
                if not waited:
                    waited = True
                    logger.warning(
                        "fleet journal: records wait for Redis (tried every %gs): %s", _RETRY, exc
                    )
                await asyncio.sleep(_RETRY)
                continue
            self.commits += 1
            if waited:
                logger.info("fleet journal: Redis is back; the waiting records are written")
            return

    def _queue(self, args: tuple[Any, ...], script: Script | None = None) -> None:
        """Queue a record for the writer (a row's move, unless ``script`` says otherwise)."""
        if self._later is None:
            raise ClientStateError(f"{self!r} is not open")
        self._later.put_nowait((script or self._move, args))

    # --- records (the SQLite journal's protocol) ------------------------------------------------
    async def record_intent(
        self, path: str, request: dict[str, Any], tag: str | None = None
    ) -> int:
        body = json.dumps(request, ensure_ascii=False)
        once = secrets.token_hex(8)  # every try is the same write: one row however many run
        now = time.time()
        args = (self._prefix, self.member_id, path, body, tag or "", now, once, *self._gateway)
        keys = (self._seq, self._link.keys.members, self._link.keys.gateway)
        try:
            row_id = await self._waiting_for_redis(
                lambda: self._intent(keys, args), "the submit was not sent"
            )
        except FleetUnavailableError as exc:
            # A try that timed out may still run when Redis wakes: its row is marked unsent
            # (or never made) once Redis is back, not left an intent to read as uncertain.
            with contextlib.suppress(ClientStateError):
                self._queue(
                    (self._prefix, f"once:{once}", "intent", "unsent", "",
                     str(exc)[:_ERROR_CHARS], time.time(), self.member_id)
                )  # fmt: skip
            raise
        self.commits += 1
        self._intents[int(row_id)] = (path, body, tag or "", now)
        return int(row_id)

    async def _waiting_for_redis(self, write: Callable[[], Awaitable[Any]], what: str) -> Any:
        """``write()``, tried again while Redis is away, up to ``unavailable_wait`` seconds
        (each write is idempotent: a try whose reply was lost may have run)."""
        loop = asyncio.get_running_loop()
        wait = self._link.config.unavailable_wait
        deadline = loop.time() + wait
        while True:
            try:
                return await write()
            except FleetUnavailableError as exc:
                if loop.time() >= deadline:
                    raise FleetUnavailableError(
                        f"{what}: fleet Redis unavailable for {wait:g}s ({exc})", url=exc.url
                    ) from None
                await asyncio.sleep(min(0.25, max(0.0, deadline - loop.time())))

    async def record_accepted(self, row_id: int, key: str) -> bool:
        """Write the key the gateway gave (before ``submit()`` returns).

        Returns False, writing nothing, when another row holds ``key`` already (an earlier
        job's key handed out again, as the SQLite journal does).

        Raises:
            ClientStateError: the row is not this member's open intent (claimed meanwhile).
        """
        args = self._accepted(row_id, key)
        earlier, earlier_row = self._open.get(key), self._row_of.get(key)
        written = self._intents.get(row_id)
        self._opened(row_id, key)  # restore() has it, even if this write fails
        try:
            # One try, not unavailable_wait's patience: the job is paid, and until this
            # returns it is neither polled nor held to its deadline. A Redis away raises at
            # once; the client keeps the key in memory and queues it (record_accepted_later),
            # and the member polls the job meanwhile.
            moved = await self._move((self._seq,), args)
        except FleetUnavailableError as exc:
            raise FleetUnavailableError(
                f"key {key} was not journaled: {exc}", url=exc.url
            ) from None
        self.commits += 1
        if int(moved) == 2:
            # The key is the earlier row's: what restore() keeps of it stays that row's, and
            # this submit's intent stays an intent (record_unsent ends it).
            if earlier is not None and earlier_row is not None:
                self._open[key], self._row_of[key] = earlier, earlier_row
            else:
                self._open.pop(key, None)
                self._row_of.pop(key, None)
            if written is not None:
                self._intents[row_id] = written
            return False
        if int(moved) != 1:
            raise ClientStateError(
                f"journal row {row_id} is not an intent of member {self.member_id} any more "
                f"(claimed by another member?); key {key} was not recorded"
            )
        return True

    def record_accepted_later(self, row_id: int, key: str) -> None:
        args = self._accepted(row_id, key)
        self._opened(row_id, key)
        self._queue(args)

    def _opened(self, row_id: int, key: str) -> None:
        written = self._intents.pop(row_id, None)
        if written is not None:
            self._open[key] = written
            self._row_of[key] = row_id

    def _accepted(self, row_id: int, key: str) -> tuple[Any, ...]:
        return (
            self._prefix, row_id, "intent", "accepted", key, "", time.time(), self.member_id,
            *self._intents.get(row_id, ()),
        )  # fmt: skip

    def record_unsent(self, row_id: int, state: str, error: str) -> None:
        if state not in ("rejected", "uncertain", "unsent"):
            raise ValueError(f"record_unsent: state {state!r} is not rejected/uncertain/unsent")
        written = self._intents.pop(row_id, ())
        self._queue(
            (self._prefix, row_id, "intent", state, "", error[:_ERROR_CHARS], time.time(),
             self.member_id, *written)
        )  # fmt: skip

    def record_outcome(self, key: str, state: str, error: str | None = None) -> None:
        if state not in FINAL_STATES:
            raise ValueError(f"record_outcome: {state!r} is not a final state")
        self._open.pop(key, None)
        self._row_of.pop(key, None)
        self._queue(
            (self._prefix, "", "accepted", state, key, (error or "")[:_ERROR_CHARS], time.time(),
             self.member_id)
        )  # fmt: skip

    async def restore(self) -> int:
        """Write again the rows of this member's open jobs that Redis lost (a FLUSHALL, a
        restart without AOF), as ``accepted`` and this member's, so that were it to die its
        jobs would be claimed; returns how many were written. A row another member claimed
        meanwhile is left alone.

        Raises:
            FleetUnavailableError: Redis is unreachable or missed its deadline.
        """
        rows = list(self._open.items())
        restored = 0
        for start in range(0, len(rows), _RESTORE_BATCH):
            args: list[Any] = [self._prefix, self.member_id, time.time()]
            for key, (path, body, tag, created) in rows[start : start + _RESTORE_BATCH]:
                args += [key, self._row_of.get(key, 0), path, body, tag, created]
            keys = (self._seq, self._link.keys.members)
            restored += int(await self._restore(keys, tuple(args)))
        return restored

    async def flush(self) -> None:
        """Wait until every not-awaited record queued so far is written (or given up)."""
        if self._later is None:
            return
        reached: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._later.put_nowait(reached)
        await reached

    # --- reads ---------------------------------------------------------------------------------
    async def entries(
        self, *states: str, tag: str | None = None, owned_by: str | None = None
    ) -> list[JournalEntry]:
        """Rows in the given states (every state when none), with ``tag`` and owner if given.

        The whole fleet's rows, oldest first: a member that took over a queue message finds
        the dead member's submit by its tag.
        """
        for state in states:
            if state not in ALL_STATES:
                raise ValueError(f"journal state {state!r} is not one of {', '.join(ALL_STATES)}")
        wanted = states or ALL_STATES
        if tag == "":
            # Redis keeps an empty tag as none (no row is indexed under it), and its script
            # reads '' as "any tag": find_submit("") returned the newest row of every tag, so a
            # queue message with an empty id attached to another message's job and never sent
            # its own. No row has this tag.
            return []
        await self._own_writes_landed()
        reply = await self._entries(
            (self._seq,), (self._prefix, tag or "", owned_by or "", *wanted)
        )
        return self._read_rows(reply)

    async def _own_writes_landed(self) -> None:
        """Wait for this member's own records queued before a read (the SQLite journal reads
        in the order of its writes): uncertain_submits() right after a SubmitUncertainError
        lists it, and a save that just ended is not read as cut off. Bounded: with Redis away
        the read fails anyway."""
        if self._later is not None and (self._trying is not None or not self._later.empty()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flush(), self._link.config.unavailable_wait)

    def _read_rows(self, reply: list[Any]) -> list[JournalEntry]:
        """The rows of a read script's reply; damaged rows are warned about once each."""
        rows, damaged, unreadable = _rows(reply)
        for ids, what in (
            (damaged, "hold a request that cannot be read (listed with request={}; a key "
             "still resumes them)"),
            (unreadable, "cannot be read at all (left out)"),
        ):  # fmt: skip
            new = [row_id for row_id in ids if row_id not in self._warned_rows]
            if new:  # once per row, not per read
                self._warned_rows.update(new)
                logger.warning(
                    "fleet journal: rows %s %s", snippet(", ".join(new), limit=200), what
                )
        return rows

    # --- saves --------------------------------------------------------------------------------
    async def record_save_asked(self, key: str) -> None:
        """A ``job.save()`` of ``key``'s job begins, this member its saver: acknowledged by
        Redis before its download starts (see the SQLite journal's).

        Queued with the member's other records, in order (after the job's outcome, before the
        save's end), and awaited: with Redis away it is tried again until it lands, and a
        caller that stops waiting (``SaveRecord`` waits ``RECORD_WAIT_S``) leaves it to land,
        before the save's end, once Redis is back.

        Raises:
            ClientStateError: the journal is not open.
        """
        self._queue((self._prefix, key, self.member_id, time.time()), self._save_asked)
        await asyncio.shield(self.flush())

    def record_save_ended(self, key: str) -> None:
        """This member's ``job.save()`` of ``key``'s job ended: every image on disk, or an error
        raised to its caller (queued, not awaited: lost, the next ``resume()`` returns the job
        once more, nothing worse)."""
        try:
            self._queue((self._prefix, key, self.member_id, time.time()), self._save_ended)
        except ClientStateError:
            # Called as a save ends, whatever happened: a journal closed meanwhile must not
            # turn a save that succeeded into an error.
            logger.warning(
                "fleet journal: closed; the end of job %s's save was not recorded (resume() "
                "may return the job once more)",
                shown_key(key),
            )

    async def saves_cut_off(self) -> list[JournalEntry]:
        """This member's ``succeeded`` rows whose save was asked for and never ended: by this
        member, or by a dead member it claimed (:meth:`claim_dead`). Oldest first.

        Raises:
            FleetUnavailableError: Redis is unreachable or missed its deadline.
        """
        await self._own_writes_landed()
        return self._read_rows(
            await self._saves_cut_off((self._seq,), (self._prefix, self.member_id))
        )

    async def record_found_key(self, row_id: int, key: str) -> bool:
        """An ``uncertain`` row's key, found since: the row becomes ``accepted``, this
        member's. False when the row is not uncertain, or a row already holds ``key``."""
        args = (self._prefix, str(int(row_id)), key, time.time(), self.member_id)
        return int(await self._found_key((self._seq,), args)) == 1

    async def forget(self, ids: Iterable[int]) -> int:
        args = [str(int(i)) for i in ids]
        if not args:
            return 0
        return int(await self._forget((self._seq,), (self._prefix, *args)))

    # --- takeover ------------------------------------------------------------------------------
    async def claim_dead(self, member_timeout: float | None = None) -> Claim:
        """Take over the accepted rows of members silent for more than ``member_timeout``,
        and their saves cut off (:meth:`saves_cut_off` lists them then).

        Atomic: every dead member's row goes to exactly one claimer. Their intents become
        ``uncertain``. The claimer must itself be a live member (registered, heartbeating).

        Args:
            member_timeout: seconds without a heartbeat that make a member dead (default: the
                fleet's ``member_timeout``).

        Raises:
            ClientStateError: this member is not a live member of the fleet.
        """
        timeout = self._link.config.member_timeout if member_timeout is None else member_timeout
        keys = self._link.keys
        reply = await self._claim(
            (self._seq, keys.members, keys.member_info, keys.kept_out, keys.kept_out_gateway),
            (self._prefix, self.member_id, round(timeout * 1000), time.time(), self._gateway[0]),
        )
        if int(reply[0]) != 1:
            raise ClientStateError(
                f"member {self.member_id} is not a live fleet member: it cannot claim jobs"
            )
        dead, claimed = list(reply[1]), {int(i) for i in reply[2]}
        entries = []
        if claimed:
            entries = [e for e in await self.entries("accepted", owned_by=self.member_id)
                       if e.id in claimed]  # fmt: skip
        for entry in entries:  # this member's now: restore() keeps them too
            if entry.job_key:
                body = json.dumps(entry.request, ensure_ascii=False)
                self._open[entry.job_key] = (entry.path, body, entry.tag or "", entry.created)
                self._row_of[entry.job_key] = entry.id
        return Claim(dead_members=dead, entries=entries)


def _rows(reply: list[Any]) -> tuple[list[JournalEntry], list[str], list[str]]:
    """The rows of an entries script's reply, and the ids of rows that are damaged (their
    request cannot be read: listed as ``{}``, their key still resumes them) and unreadable
    (not a hash, or no row id: left out). Rows are other processes' writes."""
    flat, garbled = reply
    width = len(_FIELDS) + 1
    rows: list[JournalEntry] = []
    damaged: list[str] = []
    unreadable = [str(row_id) for row_id in garbled]
    for i in range(0, len(flat), width):
        row_id, path, request, state, job_key, tag, error, created, _owner = flat[i : i + width]
        try:
            number = int(row_id)
        except (ValueError, TypeError):
            unreadable.append(str(row_id))
            continue
        parsed, problem = read_stored_request(request)
        if problem is not None:
            damaged.append(str(row_id))
        try:
            when = float(created)
        except (ValueError, TypeError):
            when = 0.0
        rows.append(
            JournalEntry(
                id=number,
                path=path,
                request=parsed,
                state=state,
                job_key=job_key or None,
                tag=tag or None,
                error=error or None,
                created=when,
            )
        )
    return rows, damaged, unreadable
