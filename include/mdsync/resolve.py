"""Collision policy (DESIGN §4.3): who wins when a field changed on both sides to different values.

- bidirectional field, only one side changed: that side's value flows to the other;
- bidirectional field, both changed to different values: a **collision**, won by the entity type's
  ``collision_winner`` (lead: Marketo, contact: Dynamics); the loser's value is recorded;
- one-way field (``to_dynamics`` / ``to_marketo``): whenever the sides differ, the source's value is
  written to the target; values never flow against the field's direction;
- the sides agree: nothing to write, whatever the baseline says;
- consent flag (``rule: opt_out_wins``, true = opted out): an opt-out on either side wins over an opt-in,
  whatever changed and whatever the entity type's collision winner. The diff compares the flag by its
  opt-out alone (null = false), so where the sides differ exactly one says opted out and exactly one
  changed since the baseline:

  * the opted-out side is the one that changed (a new opt-out, or a first link with no baseline): its
    ``true`` is written to the other side, as a ``consent`` activity line;
  * the other side changed to opted in while the opted-out side still says opted out (a *re-opt-in*): it is
    **not propagated**, and the opted-out side is not written back either. The baseline keeps the opt-out
    and the pair is reported as a ``consent`` line (:attr:`FieldDecision.held`). A re-opt-in takes effect
    only once both sides say opted in (they then agree, and the baseline follows).

  The sync therefore never turns an opt-out into an opt-in.
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
OPTED_OUT_IN_MARKETO = "consent: opted out in Marketo (an opt-out on either side wins)"
OPTED_OUT_IN_DYNAMICS = "consent: opted out in Dynamics (an opt-out on either side wins)"


def held_reason(reopted: Side) -> str:
    """Why a re-opt-in on ``reopted`` is not propagated."""
    here, there = ("Marketo", "Dynamics") if reopted is Side.MARKETO else ("Dynamics", "Marketo")
    return (f"consent: re-opt-in in {here} not propagated: {there} still says opted out (an opt-out on either "
            f"side wins; clear it on both sides to opt back in)")


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
    #: consent flags: re-opt-ins not propagated, by the side that re-opted in (all False for other fields)
    held_marketo: np.ndarray
    held_dynamics: np.ndarray

    @property
    def consent(self) -> bool:
        """Whether this field's writes are consent changes (``opt_out_wins``)."""
        return self.diff.field.opt_out_wins

    def dynamics_reasons(self, rows: np.ndarray, entity_name: str, winner: Side) -> np.ndarray:
        """Why each selected write to Dynamics happens (``rows``: a boolean mask of writes)."""
        return self._reasons(rows, Side.DYNAMICS, entity_name, winner)

    def marketo_reasons(self, rows: np.ndarray, entity_name: str, winner: Side) -> np.ndarray:
        """Why each selected write to Marketo happens."""
        return self._reasons(rows, Side.MARKETO, entity_name, winner)

    def _reasons(self, rows: np.ndarray, target: Side, entity_name: str, winner: Side) -> np.ndarray:
        if self.consent:
            reason = OPTED_OUT_IN_MARKETO if target is Side.DYNAMICS else OPTED_OUT_IN_DYNAMICS
            return np.full(int(rows.sum()), reason, dtype=object)
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
        held_m = held_d = none
        if fd.field.opt_out_wins:
            # Binary on the opt-out: where the sides differ, one says opted out and one changed. The opt-out
            # flows when its side changed; a change to opted in beside an unchanged opt-out is held.
            m_out, d_out = fd.marketo_opted_out, fd.dynamics_opted_out
            to_dyn = differ & m_out & fd.marketo_changed
            to_mkt = differ & d_out & fd.dynamics_changed
            held_d = differ & m_out & ~fd.marketo_changed
            held_m = differ & d_out & ~fd.dynamics_changed
            collision = none
        elif fd.field.direction is Direction.BOTH:
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
        decisions.append(FieldDecision(diff=fd, to_dynamics=to_dyn, to_marketo=to_mkt, collision=collision,
                                       held_marketo=held_m, held_dynamics=held_d))
    return decisions
