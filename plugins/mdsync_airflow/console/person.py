"""One person's story for the console: who the search names, both sides' current values side by side (a live
read through the hooks), the link, and the timeline of every decision across runs (paged, newest first)."""

from __future__ import annotations

import logging

import pandas as pd
import sqlalchemy as sa

from mdsync_airflow.console import sources

log = logging.getLogger(__name__)

#: the most timeline rows a page shows
MAX_PAGE_SIZE = 500
TIMELINE_COLUMNS = ["id", "at", "run_id", "action", "entity_type", "person_id", "email", "dynamics_type",
                    "dynamics_id", "field", "old_value", "new_value", "winner", "detail"]
#: which task of a run logged a decision (its task log has the line): identity, plan, or the load and commit
_TASK_OF = {"link": "identify", "unlink": "identify", "ambiguous": "identify", "merge": "identify",
            "flag": "identify", "delete": "identify", "collision": "plan_{entity}", "skip": "plan_{entity}",
            "undo_skipped": "plan_{entity}", "create": "load_dynamics", "update": "commit", "consent": "commit",
            "error": "commit", "undo": "commit"}


def task_of(action: str, entity: str | None) -> str:
    """The task whose log holds a decision's line."""
    return _TASK_OF.get(action, "report").format(entity=entity or "lead")


def live_clients() -> tuple[object | None, object | None, list[str]]:
    """Both services' clients for a live read, and what stopped one from being built (shown on the page)."""
    problems, clients = [], []
    for name, build in (("Marketo", sources.marketo_client), ("Dynamics", sources.dynamics_client)):
        try:
            clients.append(build())
        except Exception as exc:  # no connection, bad connection: the page says so and shows the stored story
            log.warning("console: no live %s read: %s", name, exc)
            problems.append(f"{name}: {exc}")
            clients.append(None)
    return clients[0], clients[1], problems


def search(query: str) -> list[dict]:
    """The pairs a search names (an email, a Marketo person id, a Dynamics id)."""
    from mdsync.explain import find_subject

    return [s.dump() for s in find_subject(sources.store(), query)]


def timeline(person_id: int | None, dynamics_id: str | None, page: int = 1, page_size: int = 100) -> dict:
    """Every decision about the person or the Dynamics record, newest first, paged (by the indexed person and
    Dynamics id columns)."""
    from mdsync.state import schema

    t = schema.activity
    page, page_size = max(page, 1), min(max(page_size, 1), MAX_PAGE_SIZE)
    keys = ([t.c.person_id == int(person_id)] if person_id is not None else []) + \
           ([t.c.dynamics_id == dynamics_id] if dynamics_id else [])
    if not keys:
        return {"total": 0, "page": page, "page_size": page_size, "rows": []}
    where = sa.or_(*keys)
    with sources.store().engine.connect() as c:
        total = c.execute(sa.select(sa.func.count()).select_from(t).where(where)).scalar() or 0
        rows = c.execute(sa.select(*[t.c[k] for k in TIMELINE_COLUMNS]).where(where).order_by(t.c.id.desc())
                         .limit(page_size).offset((page - 1) * page_size)).all()
    frame = pd.DataFrame(rows, columns=TIMELINE_COLUMNS).astype(object)
    frame["at"] = frame["at"].map(lambda v: None if v is None else pd.Timestamp(v).isoformat())
    out = frame.where(frame.notna(), None).to_dict("records")
    for row in out:
        row["task_id"] = task_of(row["action"], row["entity_type"])
    return {"total": int(total), "page": page, "page_size": page_size, "rows": out}


def story(query: str, *, live: bool = True, page: int = 1, page_size: int = 100, pick: int = 0) -> dict:
    """A person's page: the matches of ``query``; for the chosen one (``pick``) both sides' values (live) and the
    timeline."""
    from mdsync.explain import side_by_side

    matches = search(query)
    out = {"query": query, "matches": matches, "subject": None, "values": None, "timeline": None, "live": live,
           "live_problems": []}
    if not matches:
        return out
    subject = matches[min(max(pick, 0), len(matches) - 1)]
    out["subject"] = subject
    if live:
        marketo, dynamics, problems = live_clients()
        out["live_problems"] = problems
        if marketo is not None and dynamics is not None:
            try:
                out["values"] = side_by_side(sources.config(), marketo, dynamics, sources.store(),
                                             person_id=subject["person_id"], dynamics_type=subject["dynamics_type"],
                                             dynamics_id=subject["dynamics_id"]).dump()
            except Exception as exc:  # a service down: the stored story still shows
                log.warning("console: live read of %s failed: %s", subject, exc)
                out["live_problems"].append(f"live read failed: {exc}")
    out["timeline"] = timeline(subject["person_id"], subject["dynamics_id"], page, page_size)
    return out


def explain(query: str, field: str | None = None, *, live: bool = True, pick: int = 0) -> dict:
    """ "Why didn't this sync?" for what ``query`` names (and one field, if given)."""
    from mdsync.explain import HeldRun, why

    matches = search(query)
    marketo = dynamics = None
    problems: list[str] = []
    if live:
        marketo, dynamics, problems = live_clients()
    held = [HeldRun(run_id=m["run_id"], outcome="awaiting_approval") for m in sources.waiting_tasks()["mass_change"]]
    text = query.strip()
    if len(matches) == 1 or (matches and pick):
        s = matches[min(max(pick, 0), len(matches) - 1)]
        kwargs = {"person_id": s["person_id"], "dynamics_type": s["dynamics_type"], "dynamics_id": s["dynamics_id"]}
    elif "@" in text:  # several pairs (why() lists them to choose from) or none the store knows (read live)
        kwargs = {"email": text}
    else:  # an id the store does not know: read it live
        kwargs = {"person_id": int(text)} if text.isdigit() else {"dynamics_id": text}
    answer = why(sources.config(), sources.store(), sources.settings(), marketo_client=marketo,
                 dynamics_client=dynamics, field=field or None, guard_held_runs=held,
                 staging_root=sources.staging_root(), **kwargs)
    return {"query": query, "field": field, "matches": matches, "live": live, "live_problems": problems,
            **answer.dump()}
