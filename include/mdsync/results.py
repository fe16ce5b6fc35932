"""Typed results handed from one stage of the cycle to the next (XCom material: paths and counts, no frames).

Every task returns one of these as JSON (``model_dump(mode="json")``) and the next task validates it back
(``model_validate``). Frames live in the staging area; a result names their staged paths. The
:class:`RunManifest` gathers every stage's result of one run: commit and report take it whole.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StageResult(BaseModel):
    """What every stage reports besides its own paths and counts."""

    model_config = ConfigDict(extra="forbid")

    #: API calls this stage's task made, per service (``marketo``, ``dynamics``), tokens included
    calls: dict[str, int] = Field(default_factory=dict)
    #: seconds this stage's task waited for each service's call limits (client side), summed over its calls
    waited_s: dict[str, float] = Field(default_factory=dict)
    #: wall time of the stage in seconds
    elapsed_s: float = 0.0

    def dump(self) -> dict[str, Any]:
        """JSON-ready form for XCom."""
        return self.model_dump(mode="json")


class SchemaResult(StageResult):
    #: staged field access (JSON)
    access: str
    refreshed: bool = False
    dropped_fields: int = 0


class MarketoExtracted(StageResult):
    persons: str
    deleted: str
    high_water: datetime | None = None
    since: datetime | None = None
    extracted: int = 0
    #: the run reconciles everything (first cycle, on demand, or the periodic full reconcile)
    full: bool = False
    #: how persons were read: ``changes`` (lead-change activities), ``bulk_window`` (bulk activity and lead
    #: export of a large window), ``bulk_all`` (bulk export of every person), ``undo`` (an undo run: by id, the
    #: persons the undone run wrote)
    mode: str = "changes"
    #: every Marketo person is in ``persons`` (identity needs no Marketo lookups)
    complete: bool = False
    #: a manual run's ``person_ids`` that Marketo does not have (reported in the log and the run's report)
    missing_person_ids: list[int] = Field(default_factory=list)
    #: persons merged away in the window (``loser_id, winner_id``; None for an undo run)
    merges: str | None = None


class DynamicsEntityExtracted(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rows: str
    deleted: str
    delta_link: str | None = None
    high_water: datetime | None = None
    extracted: int = 0
    #: every row of the table was read (no or expired delta link, or a full reconcile)
    full_read: bool = False


class AccountsExtracted(BaseModel):
    """Accounts changed since their delta link, and the contacts of those accounts (:mod:`mdsync.accounts`)."""

    model_config = ConfigDict(extra="forbid")

    #: changed accounts (raw Web API columns)
    accounts: str
    #: contact id and parent lookup of the contacts of changed accounts
    contacts: str
    delta_link: str | None = None
    high_water: datetime | None = None
    extracted: int = 0
    deleted: int = 0
    contacts_read: int = 0
    full_read: bool = False


class DynamicsExtracted(StageResult):
    entities: dict[str, DynamicsEntityExtracted] = Field(default_factory=dict)
    full: bool = False
    #: the ``accounts`` section's read (None: no such section, or an undo run)
    accounts: AccountsExtracted | None = None


class Identified(StageResult):
    #: every link after identity (index person_id: dynamics_type, dynamics_id, method, new)
    links: str
    #: Marketo persons (raw API columns): extracted plus looked up
    persons: str
    #: per entity type, Dynamics rows (raw API columns): extracted plus looked up
    records: dict[str, str]
    #: person ids whose link was dropped (deleted on a side)
    unlinked: str
    activity: str
    #: Dynamics rows to create as Marketo persons (entity_type, dynamics_id, email)
    marketo_creates: str
    #: Marketo persons to create as Dynamics records (person_id, entity_type, email)
    dynamics_creates: str
    #: link fields to (re)write: Marketo (person_id, dynamics_id, dynamics_type), Dynamics per entity type
    marketo_link_writes: str
    dynamics_link_writes: dict[str, str]
    new_links: int = 0
    #: creates wanted on each side (done by the load stage)
    creates_wanted: dict[str, int] = Field(default_factory=dict)
    #: values a service refused in a lookup (set aside with a record-level error)
    refused: int = 0
    #: what the delete policies do to deleted pairs' survivors (target, action, person_id, entity_type,
    #: dynamics_id: flags go with the load's writes, deletes and deactivations after them)
    deletes: str | None = None
    #: the pairs a delete ended (recorded at commit, so their survivors are not re-linked nor re-created)
    deletions: str | None = None
    #: kept links whose record left or entered the sync filter (person_id, paused)
    paused: str | None = None
    #: counts per lifecycle decision: ``flag``, ``delete``, ``deactivate`` (to do), ``left_filter``, ``entered_filter``
    lifecycle: dict[str, int] = Field(default_factory=dict)
    #: the accounts read by extract_dynamics, handed on to the contact plan (which takes the persons' company fields
    #: from them)
    accounts: AccountsExtracted | None = None
    #: persons to merge in Marketo (winner_id, loser_id, entity_type, dynamics_id, detail: the load does it)
    marketo_merges: str | None = None
    #: pairs a merge handed to another person or record (from_person, to_person): baselines follow them
    moved: str | None = None
    #: Dynamics records whose Marketo-id column is emptied before the link writes (entity_type, dynamics_id,
    #: person_id: merged subordinates whose person moved to their master)
    link_clears: str | None = None
    #: persons merged away in Marketo to remember (loser_id, winner_id), recorded at commit
    merges: str | None = None


class RecordField(BaseModel):
    """One field of one linked pair, named in a result (a change shown to an approver, a value an undo kept)."""

    model_config = ConfigDict(extra="forbid")

    entity: str
    person_id: int
    dynamics_id: str | None = None
    field: str


class UndoItem(RecordField):
    """A value an undo did not restore because it changed after the undone run wrote it (values cut short)."""

    #: the side(s) where it changed since: ``dynamics``, ``marketo`` or ``both``
    changed_in: str
    #: what the undone run wrote, what the changed side holds now, and what the undo would have restored
    wrote: str | None = None
    now: str | None = None
    restore: str | None = None


class UndoSummary(BaseModel):
    """What an undo run's plan of one entity type did not restore, and what it only lists (:mod:`mdsync.undo`)."""

    model_config = ConfigDict(extra="forbid")

    #: the undone run
    run_id: str
    #: pair-fields the undone run wrote that the undo restores (on one or both sides)
    restores: int = 0
    #: pair-fields not restored, per reason (``changed_later``, ``consent``, ``not_found``, ...)
    skipped: dict[str, int] = Field(default_factory=dict)
    #: records the undone run created, and links it made (listed, not deleted)
    created: int = 0
    linked: int = 0
    #: the first of the values not restored because they changed later
    changed_later: list[UndoItem] = Field(default_factory=list)


class AccountsPlanned(BaseModel):
    """Counts of the account fields a contact plan writes to persons (:mod:`mdsync.accounts`)."""

    model_config = ConfigDict(extra="forbid")

    #: accounts read (changed, or parents of moved and newly linked contacts) and persons compared with them
    accounts: int = 0
    persons: int = 0
    #: account fields to write to persons, and those held back (Marketo rejected the same value before)
    to_marketo: int = 0
    held: int = 0


class Planned(StageResult):
    entity: str
    dynamics_writes: str
    marketo_writes: str
    baseline_updates: str
    activity: str
    compared: int = 0
    to_dynamics: int = 0
    to_marketo: int = 0
    collisions: int = 0
    held: int = 0
    #: an undo run's plan: what it restores, skips and lists
    undo: UndoSummary | None = None
    #: the contact plan: what it takes from accounts (its writes and baselines are among the plan's own)
    accounts: AccountsPlanned | None = None


class ChangeSample(RecordField):
    """One planned field change shown to whoever approves a mass change (values cut short)."""

    old: str | None = None
    new: str | None = None


class SideChanges(BaseModel):
    """What a cycle's plans would write to one side, against the mass-change guard's threshold."""

    model_config = ConfigDict(extra="forbid")

    #: distinct records the cycle would write on this side (updated or created)
    records: int = 0
    #: linked records of this side before the cycle (``None``: not counted, the records are under the floor)
    linked: int | None = None
    #: the guard trips when ``records`` is above this
    threshold: int = 0
    #: per entity type: records updated (mapped fields or link fields) and records created
    updated: dict[str, int] = Field(default_factory=dict)
    created: dict[str, int] = Field(default_factory=dict)
    #: per entity type: records the delete policy ``propagate`` would delete (or deactivate) on this side
    deleted: dict[str, int] = Field(default_factory=dict)
    #: per entity type: field -> records whose field would change (``(link fields)`` for the link fields,
    #: ``(deleted flag)`` for the delete policy ``flag``)
    fields: dict[str, dict[str, int]] = Field(default_factory=dict)
    #: a few of the changes, old -> new
    sample: list[ChangeSample] = Field(default_factory=list)

    @property
    def tripped(self) -> bool:
        return self.records > self.threshold


class GuardDecision(StageResult):
    """The mass-change guard's decision on a run's plans (:mod:`mdsync.guard`)."""

    #: ``dynamics`` and ``marketo``
    sides: dict[str, SideChanges] = Field(default_factory=dict)
    max_records: int = 0
    max_percent: float = 0.0
    #: ``under_threshold``, ``dry_run``, ``allowed`` (run parameter), ``awaiting_approval``, then ``approved``,
    #: ``rejected`` or ``timed_out``
    outcome: str = "under_threshold"
    #: who answered the approval request
    responded_by: str | None = None

    @property
    def tripped(self) -> bool:
        return any(s.tripped for s in self.sides.values())

    @property
    def proceed(self) -> bool:
        """Whether the loads may write."""
        return self.outcome in ("under_threshold", "dry_run", "allowed", "approved")


class Loaded(StageResult):
    #: ``dynamics`` or ``marketo``: the side written
    side: str
    #: staged per-field outcomes, per entity type (Dynamics) or ``all`` (Marketo)
    results: dict[str, str] = Field(default_factory=dict)
    #: links made by creates on this side (person_id, dynamics_type, dynamics_id, method)
    created_links: str | None = None
    #: the values a create wrote (person_id, field, value), which become the pair's first baseline
    created_values: str | None = None
    #: activity rows of the creates (and of refused creates), and sync errors they open
    activity: str | None = None
    errors: str | None = None
    written: int = 0
    rejected: int = 0
    created: int = 0
    create_errors: int = 0
    #: records deleted (or deactivated) on this side by the delete policy ``propagate``, and those refused
    deleted: int = 0
    delete_errors: int = 0
    #: persons merged in Marketo (losers merged away), those refused, and every merge's outcome (staged)
    merged: int = 0
    merge_errors: int = 0
    merge_results: str | None = None
    rejections_logged_in_marketo: int = 0
    #: how the writes went: ``sync`` (300-record calls), ``bulk_import`` (Marketo Bulk Lead Import)
    method: str = "sync"


class Committed(StageResult):
    dry_run: bool = False
    baselines: int = 0
    errors: int = 0
    activity: int = 0
    watermarks: int = 0
    links: int = 0


class RunManifest(BaseModel):
    """Every stage result of one run, in cycle order (what commit and report read)."""

    run_id: str
    schema_: SchemaResult | None = Field(default=None, alias="schema")
    marketo: MarketoExtracted | None = None
    dynamics: DynamicsExtracted | None = None
    identity: Identified | None = None
    plans: list[Planned] = Field(default_factory=list)
    dynamics_loaded: Loaded | None = None
    marketo_loaded: Loaded | None = None
    committed: Committed | None = None
    #: the mass-change guard's decision (and the approval's outcome)
    guard: GuardDecision | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def stage_results(self) -> list[tuple[str, StageResult]]:
        """``(task name, result)`` of every stage that ran, in cycle order."""
        out: list[tuple[str, StageResult]] = []
        for name, value in (("refresh_schema", self.schema_), ("extract_marketo", self.marketo),
                            ("extract_dynamics", self.dynamics), ("identify", self.identity)):
            if value is not None:
                out.append((name, value))
        out += [(f"plan_{p.entity}", p) for p in self.plans]
        if self.guard is not None:
            out.append(("check_mass_change", self.guard))
        for name, value in (("load_dynamics", self.dynamics_loaded), ("load_marketo", self.marketo_loaded),
                            ("commit", self.committed)):
            if value is not None:
                out.append((name, value))
        return out

    def calls(self) -> dict[str, int]:
        """API calls of the whole run, per service (the sum over its tasks)."""
        total: dict[str, int] = {"marketo": 0, "dynamics": 0}
        for _, result in self.stage_results():
            for service, n in result.calls.items():
                total[service] = total.get(service, 0) + n
        return total
