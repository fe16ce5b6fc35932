"""One sync cycle, stage by stage, as the DAG's tasks run it (DESIGN §4): a thin runner.

Each method is one task: it reads what earlier tasks staged (named by their typed results, see
:mod:`mdsync.results`), calls its stage module (``access``, ``extract``, ``identity``, ``plan``, ``load``,
``commit``), stages the frames it produced as parquet and returns one small typed result. Clients are built
by factories the DAG passes in (Airflow hooks), so this module never imports Airflow.

refresh_schema -> extract_marketo || extract_dynamics -> identify -> plan (per entity type)
-> load_dynamics -> load_marketo -> commit -> report
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from mdsync import access as access_stage
from mdsync import accounts as accounts_stage
from mdsync import identity as identity_stage
from mdsync import guard as guard_stage
from mdsync import undo as undo_stage
from mdsync.activity import (activity_frame, blocked_activity, collision_activity, consent_held_activity,
                             flag_failed_activity, held_activity, log_activity, problem_activity, write_activity)
from mdsync.canonical import canonical_frame
from mdsync.commit import commit_cycle, error_rows, resolved_keys, succeeded_baselines
from mdsync.config import Side, SyncConfig, load_config
from mdsync.extract import (account_columns, dynamics_columns, empty_merges, extract_accounts, extract_dynamics,
                            extract_marketo, final_winners, marketo_fields, query_any, query_chunked)
from mdsync.load import (DeleteOutcome, create_in_dynamics, create_in_marketo, delete_in_dynamics, delete_in_marketo,
                         load_dynamics, load_marketo, merge_in_marketo, record_rejections_in_marketo)
from mdsync.plan import REQUIRES_NOTHING, plan_entity, suppress_known_rejections
from mdsync.results import (AccountsExtracted, AccountsPlanned, Committed, DynamicsEntityExtracted, DynamicsExtracted,
                            GuardDecision, Identified, Loaded, MarketoExtracted, Planned, RunManifest, SchemaResult,
                            StageResult)
from mdsync.settings import Settings
from mdsync.staging import Staging
from mdsync.state import StateStore, open_store

log = logging.getLogger("mdsync.cycle")

FULL_RECONCILE = ("full", "all")
#: the tasks of a cycle, in order (``plan_<entity>`` for each configured entity type)
STAGES = ["refresh_schema", "extract_marketo", "extract_dynamics", "identify", "plan_lead", "plan_contact",
          "load_dynamics", "load_marketo", "commit"]
#: how many values go into one Dataverse ``column in (...)`` ``$filter`` (URLs stay under ~10 KB of the
#: service's 32 KB)
VALUES_PER_QUERY = 200


@dataclass
class RunInfo:
    """What the cycle needs to know about its Airflow run."""

    run_id: str
    #: "scheduled", "manual", "backfill", "asset_triggered"
    run_type: str = "manual"
    window_start: datetime | None = None
    window_end: datetime | None = None
    dry_run: bool = False
    full_resync: bool = False
    person_ids: list[int] = field(default_factory=list)
    sync_as: str | None = None
    retry_failed: bool = False
    #: an earlier run whose writes this run undoes (:mod:`mdsync.undo`)
    undo_run: str | None = None


class Cycle:
    """The stages of one run.

    :param marketo_client: factory of a :class:`~mdsync.marketo.MarketoClient` (the DAG passes the hook's).
    :param dynamics_client: factory of a :class:`~mdsync.dynamics.DynamicsClient`.
    :param staging_root: the staging root path object (``ObjectStoragePath`` in the DAG).
    """

    def __init__(self, run: RunInfo, *, marketo_client: Callable, dynamics_client: Callable, staging_root=None,
                 settings: Settings | None = None, config: SyncConfig | None = None, store: StateStore | None = None) -> None:
        self.run = run
        self.settings = settings or Settings.from_env()
        self.config = config or load_config(self.settings.config_path)
        self._store = store
        self._marketo_factory, self._dynamics_factory = marketo_client, dynamics_client
        self._marketo = self._dynamics = None
        root = staging_root if staging_root is not None else Path(self.settings.staging_url.removeprefix("file://"))
        self.staging = Staging(root, run.run_id)

    # -- shared ---------------------------------------------------------------------------------------

    @property
    def store(self) -> StateStore:
        if self._store is None:
            self._store = open_store(self.settings.state_url)
        return self._store

    @property
    def marketo(self):
        if self._marketo is None:
            self._marketo = self._marketo_factory()
        return self._marketo

    @property
    def dynamics(self):
        if self._dynamics is None:
            self._dynamics = self._dynamics_factory()
        return self._dynamics

    def _calls(self) -> dict[str, int]:
        return self._per_client("calls_made")

    def _per_client(self, counter: str) -> dict:
        """A counter of each client built so far (0 for a client not built)."""
        return {"marketo": getattr(self._marketo, counter, 0) or 0,
                "dynamics": getattr(self._dynamics, counter, 0) or 0}

    @contextmanager
    def _stage(self, name: str) -> Iterator[dict]:
        """Time a stage, count its calls, and name the stage (and run) on any failure."""
        before, waited, started = self._calls(), self._per_client("waited_s"), time.monotonic()
        box: dict = {}
        try:
            yield box
        except Exception as exc:
            exc.add_note(f"mdsync: stage {name!r} of run {self.run.run_id!r} failed; its staged inputs are kept "
                         f"in {self.staging.folder} for inspection and retries")
            raise
        result: StageResult = box["result"]
        after = self._calls()
        result.calls = {k: after[k] - before.get(k, 0) for k in after}
        # a service this task never called has no wait to report (no zero timers for it)
        result.waited_s = {k: round(v - waited.get(k, 0.0), 3) for k, v in self._per_client("waited_s").items()
                           if result.calls.get(k)}
        result.elapsed_s = round(time.monotonic() - started, 3)
        log.info("%s done in %.1f s (API calls: Marketo %d, Dataverse %d)", name, result.elapsed_s,
                 result.calls["marketo"], result.calls["dynamics"])

    def _timed(self, name: str, stage: Callable, *args) -> StageResult:
        """Run one stage's logic inside :meth:`_stage` (timing, call counts, the stage named on failure)."""
        with self._stage(name) as box:
            box["result"] = stage(*args)
        return box["result"]

    def _access(self, path: str) -> access_stage.FieldAccess:
        return access_stage.FieldAccess.from_json(self.staging.read_json(path))

    def _use_metadata(self, acc: access_stage.FieldAccess, marketo: bool = False) -> None:
        """Hand the refreshed metadata to the clients, so reads need no describe/metadata calls."""
        for entity_set, meta in acc.dynamics_metadata.items():
            self.dynamics.preload_metadata(entity_set, meta["logical_name"], pd.DataFrame(meta["attributes"]))
        if marketo:
            self.marketo.use_describe(pd.DataFrame(acc.marketo_describe))

    def full_reconcile_due(self) -> bool:
        if self.run.full_resync:
            return True
        wm = self.store.watermark(*FULL_RECONCILE)
        if wm is None or wm.high_water is None:
            return True
        period = timedelta(hours=self.config.schedule.full_reconcile_every_hours)
        return datetime.now(timezone.utc) - wm.high_water >= period

    def _after_full_reconcile(self) -> bool:
        """Whether the last committed cycle was a full reconcile (its writes come back in this window)."""
        full, marketo = self.store.watermark(*FULL_RECONCILE), self.store.watermark("marketo", "persons")
        return bool(full and marketo and full.high_water and full.high_water == marketo.high_water)

    def _log_activity(self, activity: pd.DataFrame) -> None:
        log_activity(activity, log, limit=self.settings.log_limit)

    def _undone(self) -> pd.DataFrame:
        """An undo run's undone run: its activity rows, after :func:`mdsync.undo.check_request`."""
        activity = self.store.activity(run_id=self.run.undo_run)
        undo_stage.check_request(self.run.undo_run, activity, this_run=self.run.run_id, person_ids=self.run.person_ids,
                                 full_resync=self.run.full_resync,
                                 recent=self.store.recent_runs() if activity.empty else None)
        return activity

    # -- 1. refresh schema ----------------------------------------------------------------------------

    def refresh_schema(self) -> SchemaResult:
        """Describe both sides (or reuse a recent refresh) and decide field access for this run."""
        return self._timed("refresh_schema", self._refresh_schema)

    def _refresh_schema(self) -> SchemaResult:
        if self.run.undo_run:  # an undo that cannot be done fails here, before any API call
            self._undone()
        # one cache per pair of instances and config, so pointing the sync elsewhere never reuses it
        key = hashlib.sha1(repr((getattr(self.marketo, "base_url", ""), getattr(self.dynamics, "org_url", ""),
                                 self.config.model_dump_json())).encode()).hexdigest()[:12]
        cache = f"field-access-{key}"
        max_age = timedelta(minutes=self.settings.schema_cache_minutes)
        if not self.run.full_resync:
            try:
                data = self.staging.read_json(self.staging.shared_path(cache))
                refreshed = datetime.fromisoformat(data["refreshed_at"])
                if datetime.now(timezone.utc) - refreshed < max_age:
                    path = self.staging.write_json("field-access", data)
                    log.info("field access: reusing the refresh of %s (younger than %s)", data["refreshed_at"], max_age)
                    return SchemaResult(access=path, refreshed=False)
            except (FileNotFoundError, KeyError, ValueError):
                pass
        describe = self.marketo.describe_leads(refresh=True)
        dyn = {}
        for name, entity in self.config.entities.items():
            logical = self.dynamics.logical_name(entity.entity_set)
            dyn[name] = {"entity_set": entity.entity_set, "logical_name": logical,
                         "attributes": self.dynamics.attributes(logical, refresh=True),
                         "permissions": self.dynamics.field_permissions(logical),
                         "keys": self.dynamics.alternate_keys(logical)}
        if self.config.accounts is not None:
            dyn[access_stage.ACCOUNT_META] = self._account_metadata()
        acc = access_stage.refresh_access(self.config, describe, dyn)
        acc.refreshed_at = datetime.now(timezone.utc).isoformat()
        data = acc.to_json()
        path = self.staging.write_json("field-access", data)
        self.staging.write_json(cache, data, shared=True)
        dropped = sum(len(e.dropped) for e in acc.entities.values())
        return SchemaResult(access=path, refreshed=True, dropped_fields=dropped)

    # -- 2. extract -----------------------------------------------------------------------------------

    def window_since(self) -> datetime:
        """Where Marketo extraction starts: the window start, extended back to the watermark when an earlier
        window was missed, minus the overlap; a manual run starts at the watermark."""
        overlap = timedelta(seconds=self.settings.overlap_seconds)
        wm = self.store.watermark("marketo", "persons")
        now = datetime.now(timezone.utc)
        start = self.run.window_start
        if wm is not None and wm.high_water is not None:
            start = wm.high_water if start is None else min(start, wm.high_water)
        if start is None:  # first cycle ever: the full reconcile covers existing records
            start = now - timedelta(days=1)
        return start - overlap

    def extract_marketo(self, schema: SchemaResult) -> MarketoExtracted:
        with self._stage("extract_marketo") as box:
            self.marketo.use_describe(pd.DataFrame(self._access(schema.access).marketo_describe))
            if self.run.undo_run:
                box["result"] = self._extract_marketo_undo()
                return box["result"]
            full = self.full_reconcile_due()
            since = self.window_since()
            pages = self.settings.max_change_pages
            if not full and self._after_full_reconcile():
                pages = 1  # the echo of a full reconcile's writes is a large window: go to bulk at once
            result = extract_marketo(self.marketo, self.config, since=since, extra_ids=self.run.person_ids, full=full,
                                     lookback_days=self.settings.full_lookback_days if full else 0,
                                     bulk_poll_seconds=self.settings.bulk_poll_seconds,
                                     bootstrap_since=self.settings.bootstrap_since,
                                     max_change_pages=pages)
            box["result"] = MarketoExtracted(
                persons=self.staging.write_frame("marketo-persons", result.persons),
                deleted=self.staging.write_frame("marketo-deleted", pd.DataFrame({"id": result.deleted}, dtype="int64")),
                high_water=result.high_water, since=since, extracted=len(result.persons), full=full,
                mode=result.mode, complete=result.complete, missing_person_ids=result.missing_ids,
                merges=self.staging.write_frame("marketo-merges", result.merges))
        return box["result"]

    def extract_dynamics(self, schema: SchemaResult) -> DynamicsExtracted:
        with self._stage("extract_dynamics") as box:
            acc = self._access(schema.access)
            self._use_metadata(acc)
            if self.run.undo_run:
                box["result"] = self._extract_dynamics_undo(acc)
                return box["result"]
            full = self.full_reconcile_due()
            out = DynamicsExtracted(full=full)
            for name, entity in self.config.entities.items():
                wm = self.store.watermark("dynamics", name)
                result = extract_dynamics(self.dynamics, self.config, entity, acc,
                                          delta_link=wm.token if wm else None, full=full)
                out.entities[name] = DynamicsEntityExtracted(
                    rows=self.staging.write_frame(f"dynamics-{name}", result.rows),
                    deleted=self.staging.write_frame(f"dynamics-{name}-deleted",
                                                     pd.DataFrame({"id": result.deleted}, dtype="str")),
                    delta_link=result.delta_link, high_water=result.high_water, extracted=len(result.rows),
                    full_read=result.full_read)
            if self.config.accounts is not None:
                out.accounts = self._extract_accounts(acc, full, out)
            box["result"] = out
        return box["result"]

    def _extract_marketo_undo(self) -> MarketoExtracted:
        """An undo reads, by id, the persons the undone run wrote; the watermark stays (the window is not read)."""
        persons_ids, _ = undo_stage.records_to_read(self._undone())
        persons = self.marketo.get_leads("id", persons_ids, marketo_fields(self.config)) if persons_ids else \
            pd.DataFrame(columns=["id", *marketo_fields(self.config)])
        wm = self.store.watermark("marketo", "persons")
        log.info("undo of run %s: read %d of the %d persons it wrote", self.run.undo_run, len(persons), len(persons_ids))
        return MarketoExtracted(
            persons=self.staging.write_frame("marketo-persons", persons),
            deleted=self.staging.write_frame("marketo-deleted", pd.DataFrame({"id": []}, dtype="int64")),
            high_water=wm.high_water if wm else None, since=wm.high_water if wm else None, extracted=len(persons),
            mode="undo")

    def _extract_dynamics_undo(self, acc) -> DynamicsExtracted:
        """An undo reads, by id, the Dynamics records the undone run wrote; delta links stay as they are."""
        _, wanted = undo_stage.records_to_read(self._undone())
        out = DynamicsExtracted()
        for name, entity in self.config.entities.items():
            ids = wanted.get(name, [])
            columns = dynamics_columns(self.config, entity, acc.entities[name])
            rows = self._query_in(name, columns, entity.id_column, ids) if ids else pd.DataFrame(columns=columns)
            wm = self.store.watermark("dynamics", name)
            out.entities[name] = DynamicsEntityExtracted(
                rows=self.staging.write_frame(f"dynamics-{name}", rows),
                deleted=self.staging.write_frame(f"dynamics-{name}-deleted", pd.DataFrame({"id": []}, dtype="str")),
                delta_link=wm.token if wm else None, high_water=wm.high_water if wm else None, extracted=len(rows))
            log.info("undo of run %s: read %d of the %d %ss it wrote", self.run.undo_run, len(rows), len(ids), name)
        return out

    # -- 3. identity ----------------------------------------------------------------------------------

    def identify(self, schema: SchemaResult, marketo: MarketoExtracted, dynamics: DynamicsExtracted) -> Identified:
        identified = self._timed("identify", self._identify, schema, marketo, dynamics)
        identified.accounts = dynamics.accounts  # for the contact plan (the plan tasks get identity's result)
        return identified

    def _identify(self, schema: SchemaResult, marketo: MarketoExtracted, dynamics: DynamicsExtracted) -> Identified:
        s = self.staging
        acc = self._access(schema.access)
        persons = s.read_frame(marketo.persons)
        records = {e: s.read_frame(d.rows) for e, d in dynamics.entities.items()}
        links = self.store.load_links()
        # deletions recorded for what was read (and what its link fields name): no lookup of a deleted id
        pids, dids = identity_stage.deletion_keys(self.config, persons, records, self.run.person_ids)
        deletions = self.store.load_deletions(person_ids=pids, dynamics_ids=dids)
        window = s.read_frame(marketo.merges) if marketo.merges else empty_merges()
        merges = self._known_merges(window, pids)
        lookups = identity_stage.plan_lookups(
            self.config, links, persons, records, marketo_complete=marketo.complete,
            dynamics_complete=all(d.full_read for d in dynamics.entities.values()), push_ids=self.run.person_ids,
            deletions=deletions, merges=merges)
        refused = activity_frame([])
        if not lookups.empty:
            log.info("identity: looking up %s", lookups.counts())
            self._use_metadata(acc, marketo=True)
            persons, records, refused = self._look_up(lookups, acc, persons, records)
            more_p, more_d = identity_stage.deletion_keys(self.config, persons, records, self.run.person_ids)
            more_p, more_d = more_p.difference(pids), more_d.difference(dids)
            if len(more_p) or len(more_d):  # and for what the lookups found
                found = self.store.load_deletions(person_ids=more_p, dynamics_ids=more_d)
                deletions = pd.concat([deletions, found], ignore_index=True).drop_duplicates(
                    ["deleted_in", "person_id", "dynamics_type", "dynamics_id"]) if not found.empty else deletions
                merges = self._known_merges(merges, more_p)
        m_deleted = s.read_frame(marketo.deleted)["id"].tolist()
        d_deleted = {e: s.read_frame(d.deleted)["id"].tolist() for e, d in dynamics.entities.items()}
        guarded = identity_stage.guard_ids(self.config, links, m_deleted, d_deleted)
        changed = None
        if len(guarded):  # propagate: whether each survivor changed on its own side since the last sync
            fields = list(dict.fromkeys(n for e in self.config.entities.values() for n in e.field_names))
            baseline = self.store.load_baselines(person_ids=guarded.tolist(), fields=fields)
            changed = identity_stage.changed_since(self.config, acc, links, persons, records, baseline, guarded)
        decisions = identity_stage.decide(
            self.config, links, persons, records, m_deleted, d_deleted, push_ids=self.run.person_ids,
            push_as=self.run.sync_as, deletions=deletions, changed=changed,
            note_held=not (marketo.full or dynamics.full), merges=merges)
        activity = pd.concat([decisions.activity, refused], ignore_index=True)
        emails = _emails(persons)
        activity["email"] = activity["email"].where(activity["email"].notna(), activity["person_id"].map(emails))
        if self.run.dry_run:
            activity["detail"] = activity["detail"].where(activity["action"] != "link",
                                                          activity["detail"] + " [dry run: not saved]")
            activity["detail"] = activity["detail"].where(~activity["action"].isin(["flag", "delete", "merge"]),
                                                          activity["detail"] + " [dry run: not done]")
        self._log_activity(activity)
        active = decisions.links[~decisions.links["paused"].astype(bool)]  # pairs outside the filter are not synced
        m_links, d_links = identity_stage.link_field_writes(self.config, active, persons, records)
        new = decisions.new_links
        lifecycle = {**decisions.deletes["action"].value_counts().to_dict(),
                     "left_filter": int(decisions.paused["paused"].astype(bool).sum()),
                     "entered_filter": int((~decisions.paused["paused"].astype(bool)).sum()),
                     "merged_in_marketo": len(window), "links_moved": len(decisions.moved),
                     "persons_to_merge": len(decisions.marketo_merges)}
        log.info("identity: %d links (%d new, %d outside the sync filter), %d dropped; creates wanted: %d in Marketo, "
                 "%d in Dynamics; lifecycle: %s", len(decisions.links), len(new), len(decisions.links) - len(active),
                 len(decisions.unlinked), len(decisions.marketo_creates), len(decisions.dynamics_creates), lifecycle)
        return Identified(
            deletes=s.write_frame("lifecycle-deletes", decisions.deletes),
            deletions=s.write_frame("lifecycle-deletions", decisions.deletions),
            paused=s.write_frame("lifecycle-paused", decisions.paused), lifecycle=lifecycle,
            marketo_merges=s.write_frame("lifecycle-marketo-merges", decisions.marketo_merges),
            moved=s.write_frame("lifecycle-moved", decisions.moved), merges=s.write_frame("lifecycle-merges", window),
            link_clears=s.write_frame("lifecycle-link-clears", decisions.link_clears),
            links=s.write_frame("links", decisions.links),
            persons=s.write_frame("persons", persons),
            records={e: s.write_frame(f"records-{e}", r) for e, r in records.items()},
            unlinked=s.write_frame("unlinked", pd.DataFrame({"person_id": decisions.unlinked}, dtype="int64")),
            activity=s.write_frame("identity-activity", activity),
            marketo_creates=s.write_frame("marketo-creates", decisions.marketo_creates),
            dynamics_creates=s.write_frame("dynamics-creates", decisions.dynamics_creates),
            marketo_link_writes=s.write_frame("marketo-link-writes", m_links),
            dynamics_link_writes={e: s.write_frame(f"dynamics-link-writes-{e}", w) for e, w in d_links.items()},
            new_links=len(new), refused=len(refused),
            creates_wanted={"marketo": len(decisions.marketo_creates), "dynamics": len(decisions.dynamics_creates)})

    def _known_merges(self, merges: pd.DataFrame, person_ids) -> pd.DataFrame:
        """``merges`` with the merges the state store remembers of ``person_ids`` (chains followed to the winner)."""
        known = self.store.load_merges(loser_ids=person_ids) if len(person_ids) else empty_merges()
        if known.empty:
            return merges
        return final_winners(pd.concat([known, merges], ignore_index=True))

    def _look_up(self, lookups: identity_stage.Lookups, acc, persons: pd.DataFrame, records: dict[str, pd.DataFrame]):
        """Read what identity needs besides the extracts; values a service refuses are set aside, logged."""
        fields = marketo_fields(self.config)
        found, refused = [], []
        if lookups.marketo_ids:
            found.append(self.marketo.get_leads("id", lookups.marketo_ids, fields))
        if lookups.marketo_emails:
            frame, bad = self.marketo.lookup_leads("email", lookups.marketo_emails, fields)
            found.append(frame)
            if not bad.empty:
                refused.append(activity_frame(pd.DataFrame({
                    "action": "error", "email": bad["value"].to_numpy(),
                    "detail": ("Marketo refused this email in a lookup: " + bad["code"].fillna("").astype(str) + " "
                               + bad["message"].fillna("").astype(str)
                               + "; the Dynamics record with it is not matched this cycle").to_numpy()})))
        if found:
            persons = pd.concat([persons, *found], ignore_index=True)
            persons = persons[persons["id"].notna()].drop_duplicates("id", keep="first").reset_index(drop=True)
        for entity in self.config.entities:
            ent = self.config.entity(entity)
            columns = dynamics_columns(self.config, ent, acc.entities[entity])
            parts = []
            if lookups.dynamics_emails:
                parts.append(self._query_in(entity, columns, ent.email_field.dynamics, lookups.dynamics_emails))
            if lookups.dynamics_ids.get(entity):
                parts.append(self._query_in(entity, columns, ent.id_column, lookups.dynamics_ids[entity]))
            if parts:
                rows = records.get(entity, pd.DataFrame())
                merged = pd.concat([rows, *parts], ignore_index=True) if not rows.empty else pd.concat(parts, ignore_index=True)
                records[entity] = merged.drop_duplicates(ent.id_column, keep="first").reset_index(drop=True)
        return persons, records, pd.concat(refused, ignore_index=True) if refused else activity_frame([])

    def _query_in(self, entity: str, columns: list[str], column: str, values: list[str]) -> pd.DataFrame:
        """Dataverse rows of ``entity`` whose ``column`` is one of ``values`` (escaped, in URL-sized chunks)."""
        from mdsync.dynamics import isin

        return query_chunked(self.dynamics, self.config.entity(entity).entity_set, columns, list(values),
                             VALUES_PER_QUERY, lambda chunk: isin(column, chunk))

    # -- 4. diff, resolve, plan -----------------------------------------------------------------------

    def plan(self, entity_name: str, schema: SchemaResult, identity: Identified) -> Planned:
        return self._timed(f"plan_{entity_name}", self._plan_with_accounts, entity_name, schema, identity)

    def _plan(self, entity_name: str, schema: SchemaResult, identity: Identified) -> Planned:
        entity = self.config.entity(entity_name)
        acc = self._access(schema.access).entities[entity_name]
        links = self.staging.read_frame(identity.links)
        # pairs whose record is outside the sync filter are not synced (link kept)
        paused = links["paused"].astype(bool) if "paused" in links else False
        links = links[(links["dynamics_type"] == entity_name) & ~paused]
        persons = self.staging.read_frame(identity.persons)
        records = self.staging.read_frame(identity.records[entity_name])

        m_fields = [f for f in entity.fields if f.name in acc.marketo_read]
        d_fields = [f for f in entity.fields if f.name in acc.dynamics_read]
        mine = persons[persons["id"].isin(links.index)] if not persons.empty else persons
        m_raw = mine.set_index(mine["id"].astype("int64").rename("person_id")) if not mine.empty else \
            pd.DataFrame(index=pd.Index([], dtype="int64", name="person_id"))
        marketo, m_problems = canonical_frame(m_raw, m_fields, Side.MARKETO)
        d_raw = identity_stage.records_by_person(records, links, entity.id_column)
        dynamics, d_problems = canonical_frame(d_raw, d_fields, Side.DYNAMICS)
        keys = marketo.index.union(dynamics.index)
        baseline = self.store.load_baselines(person_ids=keys.tolist(), fields=entity.field_names)
        if identity.moved:  # a pair a Marketo merge moved to its winner compares against the loser's baselines
            baseline = identity_stage.carry_baselines(
                baseline, self.staging.read_frame(identity.moved),
                lambda ids: self.store.load_baselines(person_ids=ids, fields=entity.field_names))
        skipped, undo = [problem_activity(entity_name, m_problems + d_problems, links)], None
        if self.run.undo_run:  # restores of what the undone run wrote, instead of the three-way diff
            undone = undo_stage.plan_undo(entity, self._undone(), marketo, dynamics, links, baseline,
                                          undone_run=self.run.undo_run)
            plan, undo = undone.plan, undone.summary
            skipped.append(undone.notes)
        else:
            plan = plan_entity(entity, baseline, marketo, dynamics, links, keys=keys,
                               marketo_invalid=_invalid(m_problems), dynamics_invalid=_invalid(d_problems))
        # Fields the sync user cannot write this run are not sent (field access, DESIGN §4.1).
        d_writes, d_blocked = _split(plan.dynamics_writes, acc.dynamics_write)
        m_writes, m_blocked = _split(plan.marketo_writes, acc.marketo_write)
        skipped += [blocked_activity(entity_name, d_blocked, "dynamics"), blocked_activity(entity_name, m_blocked, "marketo")]
        held = []
        errors = self._rejections_to_hold(keys.tolist())
        if errors is not None:
            d_writes, d_held = suppress_known_rejections(d_writes, errors, Side.DYNAMICS)
            m_writes, m_held = suppress_known_rejections(m_writes, errors, Side.MARKETO)
            held = [held_activity(entity_name, d_held, "dynamics"), held_activity(entity_name, m_held, "marketo")]
        collisions = collision_activity(entity_name, plan.collisions)
        consent_held = consent_held_activity(entity_name, plan.consent_held)  # re-opt-ins not propagated
        notes = pd.concat([*skipped, *held, collisions, consent_held], ignore_index=True)
        notes["email"] = notes["person_id"].map(_emails(persons))
        self._log_activity(notes)
        summary = plan.summary()
        log.info("plan %s: compared %d linked pairs: %d fields to Dynamics, %d fields to Marketo, %d collisions, "
                 "%d consent changes, %d re-opt-ins held", entity_name, summary["compared"], len(d_writes),
                 len(m_writes), summary["collisions"], summary["consent_changes"], summary["consent_held"])
        s = self.staging
        return Planned(
            entity=entity_name,
            dynamics_writes=s.write_frame(f"plan-{entity_name}-dynamics", d_writes),
            marketo_writes=s.write_frame(f"plan-{entity_name}-marketo", m_writes.assign(entity_type=entity_name)),
            baseline_updates=s.write_frame(f"plan-{entity_name}-baselines", plan.baseline_updates),
            activity=s.write_frame(f"plan-{entity_name}-activity", notes),
            compared=summary["compared"], to_dynamics=len(d_writes), to_marketo=len(m_writes),
            collisions=summary["collisions"], held=int(sum(len(h) for h in held)), undo=undo)

    # -- 4a. account fields on persons (mdsync.accounts) -----------------------------------------------

    def _account_metadata(self) -> dict:
        """The account table's metadata for the schema refresh (columns, types, the sync user's permissions)."""
        from mdsync.errors import ConfigError, ServiceError

        entity_set = self.config.accounts.entity_set
        try:
            logical = self.dynamics.logical_name(entity_set)
        except ServiceError as exc:
            raise ConfigError(f"sync config: accounts.entity_set {entity_set!r}: {exc.service_message}; name the "
                              "account table's entity set (accounts)") from None
        return {"entity_set": entity_set, "logical_name": logical,
                "attributes": self.dynamics.attributes(logical, refresh=True),
                "permissions": self.dynamics.field_permissions(logical)}

    def _extract_accounts(self, acc: access_stage.FieldAccess, full: bool, out: DynamicsExtracted) -> AccountsExtracted:
        """Accounts changed since their delta link and the parent lookup of their contacts (staged)."""
        wm = self.store.watermark("dynamics", accounts_stage.ACCOUNT)
        contacts = out.entities.get(accounts_stage.CONTACT)
        result = extract_accounts(self.dynamics, self.config, acc, delta_link=wm.token if wm else None, full=full,
                                  contacts_complete=bool(contacts and contacts.full_read))
        return AccountsExtracted(
            accounts=self.staging.write_frame("dynamics-accounts", result.accounts),
            contacts=self.staging.write_frame("dynamics-account-contacts", result.contacts),
            delta_link=result.delta_link, high_water=result.high_water, extracted=len(result.accounts),
            deleted=len(result.deleted), contacts_read=len(result.contacts), full_read=result.full_read)

    def _plan_with_accounts(self, entity_name: str, schema: SchemaResult, identity: Identified) -> Planned:
        """The entity type's plan; the contact plan also takes its persons' company fields from their accounts."""
        planned = self._plan(entity_name, schema, identity)
        if entity_name == accounts_stage.CONTACT and identity.accounts is not None and not self.run.undo_run:
            planned.accounts = self._plan_accounts(planned, schema, identity)
        return planned

    def _plan_accounts(self, planned: Planned, schema: SchemaResult, identity: Identified) -> AccountsPlanned:
        """Account values for the persons of contacts whose account changed, that moved, or that were newly linked
        (:func:`mdsync.accounts.plan_accounts`); the writes, baselines and notes join the contact plan's own, so
        they are guarded, loaded (one Marketo record per person) and committed with them."""
        s, settings = self.staging, self.config.accounts
        acc = self._access(schema.access)
        fields = [f for f in settings.fields if acc.accounts is not None and f.name in acc.accounts.fields]
        if not fields:
            return AccountsPlanned()
        contact = self.config.entity(accounts_stage.CONTACT)
        links = s.read_frame(identity.links)
        accounts = s.read_frame(identity.accounts.accounts)
        frames = [s.read_frame(identity.records[contact.name]), s.read_frame(identity.accounts.contacts)]
        forced = self._account_retries(links) if self.run.retry_failed else []
        if forced:  # a retry of rejected account values: their contacts' parents, whatever changed
            self._use_metadata(acc)
            ids = links.loc[forced, "dynamics_id"].astype(str).tolist()
            frames.append(query_any(self.dynamics, contact.entity_set, [contact.id_column, settings.contact_lookup],
                                    contact.id_column, ids))
        pairs = accounts_stage.linked_pairs(
            accounts_stage.contact_parents(frames, contact.id_column, settings.contact_lookup), links)
        baseline = self.store.load_baselines(person_ids=pairs["person_id"].tolist(),
                                             fields=accounts_stage.baseline_fields(fields))
        have = accounts[settings.id_column].astype(str).tolist() if not accounts.empty else []
        wanted = accounts_stage.accounts_to_read(pairs, baseline, have, force=forced)
        if wanted:  # parents of moved and newly linked contacts
            self._use_metadata(acc)
            read = query_any(self.dynamics, settings.entity_set, account_columns(self.config, acc), settings.id_column,
                             wanted)
            accounts = pd.concat([accounts, read], ignore_index=True) if not accounts.empty else read
        persons = s.read_frame(identity.persons)
        plan = accounts_stage.plan_accounts(settings, fields, accounts, pairs, baseline, persons)
        writes, held = plan.writes, plan.writes.iloc[0:0]
        errors = self._rejections_to_hold(pairs["person_id"].tolist(), target="marketo")
        if errors is not None:
            writes, held = suppress_known_rejections(writes, errors, Side.MARKETO)
        notes = pd.concat([plan.activity, held_activity(contact.name, held, "marketo")], ignore_index=True)
        notes["email"] = notes["person_id"].map(_emails(persons))
        self._log_activity(notes)
        for attr, part in (("marketo_writes", writes), ("baseline_updates", plan.baseline_updates), ("activity", notes)):
            if not part.empty:  # into the contact plan's staged frames (a retried task plans both anew)
                path = getattr(planned, attr)
                setattr(planned, attr, s.write_frame(Path(path).stem, pd.concat([s.read_frame(path), part],
                                                                                ignore_index=True)))
        planned.to_marketo += len(writes)
        planned.held += len(held)
        log.info("plan accounts: %d accounts read (%d changed), %d persons compared: %d account fields to Marketo, "
                 "%d held back", plan.accounts, identity.accounts.extracted, plan.persons, len(writes), len(held))
        return AccountsPlanned(accounts=plan.accounts, persons=plan.persons, to_marketo=len(writes), held=len(held))

    def _rejections_to_hold(self, person_ids: list[int], target: str | None = None) -> pd.DataFrame | None:
        """Open rejections whose values this run does not send again: all of them; with ``retry_failed`` none, or,
        when the run also names ``person_ids`` (the console's *retry selected*), those of the other persons."""
        if self.run.retry_failed and not self.run.person_ids:
            return None
        errors = self.store.open_errors(target=target, person_ids=person_ids)
        if self.run.retry_failed:
            errors = errors[~errors["person_id"].isin(self.run.person_ids)].reset_index(drop=True)
        return errors

    def _account_retries(self, links: pd.DataFrame) -> list[int]:
        """Persons linked to contacts with rejected account values still open (a run that retries failed records;
        only the run's ``person_ids`` when it names some)."""
        errors = self.store.open_errors(target="marketo", person_ids=self.run.person_ids or None)
        mine = errors["field"].astype(str).str.startswith(accounts_stage.PREFIX).to_numpy() if not errors.empty else []
        pids = pd.Index(errors.loc[mine, "person_id"].astype("int64").unique()) if len(mine) else pd.Index([])
        contacts = links.index[links["dynamics_type"].eq(accounts_stage.CONTACT).to_numpy()]
        return sorted(pids.intersection(contacts).tolist())

    def _marketo_entities(self, acc: access_stage.FieldAccess) -> dict:
        """The entity configs the Marketo load converts writes with: the contact's includes the account fields."""
        if self.config.accounts is None or acc.accounts is None:
            return self.config.entities
        fields = [f for f in self.config.accounts.fields if f.name in acc.accounts.fields]
        return accounts_stage.with_account_fields(self.config.entities, fields)

    # -- 4b. mass-change guard -----------------------------------------------------------------------

    def check_guard(self, manifest: RunManifest, allow_mass_change: bool = False) -> GuardDecision:
        """Whether the plans are a mass change that waits for approval before the loads (:mod:`mdsync.guard`)."""
        return self._timed("check_mass_change", lambda: guard_stage.check_run(
            manifest, self.staging, guard_stage.Limits.from_settings(self.settings), dry_run=self.run.dry_run,
            allowed=allow_mass_change))

    # -- 5. load --------------------------------------------------------------------------------------

    def load_dynamics(self, manifest: RunManifest) -> Loaded:
        return self._timed("load_dynamics", self._load_dynamics, manifest)

    def _load_dynamics(self, manifest: RunManifest) -> Loaded:
        s, identity = self.staging, manifest.identity
        acc = self._access(manifest.schema_.access)
        self._use_metadata(acc)
        out = Loaded(side="dynamics")
        created = create_in_dynamics(self.config, acc, s.read_frame(identity.dynamics_creates),
                                     s.read_frame(identity.persons), self.dynamics, dry_run=self.run.dry_run)
        self._log_activity(created.activity)
        deletes = self._deletes(identity, "dynamics")
        for p in manifest.plans:
            name = p.entity
            writes = s.read_frame(p.dynamics_writes)
            link_writes = s.read_frame(identity.dynamics_link_writes[name])
            flags = deletes[deletes["action"].eq("flag").to_numpy() & deletes["entity_type"].eq(name).to_numpy()]
            clears = s.read_frame(identity.link_clears) if identity.link_clears else None
            results = load_dynamics(self.config, self.config.entity(name), writes, link_writes,
                                    acc.entities[name].dynamics_max_length, self.dynamics, dry_run=self.run.dry_run,
                                    flag_writes=flags,
                                    link_clears=clears[clears["entity_type"].eq(name)] if clears is not None else None)
            out.results[name] = s.write_frame(f"results-{name}-dynamics", results)
            out.written += int(results["ok"].sum())
            out.rejected += _rejected(results)
        removed = delete_in_dynamics(self.config, deletes, self.dynamics, dry_run=self.run.dry_run)
        self._log_activity(removed.activity)
        return self._with_creates(out, created, "dynamics", removed)

    def _deletes(self, identity: Identified, target: str) -> pd.DataFrame:
        """Identity's flags and deletes of the surviving side ``target`` of deleted pairs."""
        if not identity.deletes:
            return pd.DataFrame(columns=identity_stage.DELETE_COLUMNS)
        deletes = self.staging.read_frame(identity.deletes)
        return deletes[deletes["target"].eq(target).to_numpy()]

    def _with_creates(self, out: Loaded, created, side: str, removed: DeleteOutcome | None = None) -> Loaded:
        s = self.staging
        activity, errors = created.activity, created.errors
        if removed is not None:  # a refused delete is an error line and an open sync error, as a refused create
            activity = pd.concat([activity, removed.activity], ignore_index=True)
            errors = pd.concat([e for e in (errors, removed.errors) if not e.empty], ignore_index=True) \
                if not (errors.empty and removed.errors.empty) else errors
            out.deleted, out.delete_errors = removed.done, len(removed.errors)
        out.created_links = s.write_frame(f"created-links-{side}", created.links)
        out.created_values = s.write_frame(f"created-values-{side}", created.values)
        out.activity = s.write_frame(f"create-activity-{side}", activity)
        out.errors = s.write_frame(f"create-errors-{side}", errors)
        out.created = len(created.links)
        out.create_errors = int(created.activity["action"].eq("error").sum()) if not created.activity.empty else 0
        return out

    def load_marketo(self, manifest: RunManifest) -> Loaded:
        return self._timed("load_marketo", self._load_marketo, manifest)

    def _load_marketo(self, manifest: RunManifest) -> Loaded:
        s, identity, dyn_loaded = self.staging, manifest.identity, manifest.dynamics_loaded
        acc = self._access(manifest.schema_.access)
        self._use_metadata(acc, marketo=True)
        writes = pd.concat([s.read_frame(p.marketo_writes) for p in manifest.plans], ignore_index=True) \
            if manifest.plans else pd.DataFrame(columns=["person_id", "dynamics_id", "field", "value", "entity_type"])
        link_writes = s.read_frame(identity.marketo_link_writes)
        if dyn_loaded.created_links:  # persons whose Dynamics record was just created get their link fields
            new = s.read_frame(dyn_loaded.created_links)
            link_writes = pd.concat([link_writes, new[["person_id", "dynamics_id", "dynamics_type"]]], ignore_index=True)
        max_length = {}
        for e in acc.entities.values():
            max_length.update(e.marketo_max_length)
        max_length.update(acc.accounts.marketo_max_length if acc.accounts else {})
        deletes = self._deletes(identity, "marketo")
        results, method = load_marketo(self.config, self._marketo_entities(acc), writes, link_writes, max_length, self.marketo,
                                       dry_run=self.run.dry_run, bulk_threshold=self.settings.marketo_bulk_threshold,
                                       flag_writes=deletes[deletes["action"].eq("flag").to_numpy()])
        records = {e: s.read_frame(p) for e, p in identity.records.items()}
        created = create_in_marketo(self.config, acc, s.read_frame(identity.marketo_creates), records, self.marketo,
                                    self.dynamics, dry_run=self.run.dry_run,
                                    bulk_threshold=self.settings.marketo_bulk_threshold,
                                    poll_seconds=self.settings.bulk_poll_seconds)
        self._log_activity(created.activity)
        rejected = [r[~r["ok"].astype(bool) & r["error_code"].ne("dry_run")]
                    for r in (s.read_frame(p) for p in dyn_loaded.results.values())]
        rejected = pd.concat(rejected, ignore_index=True) if rejected else pd.DataFrame()
        logged = 0 if self.run.dry_run else record_rejections_in_marketo(self.config, rejected, self.marketo)
        removed = delete_in_marketo(deletes, self.marketo, dry_run=self.run.dry_run)
        self._log_activity(removed.activity)
        out = Loaded(side="marketo", results={"all": s.write_frame("results-marketo", results)},
                     written=int(results["ok"].sum()), rejected=_rejected(results),
                     rejections_logged_in_marketo=logged, method=method)
        out = self._with_creates(out, created, "marketo", removed)
        return self._with_merges(out, identity)

    def _with_merges(self, out: Loaded, identity: Identified) -> Loaded:
        """The persons identity decided to merge in Marketo (Merge Leads); refusals are error lines and sync errors."""
        s = self.staging
        merges = s.read_frame(identity.marketo_merges) if identity.marketo_merges else pd.DataFrame()
        if merges.empty:
            return out
        merged = merge_in_marketo(merges, self.marketo, dry_run=self.run.dry_run)
        self._log_activity(merged.activity)
        out.merged, out.merge_errors = merged.done, len(merged.errors)
        out.merge_results = s.write_frame("merge-results-marketo", merged.results)
        if not merged.activity.empty:  # with the creates' and deletes' lines and errors, recorded at commit
            out.activity = s.write_frame("create-activity-marketo", pd.concat(
                [s.read_frame(out.activity), merged.activity], ignore_index=True))
            errors = s.read_frame(out.errors)
            out.errors = s.write_frame("create-errors-marketo", pd.concat(
                [e for e in (errors, merged.errors) if not e.empty], ignore_index=True))
        return out

    # -- 6. commit ------------------------------------------------------------------------------------

    def commit(self, manifest: RunManifest) -> Committed:
        return self._timed("commit", self._commit, manifest)

    def _commit(self, manifest: RunManifest) -> Committed:
        s, identity = self.staging, manifest.identity
        emails = _emails(s.read_frame(identity.persons))
        links = s.read_frame(identity.links)
        entity_of = links["dynamics_type"]
        loads = [manifest.dynamics_loaded, manifest.marketo_loaded]
        m_results = s.read_frame(manifest.marketo_loaded.results["all"])

        def mine(name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
            d_results = s.read_frame(manifest.dynamics_loaded.results[name])
            return d_results, (m_results[m_results["entity_type"] == name] if not m_results.empty else m_results)

        # Baselines and activity are read, written and dropped part by part (a first sync has millions of rows).
        def baseline_parts():
            for p in manifest.plans:
                yield succeeded_baselines(s.read_frame(p.baseline_updates), *mine(p.entity))
            for ld in loads:  # a create's values are the new pair's first baseline
                if ld.created_values:
                    yield s.read_frame(ld.created_values).assign(requires=REQUIRES_NOTHING)

        def activity_parts():
            yield from (s.read_frame(path) for path in [identity.activity, *(ld.activity for ld in loads if ld.activity)])
            for p in manifest.plans:
                d_results, m_mine = mine(p.entity)
                yield s.read_frame(p.activity)
                for part in (write_activity(p.entity, s.read_frame(p.dynamics_writes), d_results, "dynamics"),
                             write_activity(p.entity, s.read_frame(p.marketo_writes), m_mine, "marketo"),
                             flag_failed_activity(d_results, "dynamics", p.entity), flag_failed_activity(m_mine, "marketo")):
                    # identity, plan and create notes were logged by their tasks; log the write outcomes here
                    self._log_activity(part)
                    yield part

        def with_emails(parts):
            for part in parts:
                if not part.empty:
                    yield part.assign(email=part["email"].where(part["email"].notna(), part["person_id"].map(emails)))

        errors, resolved = [], []
        for p in manifest.plans:
            d_results, m_mine = mine(p.entity)
            errors += [error_rows(d_results, "dynamics", entity_of), error_rows(m_mine, "marketo", entity_of)]
            resolved += [resolved_keys(d_results, "dynamics"), resolved_keys(m_mine, "marketo")]
        errors += [s.read_frame(ld.errors) for ld in loads if ld.errors]
        errors = _concat([e for e in errors if not e.empty]) if any(not e.empty for e in errors) else pd.DataFrame()
        resolved = _concat(resolved) if resolved else pd.DataFrame(columns=["person_id", "target", "field"])
        created_links = [s.read_frame(ld.created_links) for ld in loads if ld.created_links]
        new_links = pd.concat([links[links["new"].astype(bool)].reset_index(), *created_links], ignore_index=True)
        if self.run.dry_run:
            n_base = sum(len(b) for b in baseline_parts())
            n_act = self.store.replace_preview(with_emails(activity_parts()), self.run.run_id)
            log.info("dry run: nothing committed (%d links, %d baseline updates, %d activity rows, %d errors would be "
                     "recorded; the planned lines are kept as this run's preview)", len(new_links), n_base, n_act,
                     len(errors))
            return Committed(dry_run=True, baselines=n_base, activity=n_act, errors=len(errors), links=len(new_links))
        marketo, dynamics = manifest.marketo, manifest.dynamics
        watermarks = [("marketo", "persons", marketo.high_water, None)]
        for name, d in dynamics.entities.items():
            watermarks.append(("dynamics", name, d.high_water, d.delta_link))
        if dynamics.accounts is not None:
            watermarks.append(("dynamics", accounts_stage.ACCOUNT, dynamics.accounts.high_water, dynamics.accounts.delta_link))
        if marketo.full and dynamics.full:
            watermarks.append((*FULL_RECONCILE, marketo.high_water, None))
        counts = commit_cycle(self.store, self.run.run_id, baselines=baseline_parts(),
                              activity=with_emails(activity_parts()), errors=errors, resolved=resolved,
                              watermarks=watermarks, links=new_links,
                              unlinked=s.read_frame(identity.unlinked)["person_id"].tolist(),
                              deletions=s.read_frame(identity.deletions) if identity.deletions else None,
                              paused=s.read_frame(identity.paused) if identity.paused else None,
                              moved=s.read_frame(identity.moved) if identity.moved else None,
                              merges=self._merges_to_remember(manifest))
        log.info("committed: %s", counts)
        return Committed(links=len(new_links), **counts)

    def _merges_to_remember(self, manifest: RunManifest) -> pd.DataFrame:
        """Persons merged away: those of the window, and those this run's load merged (``loser_id, winner_id``)."""
        s, loaded = self.staging, manifest.marketo_loaded
        parts = [s.read_frame(manifest.identity.merges)] if manifest.identity.merges else []
        if loaded is not None and loaded.merge_results:
            done = s.read_frame(loaded.merge_results)
            parts.append(done.loc[done["ok"].astype(bool), ["loser_id", "winner_id"]])
        parts = [p for p in parts if not p.empty]
        return final_winners(pd.concat(parts, ignore_index=True)) if parts else empty_merges()

    # -- running stages -------------------------------------------------------------------------------

    def run_stage(self, name: str, manifest: RunManifest) -> RunManifest:
        """Run one task of :data:`STAGES` on a manifest of the earlier ones; returns the manifest with its result."""
        m = manifest.model_copy(deep=True)
        if name == "refresh_schema":
            m.schema_ = self.refresh_schema()
        elif name == "extract_marketo":
            m.marketo = self.extract_marketo(m.schema_)
        elif name == "extract_dynamics":
            m.dynamics = self.extract_dynamics(m.schema_)
        elif name == "identify":
            m.identity = self.identify(m.schema_, m.marketo, m.dynamics)
        elif name.startswith("plan_"):
            entity = name.removeprefix("plan_")
            if entity in self.config.entities:
                m.plans = [p for p in m.plans if p.entity != entity] + [self.plan(entity, m.schema_, m.identity)]
        elif name == "load_dynamics":
            m.dynamics_loaded = self.load_dynamics(m)
        elif name == "load_marketo":
            m.marketo_loaded = self.load_marketo(m)
        elif name == "commit":
            m.committed = self.commit(m)
        else:
            raise ValueError(f"no stage {name!r}; the stages are {', '.join(STAGES)}")
        return m

    def run_all(self) -> dict:
        """Every stage in order, in this process (the DAG runs the same stages as separate tasks)."""
        manifest = RunManifest(run_id=self.run.run_id)
        for name in STAGES:
            manifest = self.run_stage(name, manifest)
        summary = self.report(manifest)
        self.record_run(summary)
        self.finish()
        return summary

    def record_run(self, summary: dict) -> None:
        """Keep the run's report in the state store's ``runs`` table (the console's health page reads it), then
        send its figures through Airflow's metrics (:mod:`mdsync.metrics`; a failure there is only a warning)."""
        self.store.record_run(self.run.run_id, run_counts(summary), summary=summary, run_type=self.run.run_type,
                              dry_run=self.run.dry_run, undo_of=self.run.undo_run,
                              mass_change=(summary.get("mass_change") or {}).get("outcome"))
        from mdsync.metrics import emit_run  # never raises

        emit_run(summary, config=self.config)

    def finish(self) -> None:
        """After a successful run: drop its staged frames unless ``MDSYNC_KEEP_STAGING`` is set."""
        if not self.settings.keep_staging:
            self.staging.remove()
            log.info("removed this run's staging folder %s (set MDSYNC_KEEP_STAGING=1 to keep it)", self.staging.folder)

    # -- 7. report ------------------------------------------------------------------------------------

    @staticmethod
    def report(manifest: RunManifest) -> dict:
        """A per-entity summary of the run (returned so it shows in the UI, and logged)."""
        m = manifest
        per_entity = {}
        for p in m.plans:
            per_entity[p.entity] = {
                "extracted_dynamics": m.dynamics.entities[p.entity].extracted,
                "compared": p.compared, "to_dynamics": p.to_dynamics, "to_marketo": p.to_marketo,
                "collisions": p.collisions, "held_back": p.held,
            }
        used = m.calls()
        # the loads did not run when a mass change was rejected (or not approved in time)
        dyn, mkt = m.dynamics_loaded or Loaded(side="dynamics"), m.marketo_loaded or Loaded(side="marketo")
        created = dyn.created + mkt.created
        summary = {
            "extracted_marketo_persons": m.marketo.extracted, "marketo_read": m.marketo.mode, "created": created,
            "created_in": {"dynamics": dyn.created, "marketo": mkt.created},
            "new_links": m.identity.new_links + created, "entities": per_entity,
            "written": {"dynamics": dyn.written, "marketo": mkt.written},
            "errors": {"dynamics": dyn.rejected + dyn.create_errors, "marketo": mkt.rejected + mkt.create_errors},
            "marketo_write_method": mkt.method,
            "person_ids_not_found": m.marketo.missing_person_ids,
            "api_calls": used, "committed": m.committed.model_dump() if m.committed else {},
            "tasks": {name: {"seconds": r.elapsed_s, **r.calls, "waited_s": r.waited_s}
                      for name, r in m.stage_results()},
            "mass_change": {"outcome": m.guard.outcome, "written": m.guard.proceed, "responded_by": m.guard.responded_by,
                            **{k: {"records": v.records, "threshold": v.threshold} for k, v in m.guard.sides.items()}}
            if m.guard else {},
            "undo": _undo_summary(m.plans),
            "lifecycle": {**m.identity.lifecycle, "deleted": {"dynamics": dyn.deleted, "marketo": mkt.deleted},
                          "delete_errors": {"dynamics": dyn.delete_errors, "marketo": mkt.delete_errors},
                          "merged_by_sync": mkt.merged, "merge_errors": mkt.merge_errors},
            "accounts": _accounts_summary(m),
        }
        lines = [f"sync summary (API calls: Marketo {used['marketo']}, Dynamics {used['dynamics']})",
                 f"  Marketo persons read: {m.marketo.extracted} ({m.marketo.mode}); created: {created} "
                 f"(Dynamics {dyn.created}, Marketo {mkt.created}); new links: {summary['new_links']}"]
        for name, e in per_entity.items():
            lines.append(f"  {name:<8} extracted from Dynamics {e['extracted_dynamics']}, compared {e['compared']}, "
                         f"to Dynamics {e['to_dynamics']} fields, to Marketo {e['to_marketo']} fields, "
                         f"collisions {e['collisions']}, held back {e['held_back']}")
        lines.append(f"  written: Dynamics {dyn.written}, Marketo {mkt.written} ({mkt.method}); "
                     f"rejected: Dynamics {summary['errors']['dynamics']}, Marketo {summary['errors']['marketo']}")
        life = m.identity.lifecycle
        merge_counts = ("merged_in_marketo", "links_moved", "persons_to_merge")
        if any(v for k, v in life.items() if k not in merge_counts) or dyn.deleted or mkt.deleted:
            lines.append(f"  deletes: flagged {life.get('flag', 0)}, deleted/deactivated in Dynamics {dyn.deleted} "
                         f"(refused {dyn.delete_errors}), deleted in Marketo {mkt.deleted} (refused {mkt.delete_errors}); "
                         f"sync filter: {life.get('left_filter', 0)} left, {life.get('entered_filter', 0)} entered again")
        if any(life.get(k) for k in merge_counts):
            lines.append(f"  merges: {life.get('merged_in_marketo', 0)} persons merged away in Marketo, "
                         f"{life.get('links_moved', 0)} links moved to the surviving record or person, "
                         f"{mkt.merged} persons merged in Marketo by the sync (refused {mkt.merge_errors})")
        a = summary["accounts"]
        if a and (a["changed"] or a["persons"]):
            lines.append(f"  accounts: {a['changed']} changed ({a['contacts_read']} of their contacts read); "
                         f"{a['accounts']} accounts to {a['persons']} persons compared: {a['to_marketo']} account "
                         f"fields to Marketo, {a['held']} held back")
        if m.guard and m.guard.tripped:
            lines += ["  " + line for line in guard_stage.describe(m.guard)]
        lines += _undo_lines(summary["undo"])
        if m.marketo.missing_person_ids:
            lines.append(f"  person_ids not found in Marketo (not synced): "
                         f"{', '.join(map(str, m.marketo.missing_person_ids))}")
        lines.append("  tasks: " + ", ".join(f"{n} {r.elapsed_s:.1f} s" for n, r in m.stage_results()))
        waited = {side: sum(r.waited_s.get(side, 0.0) for _, r in m.stage_results()) for side in ("marketo", "dynamics")}
        if any(v >= 1.0 for v in waited.values()):  # the limits held calls back: why a run took longer
            lines.append(f"  waited for the call limits: Marketo {waited['marketo']:.0f} s, "
                         f"Dynamics {waited['dynamics']:.0f} s (summed over parallel calls)")
        log.info("\n".join(lines))
        return summary


def run_counts(summary: dict) -> dict:
    """A report's figures as the ``runs`` table's counts (:data:`mdsync.state.schema.RUN_COUNTS`)."""
    entities = (summary.get("entities") or {}).values()
    created, written = summary.get("created_in") or {}, summary.get("written") or {}
    errors, calls = summary.get("errors") or {}, summary.get("api_calls") or {}
    return {
        "created_dynamics": created.get("dynamics", 0), "created_marketo": created.get("marketo", 0),
        "written_dynamics": written.get("dynamics", 0), "written_marketo": written.get("marketo", 0),
        "linked": summary.get("new_links", 0), "collisions": sum(e.get("collisions", 0) for e in entities),
        "errors_dynamics": errors.get("dynamics", 0), "errors_marketo": errors.get("marketo", 0),
        "held": sum(e.get("held_back", 0) for e in entities), "read_marketo": summary.get("extracted_marketo_persons", 0),
        "read_dynamics": sum(e.get("extracted_dynamics", 0) for e in entities),
        "calls_marketo": calls.get("marketo", 0), "calls_dynamics": calls.get("dynamics", 0),
    }


def _accounts_summary(m: RunManifest) -> dict:
    """What a run took from accounts: changed accounts and contacts read, persons compared, fields written."""
    read = m.dynamics.accounts if m.dynamics else None
    planned = next((p.accounts for p in m.plans if p.accounts is not None), None)
    if read is None and planned is None:
        return {}
    return {"changed": read.extracted if read else 0, "contacts_read": read.contacts_read if read else 0,
            **(planned or AccountsPlanned()).model_dump()}


def _undo_summary(plans: list[Planned]) -> dict:
    """An undo run's report: restores planned per side, what was not restored (per reason), what is only listed."""
    undos = [p for p in plans if p.undo is not None]
    if not undos:
        return {}
    skipped: dict[str, int] = {}
    for p in undos:
        for why, n in p.undo.skipped.items():
            skipped[why] = skipped.get(why, 0) + n
    return {"run_id": undos[0].undo.run_id,
            "to_restore": {"dynamics": sum(p.to_dynamics for p in undos), "marketo": sum(p.to_marketo for p in undos)},
            "not_restored": skipped, "created_listed": sum(p.undo.created for p in undos),
            "links_listed": sum(p.undo.linked for p in undos),
            "changed_later": [item.model_dump() for p in undos for item in p.undo.changed_later]}


def _undo_lines(undo: dict) -> list[str]:
    if not undo:
        return []
    why = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in undo["not_restored"].items()) or "none"
    lines = [f"  undo of run {undo['run_id']}: fields to restore: Dynamics {undo['to_restore']['dynamics']}, Marketo "
             f"{undo['to_restore']['marketo']}; not restored: {why}; records it created (listed, not deleted): "
             f"{undo['created_listed']}; links it made (kept): {undo['links_listed']}"]
    for item in undo["changed_later"]:
        lines.append(f"    changed since, kept: {item['entity']} person {item['person_id']} {item['field']} in "
                     f"{item['changed_in']}: now {item['now']!r} (the run wrote {item['wrote']!r})")
    return lines


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True)


def _rejected(results: pd.DataFrame) -> int:
    return int((~results["ok"].astype(bool) & results["error_code"].ne("dry_run")).sum())


def _emails(persons: pd.DataFrame) -> pd.Series:
    if persons.empty or "email" not in persons:
        return pd.Series(dtype=object)
    p = persons[persons["id"].notna()].drop_duplicates("id", keep="last")
    return pd.Series(p["email"].astype(object).to_numpy(), index=p["id"].astype("int64").to_numpy())


def _invalid(problems) -> pd.DataFrame | None:
    if not problems:
        return None
    return pd.DataFrame({"person_id": np.concatenate([p.keys.to_numpy() for p in problems]),
                         "field": np.concatenate([[p.field] * len(p.keys) for p in problems])})


def _split(writes: pd.DataFrame, allowed: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    ok = writes["field"].isin(allowed).to_numpy()
    return writes[ok].reset_index(drop=True), writes[~ok].reset_index(drop=True)
