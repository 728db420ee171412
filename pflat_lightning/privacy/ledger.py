"""The privacy ledger: every use of data that the run makes, and whether the accountant covers it."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Literal

Status = Literal["accounted", "public", "unaccounted", "evaluation", "held_out"]
#: One line per status: what it means for the guarantee (the report's markdown prints it under the ledger).
STATUS_MEANINGS = {
    "accounted": "in the accountant's epsilon",
    "public": "no private data",
    "unaccounted": "private data outside the accountant: no formal guarantee",
    "evaluation": "private data read only to measure the trained model; the guarantee is unaffected, the measured "
                  "numbers are not private",
    "held_out": "private data held out of training (the validation split) read without DP to choose the model (layers "
                "kept, checkpoint, stopping epoch); the training set's guarantee holds, the held-out examples get no "
                "protection",
}
STATUSES = tuple(STATUS_MEANINGS)


@dataclass(frozen=True)
class LedgerEntry:
    """One component's use of data.

    Args:
        component: who touched the data (``"dp_sgd"``, ``"AdversarialWeightPerturbation"``, ...).
        status: ``"accounted"`` (in the accountant's epsilon), ``"public"`` (no private data),
            ``"unaccounted"`` (private data outside the accountant: no formal guarantee),
            ``"evaluation"`` (private data read only to measure the trained model, e.g. a membership
            audit: the model's guarantee is unaffected, but the measured numbers are not private),
            ``"held_out"`` (private examples held out of training, the validation split, read without DP to
            choose something the run releases: the layers kept, the checkpoint, the stopping epoch). The
            training set's (epsilon, delta) guarantee still holds: the held-out examples are disjoint from
            the training set, so the choice is post-processing of the DP outputs with data independent of
            the training set. The held-out examples themselves get no protection: what is released may
            reveal them.
        detail: what was done and, for ``unaccounted``, why it breaks the guarantee.
    """

    component: str
    status: Status
    detail: str

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}.")


class PrivacyLedger:
    """Declarations of data use; ``formal_guarantee`` holds only if nothing is unaccounted."""

    def __init__(self) -> None:
        self.entries: List[LedgerEntry] = []

    def record(self, component: str, status: Status, detail: str) -> None:
        entry = LedgerEntry(component, status, detail)
        if entry not in self.entries:
            self.entries.append(entry)

    @property
    def unaccounted(self) -> List[LedgerEntry]:
        return [e for e in self.entries if e.status == "unaccounted"]

    def state_dict(self) -> Dict[str, Any]:
        return {"entries": [asdict(e) for e in self.entries]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """The checkpoint's entries (the data use before it), then what this run has recorded since (a
        callback added on resume): a resumed run's ledger holds both parts of the run."""
        since = list(self.entries)
        self.entries = [LedgerEntry(**e) for e in state["entries"]]
        for entry in since:
            self.record(entry.component, entry.status, entry.detail)
