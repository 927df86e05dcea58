"""Fold the blocks of separately run benchmarks into results/latest.json.

    .venv/bin/python benchmarks/merge_results.py schedule-full.json fleet.json

``run.py --only ...`` and ``fleet.py`` write their own files; a full ``run.py`` takes about
25 minutes. This copies their blocks (``burst``, ``trickle``, ``bad_estimates``,
``targets_met_issue12``; ``fleet.json`` whole, under ``fleet``) into latest.json and records
which file and timestamp each came from under ``sources``, so no figure loses its provenance.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
BLOCKS = ("burst", "trickle", "bad_estimates", "targets_met_issue12")


def merge(names: list[str]) -> dict[str, Any]:
    latest_path = RESULTS / "latest.json"
    latest: dict[str, Any] = json.loads(latest_path.read_text())
    sources: dict[str, str] = latest.setdefault("sources", {})
    for name in names:
        data = json.loads((RESULTS / name).read_text())
        stamp = str(data.get("timestamp", "see the file"))
        if name.startswith("fleet"):
            latest["fleet"] = data
            sources["fleet"] = f"{name} ({stamp})"
            continue
        for block in BLOCKS:
            if block in data:
                latest[block] = data[block]
                sources[block] = f"{name} ({stamp})"
    latest_path.write_text(json.dumps(latest, indent=2) + "\n")
    return latest


if __name__ == "__main__":
    merged = merge(sys.argv[1:])
    print(json.dumps(merged["sources"], indent=2))
