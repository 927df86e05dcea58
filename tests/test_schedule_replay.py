"""The schedule's decisions, pinned: a poller's life replayed against it (``schedule_replay``)
gives the very record it gave when these digests were taken, float for float.

A change meant only to make the schedule cheaper must leave them be. One meant to change what
the schedule decides changes them: check its effect on asks and lateness (``benchmarks/run.py``)
and take the new digests (``python -m tests.schedule_replay``).
"""

from __future__ import annotations

import pytest

from .schedule_replay import JOBS, SEEDS, digest

# seed: (asks, generation bumps, SHA-256 of the record). The seeds mix one to three models of
# right, whole-second, noisy, 3x long, outlying, placeholder, typical, clamped and missing
# estimates, with and without queues, progress (whole, tenths, uneven, starting at 10%) and end
# stamps (fine, whole seconds, a skewed clock), in bursts and trickles, under two policies.
PINNED: dict[int, tuple[int, int, str]] = {
    0: (2182, 11, "127ea39890265dda029537c4e77db9fa3877e0af735ca36e7148f20314a08169"),
    1: (921, 3, "51e3d2d95fb2b5e78eaddc7226530ba5050f0394f422134317759b21c0502497"),
    2: (930, 2, "33752b20abfba2362279796cc12ed92d43c7ae1380fb43b82ab4cd790b4b72f4"),
    3: (1537, 8, "cce3b2b830d10656efb61bafa65535b4635e40288dbc1876f1d63f1214e47065"),
    4: (831, 2, "19a6c0b063472eaf056800d9d8573ebf80bf211bda886b350285ff486669b7aa"),
    5: (1093, 6, "68830b89034c541ba5f948d562b73dea35a49a93e9c14984e8632b49e25f37a4"),
    6: (1276, 3, "3b44e51170cf54f4fd8dbf018ab981a8d8863c1245aaf1378614a41e662ba27f"),
    7: (761, 0, "5b96b63a9fc2bf9223fb44c35d9da509abd32ca14f71b308fed0da4000ff6289"),
    8: (975, 5, "04f14dbef2ef7053a34db351cbbdac35847fc20fd08ef7e94bde12e105998d14"),
    9: (1690, 3, "f412f2f1ab561e73cfe02fd014f3207edd3a1e71fe319b608c957fd80b5aa5a4"),
    10: (1136, 7, "bd6b5f79f275537988b601d1d64d5a9bafdac1b21a56eddd58fc9426273cd5f2"),
    11: (3307, 6, "780ea9b71b0c19485e1584a685f5e7c7dc95af10a8c8cfd010c8456e84b741ed"),
}


@pytest.mark.parametrize("seed", SEEDS)
def test_the_schedule_decides_as_it_did(seed: int) -> None:
    asks, bumps, record = digest(seed, JOBS)
    expected_asks, expected_bumps, expected_record = PINNED[seed]
    assert (asks, bumps) == (expected_asks, expected_bumps), "asks or window widenings differ"
    assert record == expected_record, "same asks and widenings, but some decision differs"
