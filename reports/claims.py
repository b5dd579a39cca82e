"""A paper's claim checked against a run: the claim, the numbers, and a verdict computed from them.

Verdicts are never written by hand: `check_below` / `check_above` derive them from the measured
value and the bound, and `not_measured` records a claim this run cannot speak to, with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

Verdict = Literal["reproduced", "not reproduced", "not measured"]
VERDICTS: tuple[str, ...] = get_args(Verdict)


@dataclass(frozen=True)
class ClaimResult:
    """One claim of a paper, what this run measured for it, and the verdict.

    claim: the paper's claim restated, e.g. "Validation loss falls well under the unigram entropy"
    source: citation, e.g. "GPT-2 (Radford et al. 2019); nanoGPT"
    metric: what was measured, e.g. "validation loss (nats/token)"
    measured: the measured value; None when not measured
    paper: what the paper reports (a number or a description)
    threshold: the computed test, e.g. "measured < 0.8 × unigram entropy (= 6.12)"
    verdict: "reproduced", "not reproduced" or "not measured"
    detail: how the verdict came about (bound value, ratio, or why nothing was measured)
    limit, direction: the computed bound and the side the measured value must be on ("<" or ">"),
        when the claim is a threshold test; `margin` then says by how much it holds (negative: fails),
        which is what `reports.seeds` tests over seeds
    """

    claim: str
    source: str
    metric: str
    measured: float | None
    paper: str
    threshold: str
    verdict: Verdict
    detail: str = ""
    limit: float | None = None
    direction: Literal["<", ">"] | None = None

    @property
    def margin(self) -> float | None:
        """How far the measured value is on the claim's side of its limit (positive: the claim holds)."""
        return margin(self.measured, self.limit, self.direction)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")
        if self.measured is None and self.verdict != "not measured":
            raise ValueError(f"claim {self.claim!r} has no measured value but verdict {self.verdict!r}")


def margin(measured: float | None, limit: float | None, direction: str | None) -> float | None:
    """limit - measured for a "<" claim, measured - limit for ">"; None when any part is missing."""
    if measured is None or limit is None or direction not in ("<", ">"):
        return None
    return limit - measured if direction == "<" else measured - limit


def _number(value: object) -> float | None:
    """A finite float, or None for None / NaN (accepts numpy and 0-d torch scalars)."""
    if value is None:
        return None
    number = float(value)  # type: ignore[arg-type]
    return None if math.isnan(number) else number


def _check(
    claim: str, source: str, metric: str, measured: object, bound: object, factor: float,
    paper: str, bound_name: str, below: bool, detail: str,
) -> ClaimResult:
    op = "<" if below else ">"
    scaled = bound_name if factor == 1 else f"{factor:g} × {bound_name}"
    value, base = _number(measured), _number(bound)
    if base is None:
        threshold = f"measured {op} {scaled}"
        why = detail or f"{bound_name} was not available"
        return ClaimResult(claim, source, metric, value, paper, threshold, "not measured", why)
    limit = factor * base
    threshold = f"measured {op} {scaled} (= {limit:.4g})"
    if value is None:
        why = detail or ("measured value was NaN" if measured is not None else "no value was measured")
        return ClaimResult(claim, source, metric, None, paper, threshold, "not measured", why, limit=limit, direction=op)
    passed = value < limit if below else value > limit
    if not detail:
        detail = f"{bound_name} = {base:.4g}"
        if base != 0:
            detail += f"; measured / {bound_name} = {value / base:.3g}"
    return ClaimResult(
        claim, source, metric, value, paper, threshold, "reproduced" if passed else "not reproduced", detail,
        limit=limit, direction=op,
    )


def check_below(
    claim: str, source: str, metric: str, measured: float | None, bound: float | None, factor: float,
    paper: str, bound_name: str, *, detail: str = "",
) -> ClaimResult:
    """Reproduced iff `measured < factor * bound` (equal is not below).

    Not measured when `measured` or `bound` is None or NaN. `detail` replaces the computed
    explanation (bound value and the ratio measured / bound).
    """
    return _check(claim, source, metric, measured, bound, factor, paper, bound_name, True, detail)


def check_above(
    claim: str, source: str, metric: str, measured: float | None, bound: float | None, factor: float,
    paper: str, bound_name: str, *, detail: str = "",
) -> ClaimResult:
    """Reproduced iff `measured > factor * bound` (equal is not above); otherwise as `check_below`."""
    return _check(claim, source, metric, measured, bound, factor, paper, bound_name, False, detail)


def not_measured(claim: str, source: str, metric: str, paper: str, why: str) -> ClaimResult:
    """A claim this run does not test; `why` says what would (another run, a benchmark)."""
    return ClaimResult(claim, source, metric, None, paper, "—", "not measured", why)
