"""Collision policy (DESIGN §4.3): who wins when a field changed on both sides to different values.

- bidirectional field, only one side changed: that side's value flows to the other;
- bidirectional field, both changed to different values: a **collision**, won by the entity type's
  ``collision_winner`` (lead: Marketo, contact: Dynamics); the loser's value is recorded;
- one-way field (``to_dynamics`` / ``to_marketo``): whenever the sides differ, the source's value is
  written to the target; values never flow against the field's direction;
- the sides agree: nothing to write, whatever the baseline says.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mdsync.config import Direction, Side
from mdsync.diff import Diff, FieldDiff

# Reasons, as they appear in the plan and the activity log.
MARKETO_CHANGED = "changed in Marketo"
DYNAMICS_CHANGED = "changed in Dynamics"
ONE_WAY_TO_DYNAMICS = "one-way field: Marketo is the source"
ONE_WAY_TO_MARKETO = "one-way field: Dynamics is the source"


def collision_reason(entity_name: str, winner: Side) -> str:
    owner = "Marketo" if winner is Side.MARKETO else "Dynamics"
    return f"collision on a {entity_name}: {owner} wins for {entity_name}s"


@dataclass
class FieldDecision:
    """Per-row decisions for one field (boolean arrays over :attr:`Diff.keys`)."""

    diff: FieldDiff
    to_dynamics: np.ndarray
    to_marketo: np.ndarray
    collision: np.ndarray

    def dynamics_reasons(self, rows: np.ndarray, entity_name: str, winner: Side) -> np.ndarray:
        """Why each selected write to Dynamics happens (``rows``: a boolean mask of writes)."""
        return self._reasons(rows, Side.DYNAMICS, entity_name, winner)

    def marketo_reasons(self, rows: np.ndarray, entity_name: str, winner: Side) -> np.ndarray:
        """Why each selected write to Marketo happens."""
        return self._reasons(rows, Side.MARKETO, entity_name, winner)

    def _reasons(self, rows: np.ndarray, target: Side, entity_name: str, winner: Side) -> np.ndarray:
        direction = self.diff.field.direction
        if direction is not Direction.BOTH:
            one_way = ONE_WAY_TO_DYNAMICS if target is Side.DYNAMICS else ONE_WAY_TO_MARKETO
            return np.full(int(rows.sum()), one_way, dtype=object)
        plain = MARKETO_CHANGED if target is Side.DYNAMICS else DYNAMICS_CHANGED
        return np.where(self.collision[rows], collision_reason(entity_name, winner), plain).astype(object)


def resolve(diff: Diff) -> list[FieldDecision]:
    """Decide, per field and row, which way (if any) a value flows and which collisions occurred."""
    winner = diff.entity.collision_winner
    decisions = []
    for fd in diff.fields:
        differ = ~fd.same
        none = np.zeros(len(differ), dtype=bool)
        if fd.field.direction is Direction.BOTH:
            # Sides that differ cannot both be unchanged (equality is transitive), so a difference is
            # one side's change, or both sides' (a collision, decided by the entity type's winner).
            collision = differ & fd.marketo_changed & fd.dynamics_changed
            only_m = differ & fd.marketo_changed & ~fd.dynamics_changed
            only_d = differ & fd.dynamics_changed & ~fd.marketo_changed
            to_dyn = only_m | collision if winner is Side.MARKETO else only_m
            to_mkt = only_d | collision if winner is Side.DYNAMICS else only_d
        elif fd.field.direction is Direction.TO_DYNAMICS:
            to_dyn, to_mkt, collision = differ, none, none
        else:
            to_dyn, to_mkt, collision = none, differ, none
        decisions.append(FieldDecision(diff=fd, to_dynamics=to_dyn, to_marketo=to_mkt, collision=collision))
    return decisions
