"""Stage 3 of the cycle: identity (DESIGN §3): keep links, rebuild lost ones, match by email, create.

- Deleted on either side: the link is dropped (the record on the other side is kept) and logged.
- Links lost from the state store are rebuilt from the link fields on the records: the Dataverse
  ``mdsync_marketopersonid`` column, the Marketo ``dynamicsRecordId`` / ``dynamicsRecordType`` fields.
- An unlinked Dynamics record links by email to exactly one Marketo person (case-insensitive), or becomes a
  new Marketo person; several matches are logged as ambiguous and nothing is done.
- An unlinked Marketo person is created in Dynamics only when marked for sync (or named by a manual run):
  an existing contact, then lead, with that email is linked instead; otherwise it is upserted by the
  alternate key on the Marketo-id column, so a retried create can never duplicate.
- Newly linked pairs get both records read in full, so the first diff sees both sides; the link fields on
  both records are (re)written by the load stages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mdsync.access import FieldAccess
from mdsync.canonical import canonical_frame, to_dynamics, to_marketo
from mdsync.config import ENTITY_TYPES, Side, SyncConfig
from mdsync.extract import dynamics_columns, marketo_fields

log = logging.getLogger("mdsync.identity")

#: how many values go into one Dataverse ``column in (...)`` ``$filter`` (keeps the URL short)
VALUES_PER_QUERY = 50


@dataclass
class IdentityResult:
    #: every link after this stage: index person_id; dynamics_type, dynamics_id, method, new
    links: pd.DataFrame
    #: Marketo persons (raw API columns), extracted plus those read for new links
    persons: pd.DataFrame
    #: per entity type, Dynamics rows (raw API columns), extracted plus those read for new links
    records: dict[str, pd.DataFrame]
    #: person ids whose link was dropped (deleted on a side)
    unlinked: list[int]
    activity: list[dict] = field(default_factory=list)
    #: errors to open in the state store (creations that were refused)
    errors: list[dict] = field(default_factory=list)


def _lower(series: pd.Series) -> pd.Series:
    return series.astype("str").str.strip().str.lower()


def _flag(value) -> bool:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return False
    return str(value).strip().lower() in ("true", "1", "yes")


class Identity:
    """Runs the identity stage for one cycle.

    :param marketo: a :class:`~mdsync.marketo.MarketoClient` (lookups and person creation).
    :param dynamics: a :class:`~mdsync.dynamics.DynamicsClient` (lookups and record creation).
    :param dry_run: look things up but create nothing; proposed links are used for the plan only.
    """

    def __init__(self, config: SyncConfig, access: FieldAccess, marketo, dynamics, *, dry_run: bool = False) -> None:
        self.config, self.access = config, access
        self.marketo, self.dynamics = marketo, dynamics
        self.dry_run = dry_run
        self.activity: list[dict] = []
        self.errors: list[dict] = []
        link = config.marketo.link_fields
        self.m_id_field, self.m_type_field = link.dynamics_id, link.dynamics_type
        self.d_link_column = config.dynamics.marketo_id_column
        self.fields = marketo_fields(config)

    # -- helpers ----------------------------------------------------------------------------------------

    def _note(self, action: str, *, person_id=None, email=None, entity=None, dynamics_id=None, detail="", **extra) -> None:
        self.activity.append({"action": action, "person_id": None if person_id is None else int(person_id),
                              "email": email, "entity_type": entity, "dynamics_type": entity,
                              "dynamics_id": None if dynamics_id is None else str(dynamics_id), "detail": detail, **extra})

    def _id_column(self, entity: str) -> str:
        return self.config.entity(entity).id_column

    # -- the stage --------------------------------------------------------------------------------------

    def run(
        self, links: pd.DataFrame, persons: pd.DataFrame, records: dict[str, pd.DataFrame],
        marketo_deleted: list[int], dynamics_deleted: dict[str, list[str]],
        push_ids: list[int] = (), push_as: str | None = None,
    ) -> IdentityResult:
        """Work out the links for this cycle.

        :param links: the state store's links (index person_id; dynamics_type, dynamics_id, method).
        :param persons: extracted Marketo persons (raw).
        :param records: extracted Dynamics rows per entity type (raw).
        :param push_ids: persons to sync now (manual run), created in Dynamics when unlinked.
        :param push_as: ``lead`` or ``contact`` for ``push_ids`` (default: the sync marker's default type).
        """
        links = links[["dynamics_type", "dynamics_id", "method"]].copy()
        links["new"] = False
        persons = persons.copy()
        records = {e: r.copy() for e, r in records.items()}
        unlinked = self._drop_deleted(links, marketo_deleted, dynamics_deleted)
        links = links.drop(index=unlinked)
        self.deleted_records = {(e, str(i).lower()) for e, ids in dynamics_deleted.items() for i in ids}
        self.deleted_persons = {int(i) for i in marketo_deleted}

        new_links: list[dict] = []
        new_links += self._rebuild_from_dynamics(links, records)
        links = _add(links, new_links)
        rebuilt = self._rebuild_from_marketo(links, persons)
        new_links += rebuilt
        links = _add(links, rebuilt)
        matched = self._match_dynamics_records(links, records, persons)
        new_links += matched
        links = _add(links, matched)
        pushed = self._push_marketo_persons(links, persons, push_ids, push_as or self.config.marketo.sync_marker.default_type)
        new_links += pushed
        links = _add(links, pushed)

        persons, records = self._complete_new_pairs(links, persons, records)
        links, new_links = self._drop_dangling(links, new_links, persons, records)
        for link in new_links:
            self._note("link", person_id=link["person_id"], entity=link["dynamics_type"], dynamics_id=link["dynamics_id"],
                       detail=f"linked ({link['method'].replace('_', ' ')})" + (" [dry run: not saved]" if self.dry_run else ""))
        return IdentityResult(links=links, persons=persons, records=records, unlinked=unlinked,
                              activity=self.activity, errors=self.errors)

    def _drop_deleted(self, links: pd.DataFrame, marketo_deleted: list[int], dynamics_deleted: dict[str, list[str]]) -> list[int]:
        gone = set()
        for pid in set(map(int, marketo_deleted)) & set(links.index):
            gone.add(pid)
            self._note("unlink", person_id=pid, entity=links.loc[pid, "dynamics_type"], dynamics_id=links.loc[pid, "dynamics_id"],
                       detail="person deleted in Marketo; the Dynamics record is kept")
        for entity, ids in dynamics_deleted.items():
            hit = links[(links["dynamics_type"] == entity) & links["dynamics_id"].str.lower().isin([i.lower() for i in ids])]
            for pid, row in hit.iterrows():
                gone.add(int(pid))
                self._note("unlink", person_id=pid, entity=entity, dynamics_id=row["dynamics_id"],
                           detail=f"{entity} deleted in Dynamics; the Marketo person is kept")
        return sorted(gone)

    def _rebuild_from_dynamics(self, links: pd.DataFrame, records: dict[str, pd.DataFrame]) -> list[dict]:
        """Unlinked Dynamics rows that carry a Marketo person id (state store lost, or set by hand)."""
        out = []
        taken_persons = set(links.index)
        taken_records = set(zip(links["dynamics_type"], links["dynamics_id"].str.lower()))
        for entity, rows in records.items():
            if rows.empty or self.d_link_column not in rows:
                continue
            idc = self._id_column(entity)
            # only rows that carry a person id and are not linked yet (a full read holds every row)
            carrying = rows[rows[self.d_link_column].fillna("").astype(str).str.strip().ne("").to_numpy()]
            carrying = carrying[~_unlinked_mask(carrying, idc, entity, links, negate=True)]
            for did, mid in carrying[[idc, self.d_link_column]].itertuples(index=False):
                if (entity, str(did).lower()) in taken_records:
                    continue
                try:
                    pid = int(str(mid).strip())
                except ValueError:
                    self._note("error", entity=entity, dynamics_id=did,
                               detail=f"{self.d_link_column} holds {str(mid)!r}, which is not a Marketo person id; not linked")
                    continue
                if pid in self.deleted_persons:
                    continue  # the person was deleted in Marketo this window
                if pid in taken_persons:
                    self._note("ambiguous", person_id=pid, entity=entity, dynamics_id=did,
                               detail=f"{self.d_link_column} names person {pid}, who is already linked to another record; "
                                      "nothing done (fix the column or merge the records)")
                    continue
                taken_persons.add(pid)
                taken_records.add((entity, str(did).lower()))
                out.append({"person_id": pid, "dynamics_type": entity, "dynamics_id": str(did), "method": "marketo_id_column"})
        return out

    def _rebuild_from_marketo(self, links: pd.DataFrame, persons: pd.DataFrame) -> list[dict]:
        """Unlinked persons whose Marketo link fields name a Dynamics record."""
        if persons.empty or self.m_id_field not in persons:
            return []
        out = []
        taken_records = set(zip(links["dynamics_type"], links["dynamics_id"].str.lower()))
        unlinked = persons[~persons["id"].isin(links.index)]
        for pid, did, kind in unlinked[["id", self.m_id_field, self.m_type_field]].itertuples(index=False):
            if did is None or pd.isna(did) or str(did).strip() == "":
                continue
            kind = str(kind).strip().lower() if kind is not None and not pd.isna(kind) else ""
            if kind not in ENTITY_TYPES or kind not in self.config.entities:
                self._note("error", person_id=pid, detail=f"{self.m_type_field} is {kind!r}, expected lead or contact; not linked")
                continue
            if (kind, str(did).lower()) in self.deleted_records:
                continue  # the record was deleted in Dynamics this window: nothing to link to
            if (kind, str(did).lower()) in taken_records:
                self._note("ambiguous", person_id=pid, entity=kind, dynamics_id=did,
                           detail=f"{self.m_id_field} names a {kind} that is linked to another person; nothing done")
                continue
            taken_records.add((kind, str(did).lower()))
            out.append({"person_id": int(pid), "dynamics_type": kind, "dynamics_id": str(did), "method": "dynamics_id_field"})
        return out

    def _match_dynamics_records(self, links: pd.DataFrame, records: dict[str, pd.DataFrame], persons: pd.DataFrame) -> list[dict]:
        """Unlinked Dynamics rows: link by email to one Marketo person, or create the person in Marketo."""
        linked = set(zip(links["dynamics_type"], links["dynamics_id"].str.lower()))
        candidates = []
        for entity, rows in records.items():
            if rows.empty:
                continue
            email_col = self.config.entity(entity).email_field.dynamics
            idc = self._id_column(entity)
            active = rows[rows["statecode"].fillna(0).astype("int64") == 0] if "statecode" in rows else rows
            # a full read holds every row: pick the few unlinked ones before looking at rows one by one
            for _, row in active[_unlinked_mask(active, idc, entity, links)].iterrows():
                if (entity, str(row[idc]).lower()) in linked:
                    continue
                email = row.get(email_col)
                if email is None or pd.isna(email) or not str(email).strip():
                    self._note("skip", entity=entity, dynamics_id=row[idc],
                               detail=f"unlinked {entity} has no email ({email_col}); cannot match or create a Marketo person")
                    continue
                candidates.append((entity, str(row[idc]), str(email).strip(), row))
        if not candidates:
            return []
        # One Marketo person per email: a contact takes precedence over a lead with the same email.
        by_email: dict[str, list] = {}
        for cand in candidates:
            by_email.setdefault(cand[2].lower(), []).append(cand)
        chosen = []
        for email, cands in by_email.items():
            contacts = [c for c in cands if c[0] == "contact"]
            pool = contacts or cands
            if len(pool) > 1:
                for entity, did, addr, _ in pool:
                    self._note("ambiguous", entity=entity, dynamics_id=did, email=addr,
                               detail=f"{len(pool)} unlinked Dynamics {pool[0][0]}s share this email; none is linked")
                continue
            chosen.append(pool[0])
            for entity, did, addr, _ in cands:
                if (entity, did) != (pool[0][0], pool[0][1]):
                    self._note("skip", entity=entity, dynamics_id=did, email=addr,
                               detail=f"the {pool[0][0]} {pool[0][1]} with the same email is linked instead")
        found = self.marketo.get_leads("email", [c[2] for c in chosen], self.fields) if chosen else pd.DataFrame()
        matches = dict(iter(found.groupby(_lower(found["email"]).to_numpy()))) if not found.empty else {}
        out, to_create = [], []
        for entity, did, email, row in chosen:
            group = matches.get(email.lower())
            if group is None:
                to_create.append((entity, did, email, row))
            elif len(group) > 1:
                self._note("ambiguous", entity=entity, dynamics_id=did, email=email,
                           detail=f"{len(group)} Marketo persons have this email (ids {', '.join(map(str, group['id']))}); none is linked")
            else:
                pid = int(group["id"].iloc[0])
                if entity == "contact" and self._lead_qualified(pid, links, records):
                    # The lead this person follows was qualified into this contact: the person follows the contact
                    # now (sales owns it), as the native sync does on lead conversion.
                    self._note("link", person_id=pid, entity=entity, dynamics_id=did, email=email,
                               detail=f"lead {links.loc[pid, 'dynamics_id']} was qualified: the person now follows "
                                      "the contact created from it")
                    out.append({"person_id": pid, "dynamics_type": entity, "dynamics_id": did, "method": "lead_qualified"})
                    continue
                if pid in links.index or any(o["person_id"] == pid for o in out):
                    self._note("ambiguous", person_id=pid, entity=entity, dynamics_id=did, email=email,
                               detail="the Marketo person with this email is already linked to another record; nothing done")
                    continue
                out.append({"person_id": pid, "dynamics_type": entity, "dynamics_id": did, "method": "email"})
        out += self._create_persons(to_create)
        return out

    def _lead_qualified(self, person_id: int, links: pd.DataFrame, records: dict[str, pd.DataFrame]) -> bool:
        """Whether the person is linked to a lead that is now qualified (lead ``statecode`` 1)."""
        if person_id not in links.index or links.loc[person_id, "dynamics_type"] != "lead" or "lead" not in self.config.entities:
            return False
        lead_id = str(links.loc[person_id, "dynamics_id"]).lower()
        leads = records.get("lead")
        idc = self._id_column("lead")
        if leads is not None and not leads.empty and "statecode" in leads:
            hit = leads[leads[idc].astype(str).str.lower() == lead_id]
            if not hit.empty:
                return int(hit["statecode"].fillna(0).iloc[0]) == 1
        states = self.dynamics.states(self.config.entity("lead").entity_set, [lead_id])
        return not states.empty and int(states["statecode"].fillna(0).iloc[0]) == 1

    def _create_persons(self, to_create: list) -> list[dict]:
        if not to_create:
            return []
        records = []
        for entity, did, email, row in to_create:
            ent = self.config.entity(entity)
            allowed = set(self.access.entities[entity].marketo_write) & set(self.access.entities[entity].dynamics_read)
            fields = [f for f in ent.fields if f.flows_to_marketo and f.name in allowed]
            canon, _ = canonical_frame(pd.DataFrame([row]), fields, Side.DYNAMICS)
            rec = {f.marketo: to_marketo(canon[f.name], f).iloc[0] for f in fields if f.name in canon}
            rec = {k: v for k, v in rec.items() if v is not None}
            rec.update({self.m_id_field: did, self.m_type_field: entity})
            records.append(rec)
        if self.dry_run:
            for entity, did, email, _ in to_create:
                self._note("create", email=email, entity=entity, dynamics_id=did, detail="would create the person in Marketo [dry run]")
            return []
        results = self.marketo.sync_leads(records, action="createOnly", lookup_field="email")
        out = []
        for (entity, did, email, _), res in zip(to_create, results.to_dict("records")):
            if res["status"] in ("created", "updated") and res.get("id") is not None and not pd.isna(res["id"]):
                pid = int(res["id"])
                self._note("create", person_id=pid, email=email, entity=entity, dynamics_id=did,
                           detail=f"new {entity} in Dynamics: created the person in Marketo")
                out.append({"person_id": pid, "dynamics_type": entity, "dynamics_id": did, "method": "created_in_marketo"})
            else:
                msg = f"Marketo refused to create the person: {res.get('reason_code')} {res.get('reason_message')}"
                self._note("error", email=email, entity=entity, dynamics_id=did, detail=msg + "; retried next cycle")
        return out

    def _push_marketo_persons(self, links: pd.DataFrame, persons: pd.DataFrame, push_ids, push_as: str) -> list[dict]:
        """Unlinked persons marked for sync (or named by a manual run) -> an existing or new Dynamics record."""
        if persons.empty:
            return []
        marker = self.config.marketo.sync_marker
        unlinked = persons[~persons["id"].isin(links.index)]
        wanted = []
        push_ids = {int(i) for i in push_ids}
        for _, p in unlinked.iterrows():
            pid = int(p["id"])
            if pid in push_ids:
                kind = push_as
            elif _flag(p.get(marker.field)):
                kind = str(p.get(marker.as_field) or "").strip().lower() if marker.as_field else ""
                kind = kind if kind in ENTITY_TYPES else marker.default_type
            else:
                continue
            if kind not in self.config.entities:
                self._note("error", person_id=pid, detail=f"cannot sync as {kind!r}: that entity type is not configured")
                continue
            email = p.get("email")
            if email is None or pd.isna(email) or not str(email).strip():
                self._note("skip", person_id=pid, detail="marked for sync but has no email; cannot look up or create a Dynamics record")
                continue
            wanted.append((pid, kind, str(email).strip(), p))
        if not wanted:
            return []
        taken_records = set(zip(links["dynamics_type"], links["dynamics_id"].str.lower()))
        found = {e: self._dynamics_by_email(e, [w[2] for w in wanted]) for e in ("contact", "lead") if e in self.config.entities}
        out, create = [], []
        for pid, kind, email, p in wanted:
            linked = False
            for entity in ("contact", "lead"):  # DESIGN §3: contact first, then lead
                if entity not in found:
                    continue
                hits = found[entity].get(email.lower(), [])
                hits = [h for h in hits if (entity, h.lower()) not in taken_records]
                if len(hits) > 1:
                    self._note("ambiguous", person_id=pid, email=email, entity=entity,
                               detail=f"{len(hits)} Dynamics {entity}s have this email; none is linked")
                    linked = True
                    break
                if len(hits) == 1:
                    taken_records.add((entity, hits[0].lower()))
                    out.append({"person_id": pid, "dynamics_type": entity, "dynamics_id": hits[0], "method": "email"})
                    linked = True
                    break
            if not linked:
                create.append((pid, kind, email, p))
        out += self._create_records(create)
        return out

    def _query_in(self, entity: str, columns: list[str], column: str, values: list[str]) -> pd.DataFrame:
        """Dataverse rows of ``entity`` whose ``column`` is one of ``values`` (escaped, in URL-sized chunks)."""
        from mdsync.dynamics import isin

        entity_set = self.config.entity(entity).entity_set
        parts = [self.dynamics.query(entity_set, columns, filter=isin(column, values[i : i + VALUES_PER_QUERY]))
                 for i in range(0, len(values), VALUES_PER_QUERY)]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)

    def _dynamics_by_email(self, entity: str, emails: list[str]) -> dict[str, list[str]]:
        ent = self.config.entity(entity)
        col = ent.email_field.dynamics
        rows = self._query_in(entity, [ent.id_column, col], col, sorted({e.lower() for e in emails}))
        hits: dict[str, list[str]] = {}
        for did, addr in rows[[ent.id_column, col]].itertuples(index=False):
            if addr is not None and not pd.isna(addr):
                hits.setdefault(str(addr).lower(), []).append(str(did))
        return hits

    def _create_records(self, create: list) -> list[dict]:
        out = []
        for entity in ENTITY_TYPES:
            batch = [c for c in create if c[1] == entity]
            if not batch:
                continue
            ent = self.config.entity(entity)
            acc = self.access.entities[entity]
            allowed = set(acc.dynamics_create) & set(acc.marketo_read)
            fields = [f for f in ent.fields if f.flows_to_dynamics and f.name in allowed]
            raw = pd.DataFrame([c[3] for c in batch])
            canon, _ = canonical_frame(raw, fields, Side.MARKETO)
            rows = []
            for i, (pid, _, email, _) in enumerate(batch):
                row = {f.dynamics: to_dynamics(canon[f.name].iloc[[i]], f).iloc[0] for f in fields if f.name in canon}
                row = {k: v for k, v in row.items() if v is not None}
                row[self.d_link_column] = str(pid)
                rows.append(row)
            if self.dry_run:
                for pid, _, email, _ in batch:
                    self._note("create", person_id=pid, email=email, entity=entity, detail=f"would create a {entity} in Dynamics [dry run]")
                continue
            results = self.dynamics.upsert_multiple(ent.entity_set, rows, key=self.d_link_column)
            for (pid, _, email, _), res in zip(batch, results.to_dict("records")):
                if res["ok"] and res.get("id"):
                    self._note("create", person_id=pid, email=email, entity=entity, dynamics_id=res["id"],
                               detail=f"marked for sync: created the {entity} in Dynamics")
                    out.append({"person_id": pid, "dynamics_type": entity, "dynamics_id": str(res["id"]), "method": "created_in_dynamics"})
                else:
                    msg = f"Dynamics refused to create the {entity}: {res.get('error_code') or ''} {res.get('error_message')}".strip()
                    self._note("error", person_id=pid, email=email, entity=entity, detail=msg + "; retried next cycle")
                    self.errors.append({"person_id": pid, "dynamics_type": entity, "dynamics_id": None, "target": "dynamics",
                                        "field": None, "value": None, "code": res.get("error_code"), "message": msg})
        return out

    def _drop_dangling(self, links: pd.DataFrame, new_links: list[dict], persons: pd.DataFrame,
                       records: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, list[dict]]:
        """New links whose record could not be read on one side (a stale link field) are not made."""
        have_persons = _present(persons, "id")
        keep = []
        for link in new_links:
            entity = link["dynamics_type"]
            have = _present(records.get(entity), self._id_column(entity), lower=True)
            if link["person_id"] in have_persons and link["dynamics_id"].lower() in have:
                keep.append(link)
                continue
            missing = "Marketo person" if link["person_id"] not in have_persons else f"Dynamics {entity}"
            self._note("skip", person_id=link["person_id"], entity=entity, dynamics_id=link["dynamics_id"],
                       detail=f"link field ({link['method'].replace('_', ' ')}) names a {missing} that does not exist; "
                              "not linked")
            links = links.drop(index=link["person_id"])
        return links, keep

    def _complete_new_pairs(self, links: pd.DataFrame, persons: pd.DataFrame, records: dict[str, pd.DataFrame]):
        """Read both records of every new link, so the first diff compares real values on both sides."""
        new = links[links["new"]]
        if new.empty:
            return persons, records
        have = set(persons["id"].astype("int64")) if not persons.empty else set()
        missing = sorted(set(new.index) - have)
        if missing:
            fetched = self.marketo.get_leads("id", missing, self.fields)
            persons = pd.concat([persons, fetched], ignore_index=True) if not persons.empty else fetched
        for entity in self.config.entities:
            ent = self.config.entity(entity)
            ids = new.loc[new["dynamics_type"] == entity, "dynamics_id"]
            rows = records.get(entity, pd.DataFrame())
            have = set(rows[ent.id_column].astype(str).str.lower()) if not rows.empty else set()
            want = sorted({i for i in ids if i.lower() not in have})
            if not want:
                continue
            columns = dynamics_columns(self.config, ent, self.access.entities[entity])
            fetched = self._query_in(entity, columns, ent.id_column, want)
            records[entity] = pd.concat([rows, fetched], ignore_index=True) if not rows.empty else fetched
        return persons, records


def _unlinked_mask(rows: pd.DataFrame, id_column: str, entity: str, links: pd.DataFrame, negate: bool = False) -> np.ndarray:
    """Rows whose Dynamics id has no link of this entity type (``negate``: rows that have one)."""
    linked = links.loc[links["dynamics_type"] == entity, "dynamics_id"].str.lower()
    has = rows[id_column].astype(str).str.lower().isin(linked).to_numpy()
    return has if negate else ~has


def _present(frame: pd.DataFrame, column: str, lower: bool = False) -> set:
    if frame is None or frame.empty or column not in frame:
        return set()
    values = frame[column].dropna()
    return set(values.astype(str).str.lower()) if lower else set(values.astype("int64"))


def _add(links: pd.DataFrame, new: list[dict]) -> pd.DataFrame:
    if not new:
        return links
    frame = pd.DataFrame(new).set_index("person_id").assign(new=True)
    return pd.concat([links[~links.index.isin(frame.index)], frame[["dynamics_type", "dynamics_id", "method", "new"]]])


def link_field_writes(config: SyncConfig, links: pd.DataFrame, persons: pd.DataFrame,
                      records: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Link fields that do not yet name the partner record, on both sides (DESIGN §3).

    :returns: (Marketo writes: person_id, dynamics_id, dynamics_type; per entity type Dynamics writes:
        dynamics_id, person_id).
    """
    link = config.marketo.link_fields
    m_writes = pd.DataFrame(columns=["person_id", "dynamics_id", "dynamics_type"])
    if not persons.empty:
        p = persons.set_index(persons["id"].astype("int64"))
        on = links.index.intersection(p.index)
        current_id = p.loc[on, link.dynamics_id].astype(object) if link.dynamics_id in p else pd.Series(None, index=on)
        current_type = p.loc[on, link.dynamics_type].astype(object) if link.dynamics_type in p else pd.Series(None, index=on)
        want_id, want_type = links.loc[on, "dynamics_id"], links.loc[on, "dynamics_type"]
        stale = (current_id.fillna("").astype(str).str.lower() != want_id.str.lower()) | (
            current_type.fillna("").astype(str) != want_type)
        stale_ids = on[np.asarray(stale, dtype=bool)]
        m_writes = pd.DataFrame({"person_id": stale_ids, "dynamics_id": want_id.loc[stale_ids].to_numpy(),
                                 "dynamics_type": want_type.loc[stale_ids].to_numpy()})
    d_writes = {}
    column = config.dynamics.marketo_id_column
    for entity, rows in records.items():
        idc = config.entity(entity).id_column
        mine = links[links["dynamics_type"] == entity]
        by_record = pd.Series(mine.index.astype(str), index=mine["dynamics_id"].str.lower())
        if rows.empty:
            d_writes[entity] = pd.DataFrame(columns=["dynamics_id", "person_id"])
            continue
        keys = rows[idc].astype(str).str.lower()
        want = by_record.reindex(keys.to_numpy())
        have = rows[column].astype(object).fillna("").astype(str) if column in rows else pd.Series("", index=rows.index)
        stale = want.notna().to_numpy() & (have.to_numpy() != want.fillna("").to_numpy())
        d_writes[entity] = pd.DataFrame({"dynamics_id": rows.loc[stale, idc].astype(str).to_numpy(),
                                         "person_id": want[stale].astype("int64").to_numpy()})
    return m_writes, d_writes
