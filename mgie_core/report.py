"""What the optimising stages of one run did: updates applied and skipped, with reasons.

Null-text inversion, MAG, A-STAR and identity guidance each count, per run, the updates
they applied and those they skipped with the reason (a non-finite gradient, a loss that
is constant by construction, a zero gradient). The sampler keeps one
:class:`UpdateReport` per run (``SamplingRun.report``), logs it at the end and returns it
with the result; the nodes show its lines as their text output, and the headless runner
prints them. A stage that cannot compute its gradient at all raises
:class:`~.errors.GradientError` instead of counting anything.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional


@dataclasses.dataclass
class UpdateCounts:
    """One stage's counts: ``applied`` updates and ``skipped`` ones by reason."""

    stage: str
    applied: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def line(self) -> str:
        text = f"{self.stage}: {self.applied} update(s) applied, {self.total_skipped} skipped"
        if self.skipped:
            text += " (" + "; ".join(f"{n} x {reason}" for reason, n in self.skipped.items()) + ")"
        return text

    def as_dict(self) -> dict:
        return {"stage": self.stage, "applied": self.applied, "skipped": dict(self.skipped)}


class UpdateReport:
    """Per-run counts of every optimising stage, in the order they first reported."""

    def __init__(self):
        self.stages: dict[str, UpdateCounts] = {}

    def counts(self, stage: str) -> UpdateCounts:
        if stage not in self.stages:
            self.stages[stage] = UpdateCounts(stage)
        return self.stages[stage]

    def applied(self, stage: str, n: int = 1) -> None:
        self.counts(stage).applied += n

    def skipped(self, stage: str, reason: str, n: int = 1) -> None:
        c = self.counts(stage)
        c.skipped[reason] = c.skipped.get(reason, 0) + n

    def __bool__(self) -> bool:
        return bool(self.stages)

    def lines(self) -> list[str]:
        return [c.line() for c in self.stages.values()]

    def as_dicts(self) -> list[dict]:
        return [c.as_dict() for c in self.stages.values()]

    def log(self, logger: logging.Logger, what: str, level: int = logging.INFO) -> None:
        for line in self.lines():
            logger.log(level, "%s: %s", what, line)

    def get(self, stage: str) -> Optional[UpdateCounts]:
        return self.stages.get(stage)

    def __repr__(self) -> str:
        return "UpdateReport(" + "; ".join(self.lines()) + ")"
