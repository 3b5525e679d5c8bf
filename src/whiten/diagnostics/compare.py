"""The noise rule: is one optimizer's seed-mean better, worse, or within noise of another's?

Every comparison of the claims page (``whiten diagnose claims``, ``docs/diagnostics/claims.md``) and of
the bench's Pro-KLShampoo-vs-KL-Shampoo table goes through :func:`compare`, so there is one rule:

    noise = max(std_a, std_b, abs_floor, rel_floor * min(|mean_a|, |mean_b|))
    |mean_a - mean_b| <= noise          -> "within noise"
    otherwise the smaller mean is better (``lower_is_better``), the larger worse

``std`` is the sample standard deviation over seeds (0 for one seed). The floors per kind of number
(:data:`NOISE_FLOORS`):

* losses: ``abs_floor = 0.01`` nats (differences below 0.01 are not called, however tight the seeds);
* seconds (wall-clock, process CPU, ms per step) and steps: ``rel_floor = 0.05`` (5% of the smaller mean:
  timings on a shared machine move by a few percent between otherwise identical runs);
* bytes (optimizer state, peak RSS, CUDA peak): ``rel_floor = 0.01``;
* power-law alpha: ``abs_floor = 0.05``.

A target loss that one side never reached (``None``) loses to one the other side reached; neither
reaching it is ``"neither reached"``; a missing number on either side is ``"n/a"``.

The claim verdict from cell verdicts (:func:`claim_verdict`): "A beats B" is **confirmed** when every
measured cell is ``better``, **partly** when some but not all are, **refuted** when none is (every cell
worse or within noise), and **not testable here** when no cell could be measured.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

BETTER, WORSE, NOISE = "better", "worse", "within noise"
NEITHER, MISSING = "neither reached", "n/a"
CONFIRMED, PARTLY, REFUTED, NOT_TESTABLE = "confirmed", "partly", "refuted", "not testable here"

# kind of number -> (abs_floor, rel_floor)
NOISE_FLOORS: dict[str, tuple[float, float]] = {
    "loss": (0.01, 0.0),
    "seconds": (0.0, 0.05),
    "steps": (0.0, 0.05),
    "bytes": (0.0, 0.01),
    "alpha": (0.05, 0.0),
}


def seed_stats(values: Iterable[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "n"}`` over the finite values (sample std; 0 for one value; ``None`` for none)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": statistics.fmean(finite),
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "n": len(finite),
    }


def noise_level(a: Mapping[str, Any], b: Mapping[str, Any], kind: str) -> float:
    """The rule's threshold for two ``{"mean", "std"}`` entries of the given kind."""
    if kind not in NOISE_FLOORS:
        raise ValueError(f"kind {kind!r} is not valid; use one of {sorted(NOISE_FLOORS)}")
    abs_floor, rel_floor = NOISE_FLOORS[kind]
    scale = min(abs(a["mean"]), abs(b["mean"]))
    return max(a.get("std") or 0.0, b.get("std") or 0.0, abs_floor, rel_floor * scale)


def compare(
    a: Mapping[str, Any] | None, b: Mapping[str, Any] | None, kind: str, *, lower_is_better: bool = True
) -> str:
    """``a`` against ``b``: ``"better"``, ``"worse"``, ``"within noise"`` (or ``"neither reached"`` / ``"n/a"``).

    ``a`` / ``b``: ``{"mean", "std"}`` (a bench summary's stats entry), or ``None`` for a target not reached.
    """
    if kind not in NOISE_FLOORS:
        raise ValueError(f"kind {kind!r} is not valid; use one of {sorted(NOISE_FLOORS)}")
    a_mean = None if a is None else a.get("mean")
    b_mean = None if b is None else b.get("mean")
    if a is None or b is None:
        # only to-target entries are None: the side that got there wins
        if a is None and b is None:
            return NEITHER
        reached = b if a is None else a
        if reached.get("mean") is None:
            return MISSING
        return WORSE if a is None else BETTER
    if a_mean is None or b_mean is None or not (math.isfinite(a_mean) and math.isfinite(b_mean)):
        return MISSING
    diff = a_mean - b_mean
    if abs(diff) <= noise_level(a, b, kind):
        return NOISE
    return BETTER if (diff < 0) == lower_is_better else WORSE


def not_worse(verdict: str) -> bool:
    """A cell that keeps up: better or within noise ("at SOAP-level step time")."""
    return verdict in (BETTER, NOISE)


def claim_verdict(cells: Sequence[str], *, passing: Iterable[str] = (BETTER,)) -> str:
    """The claim's verdict from its cells' verdicts (module doc); ``n/a`` and ``neither reached`` are not counted."""
    passing = set(passing)
    return verdict_of([None if c in (MISSING, NEITHER) else c in passing for c in cells])


def verdict_of(passes: Sequence[bool | None]) -> str:
    """All measured parts pass: confirmed; some: partly; none: refuted; nothing measured (``None``): not testable."""
    measured = [p for p in passes if p is not None]
    if not measured:
        return NOT_TESTABLE
    if all(measured):
        return CONFIRMED
    return PARTLY if any(measured) else REFUTED


def combine_verdicts(verdicts: Sequence[str]) -> str:
    """Several parts of one claim: confirmed only if all are, refuted only if all are."""
    tested = [v for v in verdicts if v != NOT_TESTABLE]
    if not tested:
        return NOT_TESTABLE
    if all(v == CONFIRMED for v in tested):
        return CONFIRMED if len(tested) == len(verdicts) else PARTLY
    if all(v == REFUTED for v in tested):
        return REFUTED
    return PARTLY
