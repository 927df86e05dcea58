"""How far a job's end fell from its predicted end, relative to its predicted span: the
sample an ended job adds to its model's errors, bounded."""

from __future__ import annotations

# Relative errors are kept within these bounds: one outlier must not set the scale.
_ERROR_FLOOR = -1.0
_ERROR_CEILING = 10.0


def end_error(predicted: float, span: float, ended: tuple[float, float]) -> float | None:
    """How far an end known to lie within ``ended`` fell from ``predicted``, relative to
    ``span``, as far as it is known: its distance when placed (``ended`` a single point), else
    by how much it surely came late or early; None when it may have come on time."""
    low, high = ended
    if low == high:
        error = (low - predicted) / span
    elif low > predicted:
        error = (low - predicted) / span  # still running after the predicted end
    elif high < predicted:
        error = (high - predicted) / span  # already done before it
    else:
        return None
    return bounded(error)


def bounded(error: float) -> float:
    """``error`` within the bounds: an outlier, not a scale."""
    if _ERROR_FLOOR <= error <= _ERROR_CEILING:
        return error  # (as the line below gives it, without two calls: this runs per end)
    return max(_ERROR_FLOOR, min(error, _ERROR_CEILING))
