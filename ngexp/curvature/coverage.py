"""Which trained parameters a curvature estimate covers, and which keep the plain gradient.

Every preconditioner reports this once when it is built (:class:`Coverage`, logged by
:mod:`ngexp.optim.preconditioner`): a warning naming the parameters that keep their gradient
and their share of the parameter count, so that nothing is left out silently.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

#: Parameters named in one line at most; the rest are counted.
NAMED = 12


@dataclass(frozen=True)
class Coverage:
    """Names and element counts of a model's trained parameters, split into those a curvature
    estimate covers (``covered``) and those that keep the plain gradient (``plain``)."""

    covered: list[str]
    plain: list[str]
    covered_count: int
    plain_count: int

    @classmethod
    def of(cls, model: nn.Module, covered: Iterable[nn.Parameter]) -> Coverage:
        """The split of ``model``'s parameters that require grad by the set ``covered``."""
        ids = {id(p) for p in covered}
        trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        inside = [(name, p.numel()) for name, p in trained if id(p) in ids]
        outside = [(name, p.numel()) for name, p in trained if id(p) not in ids]
        return cls([name for name, _ in inside], [name for name, _ in outside],
                   sum(n for _, n in inside), sum(n for _, n in outside))

    @property
    def share(self) -> float:
        """Fraction of the trained parameter count that is covered."""
        total = self.covered_count + self.plain_count
        return self.covered_count / total if total else 1.0

    def describe(self, owner: str) -> str:
        """One line: what ``owner`` preconditions and, by name, what keeps the plain gradient."""
        line = (f"{owner} preconditions {len(self.covered)} parameter tensors "
                f"({self.covered_count:,} values, {100 * self.share:.1f}%)")
        if not self.plain:
            return line
        names = ", ".join(self.plain[:NAMED])
        more = f" and {len(self.plain) - NAMED} more" if len(self.plain) > NAMED else ""
        return (f"{line}; {len(self.plain)} keep the plain gradient ({self.plain_count:,} "
                f"values, {100 * (1 - self.share):.1f}%): {names}{more}")
