"""Membership: who is in the fleet, and who has died.

A sorted set maps member id -> last heartbeat (Redis server time, so machines' clocks do not
matter). A member whose last heartbeat is older than ``member_timeout`` is dead:
``RedisJournal.claim_dead`` may give its jobs to another member, and removes it from the set. A
heartbeat does not bring a dead member back (it says so instead); only joining again does, and
the member then takes back the jobs nobody has claimed yet. Leaving marks the member dead at
once, so its jobs are claimable at once. A member Redis lost, or that was claimed as dead, is
put back by its first journal write without its info (see the journal's ``_INTENT``), so that
it finds itself missing and joins again. The fleet's gateway (one base URL and app id for all)
is checked at every join; who keeps the fleet when two gateways meet is settled by seniority
(see ``_JOIN``).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
import uuid
from typing import Literal

from .._gateway_identity import gateway_fingerprint
from ._errors import FleetMismatchError
from ._link import REDIS_MS, RedisLink, Script

Beat = Literal["refreshed", "unknown", "expired"]

_NOW_MS = REDIS_MS + "local now = redis_ms()\n"
# KEYS: members, info, gateway, kept-out, kept-out-gateway. ARGV: id, info JSON, fingerprint,
# base URL, timeout_ms, epoch (of the gateway record this member last joined under; '' = never
# joined, or refused since), '1' when it has joined, a new epoch (for a record made anew).
# Reply: {0, the fleet's base URL} when refused (a member of another gateway is alive; one that
# had joined marks itself kept out, with its gateway's fingerprint, so that its rows are not
# claimed meanwhile by a member that would ask its own gateway about them: see the journal's
# claim), else {1, epoch, ids of the members whose info it dropped}.
# Seniority: the gateway record's epoch is a random token made with the record and kept while
# it lives (no clock: Redis may come back on a host whose clock is behind). A record made by a
# member that never joined is 'fresh' (a newcomer's, after Redis lost the fleet). A member that
# joined under another epoch, joining again, wins a fresh record back: it takes its epoch, no
# longer fresh, and every other member's info is dropped, so the newcomer's members find
# themselves gone, join again and are refused. A newcomer, or a member refused since it joined,
# never wins; nor does any member against a record that is not fresh (no ping-pong).
_JOIN = (
    _NOW_MS
    + """
local mine, dropped = ARGV[6], {}
if ARGV[3] ~= '' then
  local held = redis.call('HMGET', KEYS[3], 'fingerprint', 'epoch', 'fresh')
  if held[1] and held[1] ~= ARGV[3] then
    local live = redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[5]), '+inf')
    for _, other in ipairs(live) do
      if other ~= ARGV[1] then
        if mine == '' or mine == held[2] or held[3] ~= '1' then  -- only an older fleet wins
          if ARGV[7] == '1' then
            redis.call('ZADD', KEYS[4], now, ARGV[1])
            redis.call('HSET', KEYS[5], ARGV[1], ARGV[3])
          end
          return {0, redis.call('HGET', KEYS[3], 'base_url') or '?'}
        end
        for _, joined in ipairs(redis.call('HKEYS', KEYS[2])) do
          if joined ~= ARGV[1] then dropped[#dropped + 1] = joined end
        end
        if #dropped > 0 then redis.call('HDEL', KEYS[2], unpack(dropped)) end
        break
      end
    end
  end
  redis.call('HSET', KEYS[3], 'fingerprint', ARGV[3], 'base_url', ARGV[4])
  if mine == '' and not held[2] then
    redis.call('HSET', KEYS[3], 'epoch', ARGV[8], 'fresh', '1')
  elseif mine ~= '' and mine ~= held[2] and (held[3] == '1' or not held[2]) then
    redis.call('HSET', KEYS[3], 'epoch', mine)
    redis.call('HDEL', KEYS[3], 'fresh')
  end
end
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return {1, ARGV[3] ~= '' and redis.call('HGET', KEYS[3], 'epoch') or '', dropped}
"""
)
# KEYS: members, info. ARGV: id, timeout_ms. Reply: 1 refreshed, 0 unknown (claimed, or Redis
# lost it; also when only a journal write put it back, without its info), -1 expired (dead).
_HEARTBEAT = (
    _NOW_MS
    + """
local last = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not last or redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 0 end
if now - tonumber(last) > tonumber(ARGV[2]) then return -1 end
redis.call('ZADD', KEYS[1], now, ARGV[1])
return 1
"""
)
# KEYS: members, kept-out. ARGV: id. Marks the member dead now (its last heartbeat becomes 0,
# its kept-out mark goes; the gateway it was kept out with stays: see _JOIN).
_LEAVE = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then redis.call('ZADD', KEYS[1], 0, ARGV[1]) end
return redis.call('ZREM', KEYS[2], ARGV[1])
"""
# KEYS: members. Reply: {server time ms, id1, last1, id2, last2, ...}.
_LIST = (
    _NOW_MS
    + """
local reply = {now}
for _, item in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')) do
  reply[#reply + 1] = item
end
return reply
"""
)


def new_member_id() -> str:
    """A member id unique across machines: host, pid and a random suffix."""
    host = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname())
    return f"{host[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Membership:
    """One member's place in the fleet: joining, heartbeats, leaving; and who else is there."""

    def __init__(self, link: RedisLink, member_id: str) -> None:
        self._link = link
        self.member_id = member_id
        self._join = Script(link, _JOIN)
        self._heartbeat = Script(link, _HEARTBEAT)
        self._leave = Script(link, _LEAVE)
        self._list = Script(link, _LIST)
        self._fingerprint = ""  # of this member's gateway ("": not told, not checked)
        self._base_url = ""
        self._epoch = ""  # of the gateway record it last joined under ("": none, or refused)
        self._joined = False

    def __repr__(self) -> str:
        return f"Membership({self.member_id!r})"

    def use_gateway(self, base_url: str, app_id: str) -> None:
        """The gateway this member asks: checked against the fleet's when it joins. Only a
        SHA-256 of base URL and app id goes to Redis for the comparison, with the base URL
        (to name it in the other members' errors). URLs that name one gateway in different
        spellings (a scheme or host in capitals, the scheme's default port written out, a
        trailing slash) compare equal."""
        self._base_url = base_url
        self._fingerprint = gateway_fingerprint(base_url, app_id)

    @property
    def gateway(self) -> tuple[str, str, str]:
        """This member's gateway as written to Redis: fingerprint, base URL and the epoch of
        the gateway record it joined under; "": not told, or not joined (or refused) since."""
        return self._fingerprint, self._base_url, self._epoch

    async def join(self) -> list[str]:
        """Join, or join again: alive from now on, whatever the fleet thought. Returns the
        members whose entries it dropped, winning the fleet back from members of another
        gateway that came while Redis had lost it (see _JOIN); [] for no win.

        Raises:
            FleetMismatchError: another live member uses another gateway (base URL or app
                id): this member did not join.
        """
        info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "at": time.time()})
        keys = self._link.keys
        timeout_ms = round(self._link.config.member_timeout * 1000)
        mine = (self._fingerprint, self._base_url, timeout_ms, self._epoch, int(self._joined))
        reply = await self._join(
            (keys.members, keys.member_info, keys.gateway, keys.kept_out, keys.kept_out_gateway),
            (self.member_id, info, *mine, secrets.token_hex(8)),
        )
        if int(reply[0]) == 0:
            self._epoch = ""  # refused: never senior to the members that refused it
            theirs = str(reply[1])
            if theirs == self._base_url:
                what = f"base URL {theirs} with another app id than this client's"
            else:
                what = f"base URL {theirs}, this client {self._base_url}"
            raise FleetMismatchError(
                f"fleet {self._link.config.name!r}: its live members use {what}; the members "
                "of one fleet must use one base URL and one app id (its leader asks its own "
                "gateway about every member's jobs): use another fleet name for this client",
                base_url=self._base_url,
                fleet_base_url=theirs,
            )
        self._epoch, self._joined = str(reply[1]), True
        return [str(member) for member in reply[2]]

    async def heartbeat(self) -> bool:
        """Heartbeat once. False: the fleet lost this member or declared it dead (join again)."""
        return await self.beat() == "refreshed"

    async def beat(self) -> Beat:
        """Heartbeat once: ``refreshed``; ``unknown`` (Redis lost this member, or another
        member claimed it as dead: join again); ``expired`` (its last heartbeat is older than
        ``member_timeout``: the fleet may claim it as dead any moment; join again)."""
        timeout_ms = round(self._link.config.member_timeout * 1000)
        keys = self._link.keys
        answer = int(
            await self._heartbeat((keys.members, keys.member_info), (self.member_id, timeout_ms))
        )
        return "refreshed" if answer == 1 else "unknown" if answer == 0 else "expired"

    async def leave(self) -> None:
        """Leave: dead at once, so this member's open jobs are claimable at once."""
        await self._leave((self._link.keys.members, self._link.keys.kept_out), (self.member_id,))

    async def members(self) -> dict[str, float]:
        """Every member the fleet knows of -> seconds since its last heartbeat."""
        reply = await self._list((self._link.keys.members,), ())
        now, flat = int(reply[0]), reply[1:]
        return {flat[i]: (now - int(float(flat[i + 1]))) / 1000 for i in range(0, len(flat), 2)}
