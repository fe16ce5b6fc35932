"""One sync cycle, stage by stage, as the DAG's tasks run it (DESIGN §4).

Each method is one task: it reads what earlier tasks staged (paths come in through XCom), does its stage,
stages its frames as parquet and returns only paths and counts. Clients are built by factories the DAG
passes in (Airflow hooks), so this module never imports Airflow.

refresh_schema -> extract_marketo || extract_dynamics -> identify -> plan (per entity type)
-> load_dynamics -> load_marketo -> commit -> report
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from mdsync import access as access_stage
from mdsync.activity import activity_frame, log_activity
from mdsync.canonical import canonical_frame
from mdsync.commit import (collision_activity, commit_cycle, error_rows, held_activity, resolved_keys,
                           succeeded_baselines, write_activity)
from mdsync.config import Side, SyncConfig, load_config
from mdsync.extract import extract_dynamics, extract_marketo
from mdsync.identity import Identity, link_field_writes
from mdsync.load import load_dynamics, load_marketo, record_rejections_in_marketo
from mdsync.plan import plan_entity, suppress_known_rejections
from mdsync.settings import Settings
from mdsync.staging import Staging
from mdsync.state import StateStore, open_store

log = logging.getLogger("mdsync.cycle")

FULL_RECONCILE = ("full", "all")


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


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


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
            self._dynamics_preloaded = False
        return self._dynamics

    def _calls(self) -> dict[str, int]:
        return {"marketo": getattr(self._marketo, "calls_made", 0) or 0,
                "dynamics": getattr(self._dynamics, "calls_made", 0) or 0}

    def _access(self, path: str) -> access_stage.FieldAccess:
        acc = access_stage.FieldAccess.from_json(self.staging.read_json(path))
        return acc

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

    # -- 1. refresh schema ----------------------------------------------------------------------------

    def refresh_schema(self) -> dict:
        """Describe both sides (or reuse a recent refresh) and decide field access for this run."""
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
                    return {"access": path, "refreshed": False, "calls": self._calls()}
            except (FileNotFoundError, KeyError, ValueError):
                pass
        describe = self.marketo.describe_leads(refresh=True)
        dyn = {}
        for name, entity in self.config.entities.items():
            logical = self.dynamics.logical_name(entity.entity_set)
            dyn[name] = {"entity_set": entity.entity_set, "logical_name": logical,
                         "attributes": self.dynamics.attributes(logical, refresh=True),
                         "permissions": self.dynamics.field_permissions(logical)}
        acc = access_stage.refresh_access(self.config, describe, dyn)
        acc.refreshed_at = datetime.now(timezone.utc).isoformat()
        data = acc.to_json()
        path = self.staging.write_json("field-access", data)
        self.staging.write_json(cache, data, shared=True)
        dropped = sum(len(e.dropped) for e in acc.entities.values())
        return {"access": path, "refreshed": True, "dropped_fields": dropped, "calls": self._calls()}

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

    def extract_marketo(self, access_path: str) -> dict:
        self.marketo.use_describe(pd.DataFrame(self._access(access_path).marketo_describe))
        full = self.full_reconcile_due()
        known = self.store.load_links().index.tolist() if full else []
        since = self.window_since()
        result = extract_marketo(self.marketo, self.config, since=since, extra_ids=self.run.person_ids, known_ids=known,
                                 lookback_days=self.settings.full_lookback_days if full else 0,
                                 bulk_poll_seconds=self.settings.bulk_poll_seconds)
        return {
            "persons": self.staging.write_frame("marketo-persons", result.persons),
            "deleted": self.staging.write_frame("marketo-deleted", pd.DataFrame({"id": result.deleted}, dtype="int64")),
            "high_water": _iso(result.high_water),
            "since": _iso(since), "extracted": len(result.persons), "full": full, "calls": self._calls(),
        }

    def extract_dynamics(self, access_path: str) -> dict:
        acc = self._access(access_path)
        self._use_metadata(acc)
        full = self.full_reconcile_due()
        out = {"entities": {}, "full": full}
        for name, entity in self.config.entities.items():
            wm = self.store.watermark("dynamics", name)
            result = extract_dynamics(self.dynamics, self.config, entity, acc,
                                      delta_link=wm.token if wm else None, full=full)
            out["entities"][name] = {
                "rows": self.staging.write_frame(f"dynamics-{name}", result.rows),
                "deleted": self.staging.write_frame(f"dynamics-{name}-deleted", pd.DataFrame({"id": result.deleted}, dtype="str")),
                "delta_link": result.delta_link, "high_water": _iso(result.high_water), "extracted": len(result.rows),
                "full_read": result.full_read,
            }
        out["calls"] = self._calls()
        return out

    # -- 3. identity ----------------------------------------------------------------------------------

    def identify(self, access_path: str, marketo: dict, dynamics: dict) -> dict:
        acc = self._access(access_path)
        self._use_metadata(acc, marketo=True)
        persons = self.staging.read_frame(marketo["persons"])
        records = {e: self.staging.read_frame(d["rows"]) for e, d in dynamics["entities"].items()}
        identity = Identity(self.config, acc, self.marketo, self.dynamics, dry_run=self.run.dry_run)
        result = identity.run(
            self.store.load_links(), persons, records, self.staging.read_frame(marketo["deleted"])["id"].tolist(),
            {e: self.staging.read_frame(d["deleted"])["id"].tolist() for e, d in dynamics["entities"].items()},
            push_ids=self.run.person_ids, push_as=self.run.sync_as,
        )
        activity = activity_frame(result.activity)
        emails = _emails(result.persons)
        activity["email"] = activity["email"].where(activity["email"].notna(), activity["person_id"].map(emails))
        log_activity(activity, log)
        m_links, d_links = link_field_writes(self.config, result.links, result.persons, result.records)
        return {
            "links": self.staging.write_frame("links", result.links),
            "persons": self.staging.write_frame("persons", result.persons),
            "records": {e: self.staging.write_frame(f"records-{e}", r) for e, r in result.records.items()},
            "unlinked": self.staging.write_frame("unlinked", pd.DataFrame({"person_id": result.unlinked}, dtype="int64")),
            "activity": self.staging.write_frame("identity-activity", activity),
            "errors": self.staging.write_frame("identity-errors", pd.DataFrame(result.errors)),
            "marketo_link_writes": self.staging.write_frame("marketo-link-writes", m_links),
            "dynamics_link_writes": {e: self.staging.write_frame(f"dynamics-link-writes-{e}", w) for e, w in d_links.items()},
            "new_links": int(result.links["new"].sum()),
            "created": int(activity["action"].eq("create").sum()) if not activity.empty else 0,
            "calls": self._calls(),
        }

    # -- 4. diff, resolve, plan -----------------------------------------------------------------------

    def plan(self, entity_name: str, access_path: str, identity: dict) -> dict:
        entity = self.config.entity(entity_name)
        acc = self._access(access_path).entities[entity_name]
        links = self.staging.read_frame(identity["links"])
        links = links[links["dynamics_type"] == entity_name]
        persons = self.staging.read_frame(identity["persons"])
        records = self.staging.read_frame(identity["records"][entity_name])

        m_fields = [f for f in entity.fields if f.name in acc.marketo_read]
        d_fields = [f for f in entity.fields if f.name in acc.dynamics_read]
        mine = persons[persons["id"].isin(links.index)] if not persons.empty else persons
        m_raw = mine.set_index(mine["id"].astype("int64").rename("person_id")) if not mine.empty else \
            pd.DataFrame(index=pd.Index([], dtype="int64", name="person_id"))
        marketo, m_problems = canonical_frame(m_raw, m_fields, Side.MARKETO)
        by_record = pd.Series(links.index, index=links["dynamics_id"].str.lower())
        if not records.empty:
            pid = by_record.reindex(records[entity.id_column].astype(str).str.lower().to_numpy())
            d_raw = records[pid.notna().to_numpy()].copy()
            d_raw.index = pd.Index(pid.dropna().astype("int64").to_numpy(), name="person_id")
        else:
            d_raw = pd.DataFrame(index=pd.Index([], dtype="int64", name="person_id"))
        dynamics, d_problems = canonical_frame(d_raw, d_fields, Side.DYNAMICS)
        keys = marketo.index.union(dynamics.index)
        baseline = self.store.load_baselines(person_ids=keys.tolist(), fields=entity.field_names)
        plan = plan_entity(entity, baseline, marketo, dynamics, links, keys=keys,
                           marketo_invalid=_invalid(m_problems), dynamics_invalid=_invalid(d_problems))

        skipped = [activity_frame(_problem_rows(entity_name, m_problems + d_problems, links))]
        # Fields the sync user cannot write this run are not sent (field access, DESIGN §4.1).
        d_writes, d_blocked = _split(plan.dynamics_writes, acc.dynamics_write)
        m_writes, m_blocked = _split(plan.marketo_writes, acc.marketo_write)
        for blocked, where in ((d_blocked, "dynamics"), (m_blocked, "marketo")):
            if not blocked.empty:
                skipped.append(activity_frame(blocked.assign(
                    entity_type=entity_name, dynamics_type=entity_name, action="skip", old_value=blocked["previous"],
                    new_value=blocked["value"], detail=f"not written: the sync user cannot update this field in {where}")))
        held = []
        if not self.run.retry_failed:
            errors = self.store.open_errors(person_ids=keys.tolist())
            d_writes, d_held = suppress_known_rejections(d_writes, errors, Side.DYNAMICS)
            m_writes, m_held = suppress_known_rejections(m_writes, errors, Side.MARKETO)
            held = [held_activity(entity_name, d_held, "dynamics"), held_activity(entity_name, m_held, "marketo")]
        collisions = collision_activity(entity_name, plan.collisions)
        notes = pd.concat([*skipped, *held, collisions], ignore_index=True)
        emails = _emails(persons)
        notes["email"] = notes["person_id"].map(emails)
        log_activity(notes, log)
        summary = plan.summary()
        log.info("plan %s: compared %d linked pairs: %d fields to Dynamics, %d fields to Marketo, %d collisions",
                 entity_name, summary["compared"], len(d_writes), len(m_writes), summary["collisions"])
        s = self.staging
        return {
            "entity": entity_name,
            "dynamics_writes": s.write_frame(f"plan-{entity_name}-dynamics", d_writes),
            "marketo_writes": s.write_frame(f"plan-{entity_name}-marketo", m_writes.assign(entity_type=entity_name)),
            "baseline_updates": s.write_frame(f"plan-{entity_name}-baselines", plan.baseline_updates),
            "activity": s.write_frame(f"plan-{entity_name}-activity", notes),
            "compared": summary["compared"], "to_dynamics": len(d_writes), "to_marketo": len(m_writes),
            "collisions": summary["collisions"], "held": int(sum(len(h) for h in held)),
        }

    # -- 5. load --------------------------------------------------------------------------------------

    def load_dynamics(self, access_path: str, identity: dict, plans: list[dict]) -> dict:
        acc = self._access(access_path)
        self._use_metadata(acc)
        out = {"results": {}, "written": 0, "rejected": 0}
        for p in plans:
            name = p["entity"]
            writes = self.staging.read_frame(p["dynamics_writes"])
            link_writes = self.staging.read_frame(identity["dynamics_link_writes"][name])
            results = load_dynamics(self.config, self.config.entity(name), writes, link_writes,
                                    acc.entities[name].dynamics_max_length, self.dynamics, dry_run=self.run.dry_run)
            out["results"][name] = self.staging.write_frame(f"results-{name}-dynamics", results)
            out["written"] += int(results["ok"].sum())
            out["rejected"] += int((~results["ok"].astype(bool) & results["error_code"].ne("dry_run")).sum())
        out["calls"] = self._calls()
        return out

    def load_marketo(self, access_path: str, identity: dict, plans: list[dict], dynamics_loaded: dict) -> dict:
        acc = self._access(access_path)
        writes = pd.concat([self.staging.read_frame(p["marketo_writes"]) for p in plans], ignore_index=True)
        link_writes = self.staging.read_frame(identity["marketo_link_writes"])
        max_length = {}
        for e in acc.entities.values():
            max_length.update(e.marketo_max_length)
        results = load_marketo(self.config, self.config.entities, writes, link_writes, max_length, self.marketo,
                               dry_run=self.run.dry_run)
        rejected_in_dynamics = []
        for path in dynamics_loaded["results"].values():
            r = self.staging.read_frame(path)
            rejected_in_dynamics.append(r[~r["ok"].astype(bool) & r["error_code"].ne("dry_run")])
        rejected = pd.concat(rejected_in_dynamics, ignore_index=True) if rejected_in_dynamics else pd.DataFrame()
        logged = 0 if self.run.dry_run else record_rejections_in_marketo(self.config, rejected, self.marketo)
        return {"results": self.staging.write_frame("results-marketo", results), "written": int(results["ok"].sum()),
                "rejected": int((~results["ok"].astype(bool) & results["error_code"].ne("dry_run")).sum()),
                "rejections_logged_in_marketo": logged, "calls": self._calls()}

    # -- 6. commit ------------------------------------------------------------------------------------

    def commit(self, marketo: dict, dynamics: dict, identity: dict, plans: list[dict], dyn_loaded: dict,
               mkt_loaded: dict) -> dict:
        s = self.staging
        persons = s.read_frame(identity["persons"])
        emails = _emails(persons)
        links = s.read_frame(identity["links"])
        entity_of = links["dynamics_type"]
        m_results = s.read_frame(mkt_loaded["results"])
        baselines, activity, errors, resolved = [], [s.read_frame(identity["activity"])], [s.read_frame(identity["errors"])], []
        for p in plans:
            name = p["entity"]
            d_results = s.read_frame(dyn_loaded["results"][name])
            m_mine = m_results[m_results["entity_type"] == name] if not m_results.empty else m_results
            baselines.append(succeeded_baselines(s.read_frame(p["baseline_updates"]), d_results, m_mine))
            activity += [s.read_frame(p["activity"]),
                         write_activity(name, s.read_frame(p["dynamics_writes"]), d_results, "dynamics"),
                         write_activity(name, s.read_frame(p["marketo_writes"]), m_mine, "marketo")]
            errors += [error_rows(d_results, "dynamics", entity_of), error_rows(m_mine, "marketo", entity_of)]
            resolved += [resolved_keys(d_results, "dynamics"), resolved_keys(m_mine, "marketo")]
        activity = pd.concat([a for a in activity if not a.empty], ignore_index=True) if any(
            not a.empty for a in activity) else activity_frame([])
        activity["email"] = activity["email"].where(activity["email"].notna(), activity["person_id"].map(emails))
        # identity and plan notes were logged by their tasks; log the write outcomes here
        log_activity(activity[activity["action"].isin(["update", "error"]) & activity["field"].notna()], log)
        baselines = pd.concat(baselines, ignore_index=True)
        errors = pd.concat([e for e in errors if not e.empty], ignore_index=True) if any(not e.empty for e in errors) else pd.DataFrame()
        resolved = pd.concat(resolved, ignore_index=True)
        if self.run.dry_run:
            log.info("dry run: nothing committed (%d baseline updates, %d activity rows, %d errors would be recorded)",
                     len(baselines), len(activity), len(errors))
            return {"dry_run": True, "baselines": len(baselines), "activity": len(activity), "errors": len(errors)}
        watermarks = [("marketo", "persons", _dt(marketo["high_water"]), None)]
        for name, d in dynamics["entities"].items():
            watermarks.append(("dynamics", name, _dt(d["high_water"]), d["delta_link"]))
        if marketo.get("full") and dynamics.get("full"):
            watermarks.append((*FULL_RECONCILE, _dt(marketo["high_water"]), None))
        new_links = links[links["new"]].reset_index()
        counts = commit_cycle(self.store, self.run.run_id, baselines=baselines, activity=activity, errors=errors,
                              resolved=resolved, watermarks=watermarks, links=new_links,
                              unlinked=s.read_frame(identity["unlinked"])["person_id"].tolist())
        log.info("committed: %s", counts)
        return counts

    # -- all stages ----------------------------------------------------------------------------------

    def run_all(self) -> dict:
        """Every stage in order, in this process (the DAG runs the same stages as separate tasks)."""
        schema = self.refresh_schema()
        marketo = self.extract_marketo(schema["access"])
        dynamics = self.extract_dynamics(schema["access"])
        identity = self.identify(schema["access"], marketo, dynamics)
        plans = [self.plan(e, schema["access"], identity) for e in self.config.entities]
        dyn_loaded = self.load_dynamics(schema["access"], identity, plans)
        mkt_loaded = self.load_marketo(schema["access"], identity, plans, dyn_loaded)
        committed = self.commit(marketo, dynamics, identity, plans, dyn_loaded, mkt_loaded)
        # one client per cycle here, so the last stage's counters hold the whole cycle's calls
        summary = self.report(marketo, dynamics, identity, plans, dyn_loaded, mkt_loaded, committed, [self._calls()])
        self.finish()
        return summary

    def finish(self) -> None:
        """After a successful run: drop its staged frames unless ``MDSYNC_KEEP_STAGING`` is set."""
        if not self.settings.keep_staging:
            self.staging.remove()
            log.info("removed this run's staging folder %s (set MDSYNC_KEEP_STAGING=1 to keep it)", self.staging.folder)

    # -- 7. report ------------------------------------------------------------------------------------

    @staticmethod
    def report(marketo: dict, dynamics: dict, identity: dict, plans: list[dict], dyn_loaded: dict, mkt_loaded: dict,
               committed: dict, calls: list[dict]) -> dict:
        """A per-entity summary of the run (returned so it shows in the UI, and logged)."""
        per_entity = {}
        for p in plans:
            name = p["entity"]
            per_entity[name] = {
                "extracted_dynamics": dynamics["entities"][name]["extracted"],
                "compared": p["compared"], "to_dynamics": p["to_dynamics"], "to_marketo": p["to_marketo"],
                "collisions": p["collisions"], "held_back": p["held"],
            }
        used = {"marketo": sum(c.get("marketo", 0) for c in calls), "dynamics": sum(c.get("dynamics", 0) for c in calls)}
        summary = {
            "extracted_marketo_persons": marketo["extracted"], "created": identity["created"],
            "new_links": identity["new_links"], "entities": per_entity,
            "written": {"dynamics": dyn_loaded["written"], "marketo": mkt_loaded["written"]},
            "errors": {"dynamics": dyn_loaded["rejected"], "marketo": mkt_loaded["rejected"]},
            "api_calls": used, "committed": committed,
        }
        lines = [f"sync summary (API calls: Marketo {used['marketo']}, Dynamics {used['dynamics']})",
                 f"  Marketo persons extracted: {marketo['extracted']}; created: {identity['created']}; new links: {identity['new_links']}"]
        for name, e in per_entity.items():
            lines.append(f"  {name:<8} extracted from Dynamics {e['extracted_dynamics']}, compared {e['compared']}, "
                         f"to Dynamics {e['to_dynamics']} fields, to Marketo {e['to_marketo']} fields, "
                         f"collisions {e['collisions']}, held back {e['held_back']}")
        lines.append(f"  written: Dynamics {dyn_loaded['written']}, Marketo {mkt_loaded['written']}; "
                     f"rejected: Dynamics {dyn_loaded['rejected']}, Marketo {mkt_loaded['rejected']}")
        log.info("\n".join(lines))
        return summary


def _emails(persons: pd.DataFrame) -> pd.Series:
    if persons.empty or "email" not in persons:
        return pd.Series(dtype=object)
    return pd.Series(persons["email"].astype(object).to_numpy(), index=persons["id"].astype("int64").to_numpy())


def _invalid(problems) -> pd.DataFrame | None:
    if not problems:
        return None
    return pd.DataFrame({"person_id": np.concatenate([p.keys.to_numpy() for p in problems]),
                         "field": np.concatenate([[p.field] * len(p.keys) for p in problems])})


def _problem_rows(entity: str, problems, links: pd.DataFrame) -> list[dict]:
    rows = []
    for p in problems:
        where = "Marketo" if p.side is Side.MARKETO else "Dynamics"
        for pid, value in zip(p.keys, p.values):
            rows.append({"entity_type": entity, "person_id": int(pid), "dynamics_type": entity,
                         "dynamics_id": links["dynamics_id"].get(pid), "action": "skip", "field": p.field,
                         "new_value": None if pd.isna(value) else str(value),
                         "detail": f"{where} value {value!r} left alone: {p.reason}"})
    return rows


def _split(writes: pd.DataFrame, allowed: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    ok = writes["field"].isin(allowed).to_numpy()
    return writes[ok].reset_index(drop=True), writes[~ok].reset_index(drop=True)
