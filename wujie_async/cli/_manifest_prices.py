"""Points and prices, as a manifest's rows tell them: what earlier runs spent, what each kind
of job was charged per image (learned for the budget), and what the jobs whose cost no row
records (uncertain ones, or ones the gateway never priced) may have cost.

Apart from ``_manifest`` (the file and its rows) because it is the budget's reading of them:
the run's ``--max-points`` and its summary's points come from here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .._budget import Budget, Kind, PriceKind, kind_of
from .._config import price_key_problem
from .._keys import images_in
from ._manifest import lines_ended, recorded_request


def _points_of(record: dict[str, Any]) -> float | None:
    """The points a manifest row says its job was charged, when it says (and makes sense)."""
    points = record.get("points")
    if isinstance(points, int | float) and not isinstance(points, bool) and points >= 0:
        return points
    return None


def points_spent(records: Iterable[dict[str, Any]]) -> float:
    """The points the manifest's rows say were charged."""
    return sum((points for record in records if (points := _points_of(record)) is not None), 0.0)


def uncertain_unpriced(
    records: Iterable[dict[str, Any]],
    bodies: Mapping[str, Mapping[str, Any]],
    prices: Mapping[str, float] | None,
) -> set[Kind]:
    """The kinds of the lines an earlier run left ``uncertain`` that have no known price.

    Such a line may have been charged, and :func:`uncertain_cost` can count it at nothing:
    a re-run that sent another job of its kind to learn the price would spend past the
    budget by it, once per re-run while replies are lost. The library's budget refuses that
    within a run (the kind is unpriced until ``point_prices`` gives one); so does a re-run.
    """
    pricing = Budget(math.inf, prices)
    kinds: set[Kind] = set()
    for body in _uncertain_bodies(records, bodies):
        kind = kind_of(body, images_in(body) or 1)
        if pricing.estimate(kind) is None:
            kinds.add(kind)
    return kinds


def _uncertain_bodies(
    records: Iterable[dict[str, Any]], bodies: Mapping[str, Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """The request bodies of the lines that ended ``uncertain`` (see :func:`line_outcome`)."""
    return [
        body
        for tag, record in lines_ended(records).items()
        if record.get("status") == "uncertain" and (body := bodies.get(tag)) is not None
    ]


def uncertain_cost(
    records: Iterable[dict[str, Any]],
    bodies: Mapping[str, Mapping[str, Any]],
    prices: Mapping[str, float] | None,
) -> float:
    """The most the lines an earlier run left ``uncertain`` may have been charged.

    A line whose last row is ``uncertain`` (its submit may have been accepted: no key came
    back) is counted at its request's price (``prices``: the user's and what earlier runs were
    charged, by kind); a kind with no known price counts nothing (the budget's guide says
    so). ``bodies``: this run's request bodies by row tag.
    """
    return priced_at(_uncertain_bodies(records, bodies), prices or {}).points


def prices_charged(
    records: Iterable[dict[str, Any]], bodies: Mapping[str, Mapping[str, Any]]
) -> dict[str, float]:
    """Points per image earlier runs were charged, as ``Limits.point_prices`` keys.

    ``bodies``: this run's request bodies by row tag; a saved row whose tag is among them
    gives its job's cost (on one row of the job) for the kind of that request,
    ``model/size/quality`` ("auto" where not given, as the budget reads a kind). Only jobs
    that saved images count (a failed job often costs nothing: that is no price), and a cost
    of 0 is none either; the most a kind cost wins.
    """
    prices: dict[str, float] = {}
    for record in records:
        points, body = _points_of(record), bodies.get(str(record.get("tag")))
        if record.get("status") != "saved" or body is None or points is None:
            continue
        learn_price(prices, body, points)
    return prices


def with_learned_prices(
    given: Mapping[str, float] | None, learned: Mapping[str, float]
) -> dict[str, float]:
    """The user's ``--point-price`` table, and what earlier runs were charged (``learned``,
    from :func:`prices_charged`) for the models the user gave no price for: the user's word
    wins for every kind of a model it names."""
    prices = dict(given or {})
    priced = {key.split("/", 1)[0] for key in prices}
    prices.update(
        (key, price) for key, price in learned.items() if key.split("/", 1)[0] not in priced
    )
    return prices


def learn_price(prices: dict[str, float], body: Mapping[str, Any], points: float) -> None:
    """Put what a job of ``body`` that saved its images cost (``points``) in ``prices``, per
    image, as a ``Limits.point_prices`` key (see :func:`prices_charged`): the most wins."""
    n = body.get("n") or 1
    # A job that saved its images at 0 points was not free: its gateway said 0 before the
    # cost was settled. Taken as a price, it let a re-run's lines go uncounted.
    if not math.isfinite(points) or points <= 0 or not isinstance(n, int) or n < 1:
        return
    model, size, quality, _ = kind_of(body, n)
    key = f"{model}/{size}/{quality}"
    if price_key_problem(key) is not None:
        return  # an unknown model's odd size (not WxH): Limits would refuse the key
    prices[key] = max(prices.get(key, 0.0), points / n)


@dataclass(frozen=True, slots=True)
class Unreported:
    """Jobs that ended without the gateway reporting their cost, counted at their kind's price.

    ``points``: what the ``priced`` ones cost at it; ``unpriced``: jobs whose kind has no
    known price (nothing counts them)."""

    points: float = 0.0
    priced: int = 0
    unpriced: int = 0

    @property
    def jobs(self) -> int:
        """Every such job, priced or not."""
        return self.priced + self.unpriced


def priced_at(requests: Iterable[Mapping[str, Any]], prices: Mapping[str, float]) -> Unreported:
    """What jobs of these requests cost at ``prices`` (as ``Limits.point_prices``)."""
    pricing = Budget(math.inf, prices)
    points, priced, unpriced = 0.0, 0, 0
    for body in requests:
        n = images_in(body) or 1
        model = body.get("model")
        estimate = pricing.estimate(kind_of(body, n)) if isinstance(model, str) else None
        if estimate is None:
            unpriced += 1
        else:
            points += estimate
            priced += 1
    return Unreported(points, priced, unpriced)


def unreported_cost(
    records: Iterable[dict[str, Any]],
    bodies: Mapping[str, Mapping[str, Any]],
    prices: Mapping[str, float],
) -> Unreported:
    """Earlier runs' jobs that saved every image while no manifest row records their cost (the
    gateway did not report it), at their kind's price (``prices``: the user's and what earlier
    runs were charged, by kind).

    A job is the request its rows record (model, size, n; the rest from ``bodies``, this run's
    request bodies by row tag). A job with an image not saved yet is left out: the re-run
    collects it, and its budget holds the job's cost itself.
    """
    return priced_at(_unreported_requests(records, bodies), prices)


def unreported_unpriced(
    records: Iterable[dict[str, Any]],
    bodies: Mapping[str, Mapping[str, Any]],
    prices: Mapping[str, float] | None,
) -> dict[PriceKind, int]:
    """The kinds (model, size, quality) of earlier runs' jobs that saved their images without
    the gateway reporting their cost (see :func:`unreported_cost`) and that have no known
    price, each with how many such jobs.

    Such jobs were charged, and nothing counts them. A re-run with a budget that sent another
    job of the kind to learn its price would learn nothing from a gateway that never reports
    it, and pay once more past the budget: once per re-run (5 re-runs of a 20-point budget
    paid 80). So a re-run sends no line of such a kind until ``--point-price`` gives one.
    """
    pricing = Budget(math.inf, prices)
    kinds: dict[PriceKind, int] = {}
    for body in _unreported_requests(records, bodies):
        kind = kind_of(body, images_in(body) or 1)
        if isinstance(body.get("model"), str) and pricing.estimate(kind) is None:
            kinds[kind[:3]] = kinds.get(kind[:3], 0) + 1
    return kinds


def _unreported_requests(
    records: Iterable[dict[str, Any]], bodies: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The requests of earlier runs' jobs that saved every image while no row records their
    cost (see :func:`unreported_cost`)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if isinstance(key := record.get("key"), str):
            rows.setdefault(key, []).append(record)
    requests: list[dict[str, Any]] = []
    for mine in rows.values():
        saved = [record for record in mine if record.get("status") == "saved"]
        # A cost of 0 for a job that saved its images is no cost reported (a gateway that
        # says 0 until the cost is settled), as the library's budget reads it: counted as 0,
        # each re-run under --max-points paid one more job past the budget.
        if not saved or any((_points_of(record) or 0) > 0 for record in mine):
            continue
        first = saved[0]
        body = recorded_request(first, dict(bodies.get(str(first.get("tag"))) or {}))
        if len({record.get("index") for record in saved}) >= (images_in(body) or 1):
            requests.append(body)
    return requests
