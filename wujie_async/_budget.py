"""``Limits(max_points=...)``: a points budget held before anything is sent.

A job's cost (the gateway's ``integral_cost``) is known only once it ends, so every submit
reserves what it is expected to cost, and the reservation turns into what was charged when the
job ends. A submit whose reservation would take ``spent + reserved`` past ``max_points`` raises
:class:`BudgetExceededError` before anything is sent (and before the journal records it: a
re-run with a larger budget sends it).

A cost is per image: a price is learned and held per image of a *kind*, a request's model,
size and quality (jobs of n=1, 2 and 3 are one kind, expected to cost 1, 2 and 3 times its
price). What a job is expected to cost, its price times ``n``, that price being:

1. the price table the user passed (``Limits.point_prices``: points per image by ``model``,
   ``model/size`` or ``model/size/quality``, the most specific key winning), or the most an
   image of the kind cost in a job that succeeded in this client if that is more;
2. else the most an image of the kind cost in a job that succeeded in this client (its
   reported cost over its ``n``; a failed job often costs nothing: that is no price);
3. else nothing is known: the first job of the kind (whatever its ``n``) runs alone, if any
   room is left, and others of its kind wait for a price.

The jobs of a kind out when its price becomes known or rises (attached jobs held while it
was unknown, jobs held at a lower price) are held at it from then on, and submits waiting
for a price go on as soon as any job of the kind tells it.

What the budget counts for a job is what the gateway reported, but a job that succeeded (or may
be charged: only the wait for it ended) reported at 0 told nothing (a gateway that says 0 until
the cost is settled): it teaches no price, and its kind is held as if no cost had been
reported; and a job that succeeded, or may be charged, counts at least what it was expected to
cost: the table's price times ``n`` (a cost reported below the table counts at the table: the
budget errs on the side of spending less), or the learned one. Without a table a positive cost,
however small, is the gateway's word and the kind's price: the budget has no other; once one
job of the kind reported more, the jobs after it count at that. ``spent`` is what the budget
counts; ``job.points_charged`` and ``stats.points_charged`` stay what the gateway reported.

Worst case: with a table, or a price learned for each kind, nothing goes past the budget as
long as no job costs more than its kind's expected cost. Each kind whose price is not known yet
may overshoot the budget by the cost of its one probing job; and a job that costs more than its
kind's expected cost (a price that rose, or a table that is short) overshoots by the
difference, as may the jobs of its kind already sent at the old price: from then on its kind is
expected to cost that much, and the jobs of it still out are held so. A job whose end is not
reported with a cost (cancelled, timed out) keeps its reservation as spent (or its kind's
expected cost, if a price learned since says more), so the budget errs on the side of spending
less. A gateway that does not report ``integral_cost`` (or reports 0, or reports it unreadably:
text, a negative number; then its refusals say so, see :meth:`Budget.cost_told_unreadably`) for
a job that succeeded leaves its kind without a price, and so does a probing job whose wait
ended (timed out, cancelled) before the gateway said what it cost (it runs on and will be
charged, at a price nobody knows), or whose end says nothing of a charge: its submit's reply
was lost (``SubmitUncertainError``), the gateway stopped knowing its key (``UnknownJobError``),
reported it only unreadably (``JobProtocolError``) or done without all its images
(``IncompleteJobError``). Without a price table the budget cannot be held for such a kind, and
further submits of it raise :class:`BudgetExceededError` (naming ``Limits.point_prices``)
rather than go on uncounted (each timed-out probe letting the next one go would spend without
limit).
Jobs attached or resumed (not submitted by this client) are neither reserved for nor counted:
their cost belongs to the budget of the client that submitted them, unless the caller says the
budget is theirs too (``attach(..., charge_budget=True)``: a re-run collecting what an earlier
run of the same budget paid for). Such a job is already paid, so it is never refused: its
expected cost is held like a submit's (a job of a kind whose cost is not known yet holds its
kind's submits back, like a probe, until it ends) and turns into what it cost when it ends.
An attached job that this client already counted as maybe charged (its submit's reply was
lost, or only the wait for it ended) is that same job: :meth:`Budget.hold_attached` moves what was
counted for it back out of ``spent`` as it is held again, so it is counted once.

Everything runs on the event loop, with no await between the check and the reservation: two
submits racing for the last points cannot both pass.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import anyio

from ._errors import BudgetExceededError, SubmitUncertainError

Kind = tuple[str, str, str, int]
"""A request's model, size, quality and n (see :func:`kind_of`)."""
PriceKind = tuple[str, str, str]
"""What a price is per image of: a request's model, size and quality."""


class RequestBody(dict[str, Any]):
    """A submit's body as sent, when a budget is kept: a dict that a weak reference can follow
    (``SubmitUncertainError.request`` is this object; see :meth:`Budget.lost_reply`)."""

    __slots__ = ("__weakref__",)


# How many reservations kept as spent (maybe charged) are remembered for an attach of the same
# job to take back (Budget.hold_attached); past it, the oldest are forgotten, and attaching one
# of those counts it again (the budget errs on the side of spending less).
MAYBE_CHARGED_KEPT = 1024


def kind_of(body: Mapping[str, Any], n: int) -> Kind:
    """The kind of a request and its ``n``: jobs of one kind cost the same (its first three
    parts are what a price is per image of: :data:`PriceKind`)."""
    return (
        str(body.get("model")),
        str(body.get("size") or "auto"),
        str(body.get("quality") or "auto"),
        n,
    )


def images_of(kind: Kind) -> int:
    """The images a job of ``kind`` is counted for."""
    # The request rules refuse an n below 1, and prices below 0; should either get here all
    # the same, a negative amount held would make room for other submits (n=-100 at 5 points
    # an image let 500 points more through), so a job counts one image at least.
    return max(kind[3], 1)


class Reservation:
    """The points held for one submit, until it turns into what the job was charged."""

    __slots__ = ("_budget", "_done", "counted", "kind", "points", "probing")

    def __init__(self, budget: Budget, kind: Kind, points: float | None, probing: bool) -> None:
        self._budget = budget
        self.kind = kind
        self.points = points
        self.probing = probing
        self._done = False
        # What its end added to ``spent`` (None: not ended, or given back).
        self.counted: float | None = None

    def release(self) -> None:
        """Nothing was charged (the submit was refused, or never sent): give the points back."""
        if not self._done:
            self._done = True
            self._budget.ended(self, None, charged=False)

    def settle(
        self, charged: float | None, *, succeeded: bool = False, maybe_charged: bool = False
    ) -> None:
        """The job ended: ``charged`` is its reported cost (None: not reported; the
        reservation is kept as spent); ``succeeded``: it ended with its images;
        ``maybe_charged``: its end does not say it cost nothing (only the wait for it ended,
        or its submit's reply was lost, or the gateway lost or garbled it): it may run on,
        or have been charged."""
        if not self._done:
            self._done = True
            self._budget.ended(
                self, charged, charged=True, succeeded=succeeded, maybe_charged=maybe_charged
            )


class Budget:
    """One client's points budget (see the module docstring)."""

    def __init__(self, max_points: float, prices: Mapping[str, float] | None = None) -> None:
        self.max_points = max_points
        self._prices = dict(prices or {})
        self.spent = 0.0
        self.reserved = 0.0
        # The most an image of a kind cost in a job that succeeded (a reported cost over n).
        self._learned: dict[PriceKind, float] = {}
        # Kinds whose job succeeded without a cost told: no price to hold the budget by.
        self._unpriced: set[PriceKind] = set()
        # Kinds a job of which had its cost reported unreadably: its refusals say so.
        self._told_unreadably: set[PriceKind] = set()
        # Kinds whose price is not known yet with a job out (a submit's probe, or jobs held by
        # hold()): how many, and the event set when the last of them ends or a price is known.
        self._probes: dict[PriceKind, _Probe] = {}
        # Every reservation held and not ended, by kind: once a price is known (or rises),
        # the jobs out of its kind are held at it, and later submits see them.
        self._out: dict[PriceKind, set[Reservation]] = {}
        # Reservations kept as spent because their job may have been charged, by what can name
        # that job again (see maybe_charged): an attach charged to the budget takes one back
        # rather than count the job twice.
        self._maybe_charged: OrderedDict[
            object, tuple[Reservation, weakref.ref[RequestBody] | None]
        ] = OrderedDict()

    def estimate(self, kind: Kind) -> float | None:
        """What a job of ``kind`` is expected to cost (never below 0), or None when nothing is
        known."""
        model, size, quality, _ = kind
        images = images_of(kind)
        learned = self._learned.get((model, size, quality))  # per image, > 0 (see ended())
        for key in (f"{model}/{size}/{quality}", f"{model}/{size}", model):
            price = self._prices.get(key)
            if price is not None:
                # A job that cost more than the table says shows the table short: the table
                # alone let 3 jobs charged 12 through at 8 each, 36 points on a 30 budget.
                return max(price, learned or 0.0, 0.0) * images
        return None if learned is None else learned * images

    async def reserve(self, body: Mapping[str, Any], n: int) -> Reservation:
        """Hold the points of one submit, waiting for the probe of its kind if one is out.

        Raises:
            BudgetExceededError: the submit could take the spending past ``max_points``.
        """
        kind = kind_of(body, n)
        priced = kind[:3]
        while True:
            points = self.estimate(kind)
            if points is not None:
                break
            if priced in self._unpriced:
                raise BudgetExceededError(
                    max_points=self.max_points,
                    spent=self.spent,
                    reserved=self.reserved,
                    needed=None,
                    model=kind[0],
                    unpriced=True,
                    reported_unreadably=priced in self._told_unreadably,
                )
            probe = self._probes.get(priced)
            if probe is None:  # the first of its kind goes alone, if there is any room
                self._check(0.0, kind, known=False)
                self._probes[priced] = _Probe()
                return self._out_now(Reservation(self, kind, None, probing=True))
            await probe.ended.wait()  # bounded: probes end by their jobs' deadlines
        self._check(points, kind, known=True)
        self.reserved += points
        return self._out_now(Reservation(self, kind, points, probing=False))

    def cost_told_unreadably(self, body: Mapping[str, Any], n: int) -> None:
        """The gateway reported the cost of a job of ``body`` unreadably (``integral_cost``
        there, but no number of points): it counts as not reported, and a refusal of its kind
        for want of a price says that it was reported, unreadably."""
        self._told_unreadably.add(kind_of(body, n)[:3])

    def hold(self, body: Mapping[str, Any], n: int) -> Reservation:
        """Hold the expected cost of a job already paid for (attached): never refused, even
        past ``max_points`` (later submits are); an unknown cost holds its kind back."""
        return self._hold(kind_of(body, n))

    def hold_attached(self, key: str, request: Mapping[str, Any], n: int) -> Reservation:
        """:meth:`hold` for an attached job, counted once: a job this budget already kept as
        maybe charged (:meth:`maybe_charged`) is that job when named by its key (only the wait
        for it ended), by the very ``request`` object of its ``SubmitUncertainError`` (its
        reply was lost), or by the key its journal row was given (:meth:`key_found`). What its
        end added to ``spent`` leaves it, and its expected cost is held anew, to turn into
        what it cost when it ends."""
        counted = self._take_maybe_charged(key) or self._take_maybe_charged(
            ("request", id(request)), request
        )
        if counted is None:
            return self.hold(request, n)
        was = counted.counted or 0.0
        self.spent -= was
        counted.counted = None
        held = self._hold(counted.kind)
        if was > (held.points or 0.0):
            # What its end counted is held, if more than the estimate (a cost reported above
            # the table): taken back as less, the difference was room for new submits.
            self.reserved += was - (held.points or 0.0)
            held.points = was
        return held

    def maybe_charged(self, handle: str | tuple[str, int], held: Reservation) -> None:
        """``held``'s end kept it as spent (its job may have been charged): remember it by
        ``handle`` (its job key, or ``("row", row_id)``) for an attach of that job
        (:meth:`hold_attached`). The last ``MAYBE_CHARGED_KEPT`` are remembered."""
        self._remember(handle, held, None)

    def lost_reply(self, error: SubmitUncertainError, held: Reservation) -> None:
        """:meth:`maybe_charged` for a submit whose reply was lost, remembered by the very
        ``request`` object its ``error`` carries, for as long as that object lives (held
        weakly: an edit's request carries its images, and a thousand of them must not stay
        in memory). A request that is not a :class:`RequestBody` is not remembered."""
        if isinstance(error.request, RequestBody):
            self._remember(("request", id(error.request)), held, weakref.ref(error.request))

    def _remember(
        self,
        handle: object,
        held: Reservation,
        request: weakref.ref[RequestBody] | None,
    ) -> None:
        remembered = self._maybe_charged
        remembered[handle] = (held, request)
        remembered.move_to_end(handle)
        while len(remembered) > MAYBE_CHARGED_KEPT:
            remembered.popitem(last=False)

    def key_found(self, row_id: int, key: str) -> None:
        """The journal row ``row_id`` (a submit whose reply was lost) was accepted as ``key``:
        an attach of ``key`` charged to the budget is that submit's job."""
        counted = self._take_maybe_charged(("row", row_id))
        if counted is not None:
            self.maybe_charged(key, counted)

    def _take_maybe_charged(
        self, handle: object, request: Mapping[str, Any] | None = None
    ) -> Reservation | None:
        found = self._maybe_charged.pop(handle, None)
        if found is None:
            return None
        held, request_ref = found
        if request_ref is not None and request_ref() is not request:
            return None  # its request is gone, and the id() may be another object's now
        # Taken back already through another of its handles: nothing is counted for it now.
        return held if held.counted is not None else None

    def _hold(self, kind: Kind) -> Reservation:
        points = self.estimate(kind)
        if points is None:
            probe = self._probes.get(kind[:3])
            if probe is None:
                self._probes[kind[:3]] = _Probe()
            else:
                probe.out += 1
            return self._out_now(Reservation(self, kind, None, probing=True))
        self.reserved += points
        return self._out_now(Reservation(self, kind, points, probing=False))

    def _out_now(self, reservation: Reservation) -> Reservation:
        """Count ``reservation`` among the jobs out of its kind, until it ends."""
        self._out.setdefault(reservation.kind[:3], set()).add(reservation)
        return reservation

    def _check(self, points: float, kind: Kind, *, known: bool) -> None:
        room = self.max_points - self.spent - self.reserved
        if points > room or (not known and room <= 0):
            raise BudgetExceededError(
                max_points=self.max_points,
                spent=self.spent,
                reserved=self.reserved,
                needed=points if known else None,
                model=kind[0],
            )

    def ended(
        self,
        reservation: Reservation,
        cost: float | None,
        *,
        charged: bool,
        succeeded: bool = False,
        maybe_charged: bool = False,
    ) -> None:
        """``reservation`` ended: refused or unsent (``charged`` False), or its job ended with
        ``cost`` reported (None: not reported); ``succeeded``: with its images;
        ``maybe_charged``: see ``Reservation.settle``."""
        kind, priced = reservation.kind, reservation.kind[:3]
        held = reservation.points or 0.0
        self.reserved -= held
        out = self._out.get(priced)
        if out is not None:
            out.discard(reservation)
            if not out:
                del self._out[priced]
        if charged:
            if succeeded or maybe_charged:
                # Charged, or may be: a reported 0 is no figure (a gateway that says 0 until
                # the cost is settled freed every hold, 60 points charged on a 20-point
                # budget), and the job counts at least what its kind is expected to cost.
                told = cost if cost is not None and cost > 0 else None
                if succeeded and told is not None:
                    self._learn(priced, told / images_of(kind))
                counted = max(told or 0.0, held, self.estimate(kind) or 0.0)
                if told is None and self.estimate(kind) is None:
                    # Charged (or to be), at a price never told: a next probe would be too.
                    self._unpriced.add(priced)
            else:
                # It failed: what it was charged is what the gateway says (often 0); not
                # reported, what was held (the budget errs on the side of spending less).
                counted = cost if cost is not None else held
            reservation.counted = counted
            self.spent += counted
        if reservation.probing:
            reservation.probing = False
            probe = self._probes.get(priced)
            if probe is not None:
                probe.out -= 1
                if probe.out <= 0:
                    del self._probes[priced]
                    # The others of its kind go on: with its cost, or as a new probe.
                    probe.ended.set()

    def _learn(self, priced: PriceKind, per_image: float) -> None:
        """An image of kind ``priced`` cost ``per_image`` in a job that succeeded: its kind's
        price, if the most so far; the jobs of the kind out are held at it, and the submits
        waiting for a probe of it go on."""
        if per_image <= self._learned.get(priced, 0.0):
            return
        self._learned[priced] = per_image
        # Jobs sent while their price was unknown (a probe of n=1 out, the n=2 price learned)
        # held nothing: 4 more jobs went past them, 28 points charged on a 21-point budget.
        for reservation in self._out.get(priced, ()):
            expected = self.estimate(reservation.kind) or 0.0
            if expected > (reservation.points or 0.0):
                self.reserved += expected - (reservation.points or 0.0)
                reservation.points = expected
            reservation.probing = False
        probe = self._probes.pop(priced, None)
        if probe is not None:
            probe.ended.set()


class _Probe:
    """The jobs out of a kind whose cost is not known yet."""

    __slots__ = ("ended", "out")

    def __init__(self) -> None:
        self.out = 1
        self.ended = anyio.Event()
