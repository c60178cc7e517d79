"""Promotion gates: the metric a candidate must not be worse at than production, per model.

``Registry.promote`` moves ``production`` to the ``candidate`` version when :func:`judge` says it passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from snap2caption.registry.versions import PRODUCTION, TAG_ROLLED_BACK_AT, ModelVersionInfo


@dataclass(frozen=True)
class Gate:
    """The quality gate a candidate must pass to become production.

    Attributes:
        metric: Version-tag metric compared between candidate and production (e.g. ``test_cider_d``).
        higher_is_better: Direction of ``metric``.
        default_margin: Absolute slack (in the metric's units) allowed when ``promote`` gets no margin.
    """

    metric: str
    higher_is_better: bool = True
    default_margin: float = 0.0

    def passes(self, candidate: float, production: float, margin: float) -> bool:
        """Whether ``candidate`` is not worse than ``production`` by more than ``margin``."""
        if self.higher_is_better:
            return candidate >= production - margin
        return candidate <= production + margin


# One row per model the project trains; extend here (or pass ``gates=`` to Registry) for a new model.
GATES: dict[str, Gate] = {
    "captioner": Gate("test_cider_d", higher_is_better=True, default_margin=0.05),
    "detector": Gate("test_map50_95", higher_is_better=True, default_margin=0.01),
    "tagger": Gate("test_top1", higher_is_better=True, default_margin=0.005),
}


@dataclass(frozen=True)
class PromotionResult:
    """What ``promote`` did and why.

    Attributes:
        name: Registered model name.
        status: ``promoted`` (gate passed), ``overridden`` (gate failed, forced with a reason),
            ``refused`` (gate failed; production unchanged) or ``unchanged`` (candidate already production).
        candidate: The candidate version.
        previous: Production before the call (None when there was none).
        metric: Gate metric name (None when the model has no gate).
        candidate_value: Candidate's gate metric.
        production_value: Production's gate metric.
        margin: Margin used.
        message: One line for a human: the gate's numbers and the verdict.
    """

    name: str
    status: Literal["promoted", "overridden", "refused", "unchanged"]
    candidate: ModelVersionInfo
    previous: ModelVersionInfo | None
    metric: str | None
    candidate_value: float | None
    production_value: float | None
    margin: float
    message: str

    @property
    def promoted(self) -> bool:
        """Whether ``production`` now points at the candidate because of this call."""
        return self.status in ("promoted", "overridden")


def judge(
    gate: Gate | None,
    candidate: ModelVersionInfo,
    production: ModelVersionInfo | None,
    margin: float,
) -> tuple[bool, str]:
    """Apply the gate to a candidate.

    The gate passes when there is no production version yet, or when the candidate's gate metric is not
    worse than production's by more than ``margin``; a candidate that was rolled back out of production
    never passes (only a forced promotion can put it back).

    Returns:
        ``(passed, the gate's numbers and verdict in one line for a human)``.
    """
    if TAG_ROLLED_BACK_AT in candidate.tags:
        return False, (
            f"v{candidate.version} was rolled back out of {PRODUCTION} at "
            f"{candidate.tags[TAG_ROLLED_BACK_AT]}"
        )
    if production is None:
        return True, f"no {PRODUCTION} version yet"
    if gate is None:
        return False, f"no gate defined for {candidate.name!r}; only a forced promotion is possible"
    cand = candidate.metrics.get(gate.metric)
    prod = production.metrics.get(gate.metric)
    if cand is None or prod is None:
        who = "candidate" if cand is None else PRODUCTION
        return False, f"{who} has no {gate.metric} to compare"
    passed = gate.passes(cand, prod, margin)
    direction = "higher" if gate.higher_is_better else "lower"
    word = "passes" if passed else "fails"
    return passed, (
        f"{gate.metric} candidate v{candidate.version}={cand:.4f} vs {PRODUCTION} "
        f"v{production.version}={prod:.4f} (delta {cand - prod:+.4f}, margin {margin:.4f}, "
        f"{direction} is better): {word}"
    )
