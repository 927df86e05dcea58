"""What the emulated gateway counts (requests, statuses, batch calls, faults), for tests and
benchmarks: ``Gateway.snapshot()`` and ``/_emulator/stats`` read these counters.

Apart from ``_app`` (which serves the requests) because counting is a job of its own: the
handlers only add to these counters, and ``snapshot()`` reads them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class Stats:
    """Counters kept by the emulator for tests and benchmarks."""

    requests: Counter[str] = field(default_factory=Counter)
    http_statuses: Counter[int] = field(default_factory=Counter)
    batch_sizes: list[int] = field(default_factory=list)
    submits_accepted: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    # (unix time, X-Wujie-Member header or "") of each batch call: tells fleet members apart
    # (unix, not clock, seconds: the members compare them across processes).
    batch_callers: list[tuple[float, str]] = field(default_factory=list)
    # The keys each batch call asked about, in the order of batch_callers.
    batch_keys: list[list[str]] = field(default_factory=list)
    # Requests whose client left before the reply was ready (a timeout, a cancelled task).
    clients_gone: int = 0
    # Unix time of every submit (generation or edit) that arrived, refused ones included: what
    # a submit rate limit counts.
    submit_arrivals: list[float] = field(default_factory=list)
