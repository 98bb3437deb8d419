"""Which rows of the model's extendable tables belong to which units and sessions.

A unit is keyed by (animal, unit id): the same neuron recorded on several days of one animal
shares its embedding, a new neuron gets a new row, and a calibration session with re-ordered or
new units is handled by adding rows instead of retraining. Each session (recording) has its own
row in the session table (a learned session token). The vocabulary is saved as JSON next to the
weights (`units.json` in a bundle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rtnf.data.session import Session


def animal_of(session: Session) -> str:
    """The animal a session was recorded from (metadata `animal` or `subject`, else the session)."""
    for key in ("animal", "subject", "identifier"):
        if session.metadata.get(key):
            return str(session.metadata[key])
    return "unknown"


def session_key(session: Session) -> str:
    """The session's identity: metadata `identifier`, else animal and start time."""
    identifier = session.metadata.get("identifier")
    return str(identifier) if identifier else f"{animal_of(session)}@{session.start_time:.6f}"


@dataclass
class Vocabulary:
    """Rows of the unit tables (keyed "animal/unit_id") and of the session table (keyed by id)."""

    units: dict[str, int] = field(default_factory=dict)
    sessions: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def unit_key(animal: str, unit_id: int) -> str:
        return f"{animal}/{int(unit_id)}"

    def add_session(self, session: Session) -> tuple[np.ndarray, int]:
        """Rows for `session`'s units (in `unit_ids` order) and its session row, adding new ones."""
        animal = animal_of(session)
        rows = [self.units.setdefault(self.unit_key(animal, uid), len(self.units))
                for uid in session.unit_ids]
        session_row = self.sessions.setdefault(session_key(session), len(self.sessions))
        return np.asarray(rows, dtype=np.int64), session_row

    def rows_of(self, session: Session) -> tuple[np.ndarray, np.ndarray, int | None]:
        """(rows, known mask, session row or None) without adding anything."""
        animal = animal_of(session)
        keys = [self.unit_key(animal, uid) for uid in session.unit_ids]
        rows = np.array([self.units.get(k, -1) for k in keys], dtype=np.int64)
        return rows, rows >= 0, self.sessions.get(session_key(session))

    @property
    def n_units(self) -> int:
        return len(self.units)

    @property
    def n_sessions(self) -> int:
        return len(self.sessions)

    def to_dict(self) -> dict[str, Any]:
        return {"units": self.units, "sessions": self.sessions}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        return cls(units={str(k): int(v) for k, v in data["units"].items()},
                   sessions={str(k): int(v) for k, v in data["sessions"].items()})
