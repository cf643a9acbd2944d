"""Which evaluation of a run is the best so far, by one validation metric, and when to stop for lack of progress.

The trainer feeds it the value of `select_by` at every evaluation (the validation loss, lower is better, or BLEU on
the fixed validation sample, higher is better); the best evaluation's checkpoint becomes best.pt, the weights a run
exports (fairseq's checkpoint_best). `patience` evaluations in a row that do not improve on the best end the run.
The state is four plain values saved in every checkpoint, so that a resumed run continues the count exactly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

# The metrics a run can select by, and whether lower values are the better ones.
LOWER_IS_BETTER = {"loss": True, "bleu": False}


@dataclass
class Selection:
    metric: str  # a key of LOWER_IS_BETTER
    best: float | None = None  # the best value so far (None: no finite value evaluated yet)
    best_step: int | None = None  # the step it was measured at
    evaluations_since_best: int = 0  # later evaluations that did not improve on it

    def update(self, value: float, step: int) -> bool:
        """Record the evaluation at `step`; True if it is the new best (a NaN or infinite value never is)."""
        improved = math.isfinite(value) and (
            self.best is None or (value < self.best if LOWER_IS_BETTER[self.metric] else value > self.best))
        if improved:
            self.best, self.best_step, self.evaluations_since_best = value, step, 0
        else:
            self.evaluations_since_best += 1
        return improved

    def exhausted(self, patience: int) -> bool:
        """Whether `patience` evaluations in a row have not improved (never with patience 0)."""
        return patience > 0 and self.evaluations_since_best >= patience

    def describe(self) -> str:
        if self.best is None:
            return f"no finite validation {self.metric}"
        return f"validation {self.metric} {self.best:.4g} at step {self.best_step}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, state: dict, path: Path, metric: str) -> Selection:
        """The selection saved in the checkpoint `state` read from `path`, for a run that selects by `metric`. A
        checkpoint written before selections were saved holds only its best validation loss (no count: 0)."""
        saved = state.get("selection")
        if saved is None:
            best = state["best_eval_loss"]
            saved = {"metric": "loss", "best": best if math.isfinite(best) else None}
        if saved["metric"] != metric:
            raise ValueError(f"checkpoint {path} selected its best by {saved['metric']}, this run has "
                             f"select_by={metric!r}: resume with --select_by {saved['metric']}, or train in a new run "
                             "directory")
        return cls(**saved)
