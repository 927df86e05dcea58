"""``client.stats``: the ClientStats snapshot (with FleetStats nested in fleet mode), the live
counters of the poller and the transport behind it, and how it is put together from them, the
journal's and the fleet's. It imports nothing of the package: every part counts into it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FleetRole = Literal["leader", "follower", "local"]


@dataclass(slots=True)
class PollerCounters:
    """Mutable counters behind ``client.stats``."""

    batch_calls: int = 0
    batch_errors: int = 0
    credentials_refused: int = 0
    keys_polled: int = 0
    succeeded: int = 0
    failed: int = 0
    malformed_entries: int = 0
    points_charged: float = 0.0  # the gateway's integral_cost of jobs that ended


@dataclass(slots=True)
class TransportCounters:
    """Mutable counters behind ``client.stats``."""

    http_calls: int = 0
    retries: int = 0
    rate_limited: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetStats:
    """This member's view of its fleet: ``client.stats.fleet`` (None without a fleet).

    Attributes:
        role: ``leader`` (this member polls for the fleet), ``follower`` (a leader polls for
            it) or ``local`` (Redis is away: it polls its own keys).
        size: live members, this one included (refreshed about every second).
        rate: the fleet-wide submit rate (None: no rate set).
        batch_calls: batch calls sent by the fleet's leaders, fleet-wide (refreshed about
            every second; kept in Redis: not a member's own calls while ``local``, and from
            0 again after a Redis restart without persistence).
        keys_polled: keys those calls asked about.
        mean_batch_fill: keys per fleet-wide batch call on average (50 is full).
        leader_calls: batch calls this member sent as a leader (part of ``batch_calls``).
        leader_keys: keys those calls asked about, so far (a key once per call that asked
            about it; ``open_keys`` is how many there are now).
        jobs_learned: ended jobs this member's poll schedule has learned from: its own, and
            those of the other members it polled as a leader; each job once.
        leaders: per shard, the member id of its leader (the holder of its lease) as this
            member last read it (about every second; kept while ``local``); None: no leader
            then (it died, and its lease has not run out or been taken yet).
        open_keys: this member's jobs the fleet polls for it now: its keys in the registry
            (or to be written there once Redis answers).
        jobs_claimed_by_others: jobs of this member that other members claimed (their
            ``resume()``) while the fleet held this member dead, though it was alive (its
            loop frozen, Redis away from it, past ``member_timeout``); found out when it
            joins again (a WARNING says how many).
        keys_claimed_by_others: the keys of those jobs, oldest first (the latest 10,000; a
            tuple: ``dataclasses.asdict`` of the stats stays JSON-friendly). Such a job
            resolves here and at its claimer: a consumer that publishes results skips a job
            whose key is here (its claimer publishes it). Noted before a report of the
            fleet's leader ends the job here.
    """

    role: Literal["leader", "follower", "local"]
    size: int
    rate: float | None
    batch_calls: int
    keys_polled: int
    mean_batch_fill: float
    leader_calls: int
    leader_keys: int
    jobs_learned: int = 0
    leaders: tuple[str | None, ...] = ()
    open_keys: int = 0
    jobs_claimed_by_others: int = 0
    keys_claimed_by_others: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ClientStats:
    """What the client has done so far (a snapshot; read ``client.stats`` again to refresh).

    Attributes:
        submits: submits the gateway accepted (each gave a key; its job is tracked, also
            when its caller cancelled the submit as the key was being journaled).
        submit_errors: submits that raised with no job made for them.
        submits_uncertain: of ``submit_errors``, those that may have been accepted and
            charged with no key to show for it (``SubmitUncertainError``: the reply was lost;
            or cancelled while on the wire); a journal lists them (``uncertain_submits()``).
        batch_calls: batch-detail calls sent.
        batch_errors: batch-detail calls that failed after their retries (a call refused with
            429 is counted in ``rate_limited``; its keys are asked again after Retry-After).
        credentials_refused: of ``batch_errors``, the calls the gateway refused for the
            credentials (HTTP 401 or 403, ``AuthenticationError``): every later call with these
            credentials will be too, and the jobs will wait out their deadlines. A process that
            only collects (the CLI's ``resume``) stops on the first.
        keys_polled: keys asked about, over all batch calls.
        mean_batch_fill: keys per batch call on average (50 is full).
        http_calls: HTTP requests sent, retries included.
        retries: HTTP requests that were retries.
        rate_limited: 429 replies received.
        jobs_outstanding: jobs being tracked now.
        jobs_succeeded: jobs that ended with images.
        jobs_failed: jobs that ended with an error (failed, rejected, timed out, unknown).
        points_charged: points the gateway charged (its ``integral_cost``) for jobs that ended,
            as far as it reported them.
        journal_commits: journal transactions committed (each holds many records; 0 without
            a journal).
        submit_rate_limit: the submit rate (requests/s) the 429 brake allows now; None while
            no brake is in force (the gateway has not refused a sustained share of submits).
        poll_rate_limit: the same for batch-detail calls (each kind of call has its own brake).
        fleet: with ``fleet=``, the fleet as this member sees it; None without a fleet.

    ``batch_calls`` and ``keys_polled`` count what this process sent, as a fleet's leader too.
    """

    submits: int
    submit_errors: int
    batch_calls: int
    batch_errors: int
    keys_polled: int
    mean_batch_fill: float
    http_calls: int
    retries: int
    rate_limited: int
    jobs_outstanding: int
    jobs_succeeded: int
    jobs_failed: int
    points_charged: float = 0.0
    journal_commits: int = 0
    submit_rate_limit: float | None = None
    poll_rate_limit: float | None = None
    fleet: FleetStats | None = None
    submits_uncertain: int = 0
    credentials_refused: int = 0


def snapshot(
    *,
    submits: int,
    submit_errors: int,
    submits_uncertain: int,
    poller: PollerCounters,
    transport: TransportCounters,
    submit_rate_limit: float | None,
    poll_rate_limit: float | None,
    jobs_outstanding: int,
    journal_commits: int,
    fleet: FleetStats | None,
) -> ClientStats:
    """One ClientStats from the live counters (read once, so the figures agree)."""
    calls, keys = poller.batch_calls, poller.keys_polled
    if fleet is not None:  # calls this process sent as the fleet's leader count too
        calls, keys = calls + fleet.leader_calls, keys + fleet.leader_keys
    return ClientStats(
        submits=submits,
        submit_errors=submit_errors,
        batch_calls=calls,
        batch_errors=poller.batch_errors,
        keys_polled=keys,
        mean_batch_fill=keys / calls if calls else 0.0,
        http_calls=transport.http_calls,
        retries=transport.retries,
        rate_limited=transport.rate_limited,
        jobs_outstanding=jobs_outstanding,
        jobs_succeeded=poller.succeeded,
        jobs_failed=poller.failed,
        points_charged=poller.points_charged,
        journal_commits=journal_commits,
        submit_rate_limit=submit_rate_limit,
        poll_rate_limit=poll_rate_limit,
        fleet=fleet,
        submits_uncertain=submits_uncertain,
        credentials_refused=poller.credentials_refused,
    )
