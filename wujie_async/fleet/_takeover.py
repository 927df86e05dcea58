"""Which of a member's jobs other members took over while the fleet held it dead.

``RedisJournal.claim_dead`` makes the claimer the owner of a dead member's accepted rows (see
``_journal``: ``key:<job key>`` holds the row id, the row its ``owner``). A member the fleet
declared dead while it was alive (its loop frozen past ``member_timeout``) carries on when it
wakes: a job whose row another member owns now is followed, and saved, by both. This reads,
for the keys of the jobs the member follows, which rows are another member's.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._link import RedisLink, Script

# KEYS: the journal's seq (its hash tag). ARGV: journal prefix, member, job keys...
# Reply: the keys whose row another member owns (a key with no row, an attached job's, is
# nobody's). Rows are other processes' writes: a key or row of another type is skipped.
_OWNED_BY_OTHERS = """
local p, me, taken = ARGV[1], ARGV[2], {}
for i = 3, #ARGV do
  local id = redis.pcall('GET', p .. 'key:' .. ARGV[i])
  if type(id) == 'string' then
    local owner = redis.pcall('HGET', p .. 'row:' .. id, 'owner')
    if type(owner) == 'string' and owner ~= me then taken[#taken + 1] = ARGV[i] end
  end
end
return taken
"""
_BATCH = 200  # keys per script call: one call must not hold Redis long


class Takeover:
    """One member's look at which of its jobs' journal rows other members own."""

    def __init__(self, link: RedisLink, member_id: str) -> None:
        self._link = link
        self._member_id = member_id
        self._script = Script(link, _OWNED_BY_OTHERS)

    async def taken(self, keys: Iterable[str]) -> list[str]:
        """The keys among ``keys`` whose journal row another member owns (claimed it).

        Raises:
            FleetUnavailableError: Redis is unreachable or missed its deadline.
        """
        prefix = self._link.keys.journal_prefix
        wanted, found = list(keys), []
        for start in range(0, len(wanted), _BATCH):
            reply = await self._script(
                (prefix + "seq",), (prefix, self._member_id, *wanted[start : start + _BATCH])
            )
            found += [str(key) for key in reply]
        return found
