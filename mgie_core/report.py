"""What the optimising stages of one run did: updates applied and skipped, with reasons.

Null-text inversion, MAG, A-STAR and identity guidance each count, per run, the updates
they applied and those they skipped with the reason (a non-finite gradient, a loss that
is constant by construction, a zero gradient). The sampler keeps one
:class:`UpdateReport` per run (``SamplingRun.report``), logs it at the end and returns it
with the result; the nodes show its lines as their text output, and the headless runner
prints them. A stage that cannot compute its gradient at all raises
:class:`~.errors.GradientError` instead of counting anything.

Verdicts on the device. Whether a gradient is finite and non-zero is a
property of a device tensor; reading it in every iteration would make the host wait for
the GPU each time. The controls therefore apply or skip their update on the device
(``torch.where``) and hand the verdict to :meth:`UpdateReport.defer`; the report reads
every deferred verdict in one transfer when it is first read (:meth:`flush`: the
samplers call it once at the end of the run), then counts them and logs the warnings
the controls used to log at once, with the same text.
"""

from __future__ import annotations

import dataclasses
import logging

import torch


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
        self._stages: dict[str, UpdateCounts] = {}
        # Lines shown after the counts: what else the run must tell its user (e.g. the
        # words a prompt lost to the text encoder's window).
        self._notes: list[str] = []
        # (stage, step, finite, nonzero, logger): verdicts still on the device
        self._pending: list[tuple] = []

    @property
    def stages(self) -> dict[str, UpdateCounts]:
        self.flush()
        return self._stages

    def counts(self, stage: str) -> UpdateCounts:
        if stage not in self._stages:
            self._stages[stage] = UpdateCounts(stage)
        return self._stages[stage]

    def applied(self, stage: str, n: int = 1) -> None:
        self.counts(stage).applied += n

    def skipped(self, stage: str, reason: str, n: int = 1) -> None:
        c = self.counts(stage)
        c.skipped[reason] = c.skipped.get(reason, 0) + n

    def defer(self, stage: str, step: int, finite: torch.Tensor, nonzero: torch.Tensor,
              logger: logging.Logger | None = None) -> None:
        """Count one update whose verdict is still on the device: applied when ``finite``
        and ``nonzero`` (0-dim bool tensors) are both true; skipped for a non-finite
        gradient (warned on ``logger``) or a zero one. Read at :meth:`flush`."""
        self.counts(stage)                    # keep the order stages first reported in
        self._pending.append((stage, step, finite, nonzero, logger))

    def flush(self) -> None:
        """Read every deferred verdict in one transfer and count it."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        flags = [t.reshape(()).to(torch.bool) for p in pending for t in (p[2], p[3])]
        device = flags[0].device
        values = torch.stack([f.to(device) for f in flags]).tolist()
        for k, (stage, step, _, _, logger) in enumerate(pending):
            finite, nonzero = values[2 * k], values[2 * k + 1]
            if not finite:
                if logger is not None:
                    logger.warning("%s: non-finite gradient at step %d; this update is "
                                   "skipped", stage, step)
                self.skipped(stage, "non-finite gradient")
            elif not nonzero:
                self.skipped(stage, "zero gradient")
            else:
                self.applied(stage)

    def note(self, text: str) -> None:
        """Add a line the report shows after the counts (once)."""
        if text and text not in self._notes:
            self._notes.append(text)

    @property
    def notes(self) -> list[str]:
        return list(self._notes)

    def __bool__(self) -> bool:
        return bool(self.stages) or bool(self._notes)

    def lines(self) -> list[str]:
        return [c.line() for c in self.stages.values()] + self._notes

    def as_dicts(self) -> list[dict]:
        return [c.as_dict() for c in self.stages.values()]

    def log(self, logger: logging.Logger, what: str, level: int = logging.INFO) -> None:
        for line in [c.line() for c in self.stages.values()]:   # notes were logged as made
            logger.log(level, "%s: %s", what, line)

    def get(self, stage: str) -> UpdateCounts | None:
        return self.stages.get(stage)

    def __repr__(self) -> str:
        return "UpdateReport(" + "; ".join(self.lines()) + ")"
