"""The mass-change guard (DESIGN §9, issue 9): a cycle that would write too much to one side asks first.

A botched import or a wrong mapping upstream shows up as a plan that writes to a large part of the other
side at once. Before the loads, :func:`check_run` counts, per side, the distinct records the run's plans
would write (mapped fields, link fields, creates, and what the delete policies do: flags set, records deleted
or deactivated, and persons the sync would merge away in Marketo after a Dynamics merge — a mass delete or
dedupe on one side must not empty the other unasked) and compares them with a threshold:

    threshold = max(max_records, max_percent % of the side's linked records before this cycle)

with ``MDSYNC_GUARD_MAX_RECORDS`` (5,000) and ``MDSYNC_GUARD_MAX_PERCENT`` (10) as defaults. A quiet 5-minute
cycle writes tens of records and a busy one (a list import marked for sync, a campaign touching a segment) a
few thousand at most, all under the 5,000 floor; an import that overwrote a column, or a mapping that makes
every pair differ, writes to most of a table: past 10 % on any base, and past the floor unless the base is
tiny. The floor keeps small bases (and a first sync, which has no links yet) from asking for routine work.

Above the threshold on either side the run writes nothing until someone approves (the DAG's
``approve_mass_change`` task), unless it is a dry run (it writes nothing anyway) or a manual run with
``allow_mass_change``. The decision is pure on frames (:func:`decide`); :func:`check_run` reads a run's
staged plans, and only reads the (large) links frame when a side is over the floor.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import pandas as pd

from mdsync.results import ChangeSample, GuardDecision, RunManifest, SideChanges

log = logging.getLogger("mdsync.guard")

SIDES = ("dynamics", "marketo")
#: the pseudo-field counting link-field writes (dynamicsRecordId / the Dynamics Marketo-id column)
LINK_FIELDS = "(link fields)"
#: the pseudo-field counting the delete policy's flags (deletedInDynamics / the Dynamics deleted column)
DELETED_FLAG = "(deleted flag)"
#: delete-policy actions that remove a record from its side (``flag`` is an update)
REMOVALS = ("delete", "deactivate")
#: records in the sample shown to the approver, and how much of each value
SAMPLE_RECORDS, SAMPLE_FIELDS_PER_RECORD, SAMPLE_VALUE_CHARS = 5, 6, 80
#: outcomes under which the loads write (see :attr:`GuardDecision.proceed`)
UNDER, DRY_RUN, ALLOWED, AWAITING = "under_threshold", "dry_run", "allowed", "awaiting_approval"
APPROVED, REJECTED, TIMED_OUT = "approved", "rejected", "timed_out"


@dataclass(frozen=True)
class Limits:
    """When the guard trips: more records to one side than ``max(max_records, max_percent % of linked)``."""

    max_records: int = 5000
    max_percent: float = 10.0

    @classmethod
    def from_settings(cls, settings) -> "Limits":
        return cls(max_records=settings.guard_max_records, max_percent=settings.guard_max_percent)

    def threshold(self, linked: int | None) -> int:
        share = math.floor(self.max_percent / 100 * linked) if linked else 0
        return max(self.max_records, share)


def _ids(frame: pd.DataFrame | None) -> pd.Index:
    if frame is None or frame.empty:
        return pd.Index([], dtype="int64")
    return pd.Index(frame["person_id"].astype("int64").unique())


def _cut(value) -> str | None:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value)
    return text if len(text) <= SAMPLE_VALUE_CHARS else text[: SAMPLE_VALUE_CHARS - 1] + "…"


def _sample(writes: dict[str, pd.DataFrame], size: int) -> list[ChangeSample]:
    """The field changes of the first ``size`` records (by entity type, then person id): old -> new."""
    out: list[ChangeSample] = []
    left = size
    for entity, frame in sorted(writes.items()):
        if left <= 0:
            break
        if frame is None or frame.empty:
            continue
        persons = sorted(frame["person_id"].astype("int64").unique())[:left]
        left -= len(persons)
        mine = frame[frame["person_id"].isin(persons)].sort_values(["person_id", "field"], kind="stable")
        for _, rows in mine.groupby("person_id", sort=True):
            for row in rows.head(SAMPLE_FIELDS_PER_RECORD).itertuples(index=False):
                dynamics_id = getattr(row, "dynamics_id", None)
                out.append(ChangeSample(entity=entity, person_id=int(row.person_id),
                                        dynamics_id=None if pd.isna(dynamics_id) else str(dynamics_id),
                                        field=str(row.field), old=_cut(getattr(row, "previous", None)),
                                        new=_cut(row.value)))
    return out


def side_changes(writes: dict[str, pd.DataFrame], link_writes: dict[str, pd.DataFrame], created: dict[str, int],
                 linked: int | None, limits: Limits, sample_size: int = SAMPLE_RECORDS,
                 deletes: pd.DataFrame | None = None) -> SideChanges:
    """What the plans would write to one side.

    :param writes: per entity type, the plan's field writes to this side (``person_id, field, value, previous``…).
    :param link_writes: per entity type, link-field writes to this side (``person_id``…).
    :param created: per entity type, records the load would create on this side.
    :param linked: the side's linked records before this cycle (``None``: not counted).
    :param deletes: what the delete policies do on this side (``action``: flag, delete or deactivate;
        ``person_id``, ``entity_type``), as identity decided it.
    """
    out = SideChanges(linked=linked, threshold=limits.threshold(linked))
    deletes = deletes if deletes is not None else pd.DataFrame(columns=["action", "person_id", "entity_type"])
    flags = {str(e): part for e, part in deletes[deletes["action"].eq("flag").to_numpy()].groupby("entity_type")}
    removed = deletes[deletes["action"].isin(REMOVALS).to_numpy()]["entity_type"].value_counts()
    for entity in sorted(set(writes) | set(link_writes) | set(created) | set(flags) | set(map(str, removed.index))):
        w, links, flagged = writes.get(entity), link_writes.get(entity), flags.get(entity)
        updated = _ids(w).union(_ids(links)).union(_ids(flagged))
        fields = {} if w is None or w.empty else \
            {str(k): int(v) for k, v in w.drop_duplicates(["person_id", "field"])["field"].value_counts().sort_index().items()}
        if len(_ids(links)):
            fields[LINK_FIELDS] = len(_ids(links))
        if len(_ids(flagged)):
            fields[DELETED_FLAG] = len(_ids(flagged))
        if len(updated):
            out.updated[entity] = len(updated)
        if fields:
            out.fields[entity] = fields
        if created.get(entity):
            out.created[entity] = int(created[entity])
        if removed.get(entity):
            out.deleted[entity] = int(removed[entity])
    out.records = sum(out.updated.values()) + sum(out.created.values()) + sum(out.deleted.values())
    out.sample = _sample(writes, sample_size)
    return out


def decide(dynamics_writes: dict[str, pd.DataFrame], marketo_writes: dict[str, pd.DataFrame],
           dynamics_link_writes: dict[str, pd.DataFrame], marketo_link_writes: dict[str, pd.DataFrame],
           dynamics_creates: dict[str, int], marketo_creates: dict[str, int], linked: int | None, limits: Limits,
           *, dry_run: bool = False, allowed: bool = False, sample_size: int = SAMPLE_RECORDS,
           deletes: pd.DataFrame | None = None) -> GuardDecision:
    """The guard's decision on one run's plans (pure on frames).

    Writes are per entity type (a person's Marketo writes under the entity type of its Dynamics record).
    ``linked`` is the number of links before this cycle (each side has that many linked records). ``deletes``
    is identity's lifecycle frame (``target`` side, ``action``, ``person_id``, ``entity_type``).
    """
    def on(side: str) -> pd.DataFrame | None:
        return None if deletes is None or deletes.empty else deletes[deletes["target"].eq(side).to_numpy()]

    decision = GuardDecision(max_records=limits.max_records, max_percent=limits.max_percent, sides={
        "dynamics": side_changes(dynamics_writes, dynamics_link_writes, dynamics_creates, linked, limits, sample_size,
                                 on("dynamics")),
        "marketo": side_changes(marketo_writes, marketo_link_writes, marketo_creates, linked, limits, sample_size,
                                on("marketo")),
    })
    if decision.tripped:
        decision.outcome = DRY_RUN if dry_run else ALLOWED if allowed else AWAITING
    return decision


def _by_entity(frame: pd.DataFrame, column: str) -> dict[str, pd.DataFrame]:
    if frame.empty or column not in frame:
        return {}
    return {str(e): part for e, part in frame.groupby(column, sort=True)}


def _counts(frame: pd.DataFrame) -> dict[str, int]:
    if frame.empty or "entity_type" not in frame:
        return {}
    return {str(k): int(v) for k, v in frame["entity_type"].value_counts().items()}


def check_run(manifest: RunManifest, staging, limits: Limits, *, dry_run: bool = False, allowed: bool = False,
              sample_size: int = SAMPLE_RECORDS) -> GuardDecision:
    """:func:`decide` on a run's staged plans and identity (link writes, creates, links)."""
    s, identity = staging, manifest.identity
    d_writes = {p.entity: s.read_frame(p.dynamics_writes) for p in manifest.plans}
    m_writes = {p.entity: s.read_frame(p.marketo_writes) for p in manifest.plans}
    d_links = {e: s.read_frame(path) for e, path in identity.dynamics_link_writes.items()}
    m_links = _by_entity(s.read_frame(identity.marketo_link_writes), "dynamics_type")
    creates = (_counts(s.read_frame(identity.dynamics_creates)), _counts(s.read_frame(identity.marketo_creates)))
    deletes = s.read_frame(identity.deletes) if identity.deletes else None
    if identity.marketo_merges:  # persons the load would merge away in Marketo: removals too
        merges = s.read_frame(identity.marketo_merges)
        if not merges.empty:
            merged = pd.DataFrame({"target": "marketo", "action": "delete",
                                   "person_id": merges["loser_id"].astype("int64"),
                                   "entity_type": merges["entity_type"].astype(str),
                                   "dynamics_id": merges["dynamics_id"].astype(object)})
            deletes = merged if deletes is None or deletes.empty else pd.concat([deletes, merged], ignore_index=True)
    args = (d_writes, m_writes, d_links, m_links, *creates)
    kw = dict(dry_run=dry_run, allowed=allowed, sample_size=sample_size, deletes=deletes)
    decision = decide(*args, None, limits, **kw)
    if any(side.records > limits.max_records for side in decision.sides.values()):
        links = s.read_frame(identity.links)  # every link: only read when the floor alone does not decide
        # the pairs a delete ended this cycle were linked before it, though no longer in the links frame
        ended = 0 if deletes is None else int(deletes["person_id"].nunique())
        linked = (int((~links["new"].astype(bool)).sum()) if "new" in links else len(links)) + ended
        decision = decide(*args, linked, limits, **kw)
    for line in describe(decision):
        log.info(line)
    return decision


def describe(decision: GuardDecision) -> list[str]:
    """Log and report lines: one per side, then what the outcome means."""
    lines = []
    for name in SIDES:
        side = decision.sides.get(name)
        if side is None:
            continue
        linked = "not counted" if side.linked is None else f"{side.linked:,}"
        per_entity = ", ".join(f"{e} {side.updated.get(e, 0):,} updated + {side.created.get(e, 0):,} created"
                               + (f" + {side.deleted[e]:,} deleted" if side.deleted.get(e) else "")
                               for e in sorted(set(side.updated) | set(side.created) | set(side.deleted))) or "nothing"
        lines.append(f"mass-change guard: {side.records:,} records to {name.capitalize()} ({per_entity}); "
                     f"threshold {side.threshold:,} (max of {decision.max_records:,} and {decision.max_percent:g} % "
                     f"of {linked} linked){' -- OVER' if side.tripped else ''}")
    lines.append(f"mass-change guard: {OUTCOME_TEXT.get(decision.outcome, decision.outcome)}"
                 + (f" (by {decision.responded_by})" if decision.responded_by else ""))
    return lines


OUTCOME_TEXT = {
    UNDER: "under the threshold: the loads go ahead without asking",
    DRY_RUN: "over the threshold, but this is a dry run: nothing is written and nobody is asked "
             "(a real run would wait for approval)",
    ALLOWED: "over the threshold, allowed by the run parameter allow_mass_change: the loads go ahead",
    AWAITING: "over the threshold: nothing is written until someone approves in the Airflow UI "
              "(task approve_mass_change)",
    APPROVED: "mass change approved: the loads go ahead",
    REJECTED: "mass change REJECTED: nothing was written; watermarks and baselines did not move, so the same "
              "changes are still there for the next cycle",
    TIMED_OUT: "mass change not approved in time (timed out): nothing was written; watermarks and baselines did "
               "not move, so the same changes are still there for the next cycle",
}
