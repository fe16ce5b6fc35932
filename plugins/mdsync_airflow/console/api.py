"""The console's JSON API (``/mdsync/api/...``): the same data as the pages, for scripts and dashboards.

Every route requires an Airflow user who may read the sync DAG's runs (:data:`.auth.can_read`); routes that start
runs require permission to trigger it (:data:`.auth.can_trigger`).
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Body, HTTPException, Query, Request

from mdsync_airflow.console import actions
from mdsync_airflow.console import health as health_data
from mdsync_airflow.console import runs as runs_data
from mdsync_airflow.console.auth import can_read, can_trigger, current_user

router = APIRouter()


@router.get("/health", dependencies=[can_read])
def health() -> dict:
    """Recent runs with counts per side, API calls today against the daily quotas, records synced and calls per
    run (last day) and per hour (last week), what is waiting, and the next run."""
    return health_data.health()


# -- runs ------------------------------------------------------------------------------------------------

def _undo_body(body: dict) -> bool:
    dry = body.get("dry_run", True)
    if not isinstance(dry, bool):
        raise HTTPException(422, f"dry_run must be true or false, got {dry!r}")
    return dry


@router.get("/runs", dependencies=[can_read])
def runs_list(page: int = 1, page_size: int = 50) -> dict:
    """The sync's runs, newest first (Airflow's state, the sync's counts), paged."""
    page, page_size = max(page, 1), min(max(page_size, 1), 200)
    return {"page": page, "page_size": page_size,
            "rows": health_data.recent_runs(limit=page_size, offset=(page - 1) * page_size)}


@router.get("/runs/{run_id}", dependencies=[can_read])
def run_detail(run_id: str) -> dict:
    """One run: Airflow's state and conf, the sync's counts and whole report, and the dry runs that previewed its
    undo."""
    found = runs_data.run(run_id)
    if not found:
        raise HTTPException(404, f"no run {run_id!r} of the sync in Airflow or in the state store")
    return found


@router.get("/runs/{run_id}/decisions", dependencies=[can_read])
def run_decisions(run_id: str, action: str | None = None, page: int = 1, page_size: int = 100) -> dict:
    """What the run recorded (activity rows), in order, paged; ``action`` filters (create, update, collision ...)."""
    return runs_data.decisions(run_id, action or None, page, page_size)


@router.get("/runs/{run_id}/preview", dependencies=[can_read])
def run_preview(run_id: str, action: str | None = None, page: int = 1, page_size: int = 100) -> dict:
    """A dry run's planned lines (its planned writes, creates and collisions), paged."""
    return runs_data.preview(run_id, action or None, page, page_size)


@router.post("/runs/{run_id}/undo", dependencies=[can_trigger])
def run_undo(run_id: str, request: Request, body: dict = Body(default_factory=dict)) -> dict:
    """Start the undo of a run: ``{"dry_run": true}`` (the default) previews it; the undo itself
    (``{"dry_run": false}``) is refused until a preview of it has run."""
    from mdsync_airflow.console.pages import Links

    dry = _undo_body(body)
    if not runs_data.run(run_id):
        raise HTTPException(404, f"no run {run_id!r} of the sync in Airflow or in the state store")
    if not dry and not runs_data.undo_previews(run_id):
        raise HTTPException(409, f"preview the undo of {run_id} first (a dry run shows what it would restore); "
                                 "then start the undo from the preview's page")
    links = Links(request)
    note = f"{'Preview of the undo' if dry else 'Undo'} of run {run_id}, started from the sync console"
    conf = {"undo_run": run_id, "dry_run": dry}
    started = actions.trigger_run(request, links.airflow, conf, note)
    new_id = started.get("dag_run_id")
    return {"run_id": new_id, "run_url": links.page(f"/runs/{quote(new_id, safe='')}"), "conf": conf,
            "message": ("When it has finished, its page shows what the undo would restore."
                        if dry else "It restores the values; its page shows what it did.") + actions.paused_note()}


# -- collisions and errors ---------------------------------------------------------------------------------

def _csv(lines, name: str):
    """A CSV download streamed in chunks (every matching row, however many)."""
    from fastapi.responses import StreamingResponse

    return StreamingResponse(lines, media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.get("/collisions", dependencies=[can_read])
def collisions(entity: str | None = None, field: str | None = None, winner: str | None = None, run: str | None = None,
               since: str | None = None, until: str | None = None, q: str | None = None,
               page: int = Query(1, ge=1), page_size: int = Query(50, ge=1, le=500)) -> dict:
    """Collisions (both sides changed the same field), newest first, paged: time, entity, person, Dynamics record,
    field, the Marketo and Dynamics values, the last synced value, the winner and the run. Filters: ``entity``,
    ``field``, ``winner`` (marketo, dynamics), ``run``, ``since`` / ``until`` (YYYY-MM-DD, UTC, inclusive) and
    ``q`` (person id, Dynamics id or part of an email)."""
    from mdsync_airflow.console import collisions as collisions_data

    f = collisions_data.filters_from(entity, field, winner, run, since, until, q)
    return collisions_data.page(f, page, page_size)


@router.get("/collisions.csv", dependencies=[can_read])
def collisions_csv(entity: str | None = None, field: str | None = None, winner: str | None = None,
                   run: str | None = None, since: str | None = None, until: str | None = None, q: str | None = None):
    """Every matching collision as CSV (the same filters as ``/collisions``), newest first."""
    from mdsync_airflow.console import collisions as collisions_data

    f = collisions_data.filters_from(entity, field, winner, run, since, until, q)
    return _csv(collisions_data.csv_rows(f), "mdsync-collisions.csv")


@router.get("/errors", dependencies=[can_read])
def errors(target: str | None = None, field: str | None = None, entity: str | None = None, q: str | None = None,
           page: int = Query(1, ge=1), page_size: int = Query(50, ge=1, le=500)) -> dict:
    """Open rejections, newest first, paged: the record (person, Dynamics type and id), the side that refused
    (``target``), field, value, the service's message and code, first and last seen, attempts and the run.
    Filters: ``target`` (dynamics, marketo), ``field``, ``entity`` (Dynamics type), ``q`` (person id, record id
    or text of the value, message or code)."""
    from mdsync_airflow.console import errors as errors_data

    return errors_data.page(errors_data.filters_from(target, field, entity, q), page, page_size)


@router.get("/errors.csv", dependencies=[can_read])
def errors_csv(target: str | None = None, field: str | None = None, entity: str | None = None, q: str | None = None):
    """Every matching open error as CSV (the same filters as ``/errors``), newest first."""
    from mdsync_airflow.console import errors as errors_data

    return _csv(errors_data.csv_rows(errors_data.filters_from(target, field, entity, q)), "mdsync-errors.csv")


@router.post("/errors/retry", dependencies=[can_trigger])
def errors_retry(request: Request, body: dict = Body(default_factory=dict), user=current_user) -> dict:
    """*Retry selected*: ``{"person_ids": [...]}`` (each with an open error) starts a run with ``retry_failed``
    for those persons through Airflow's REST API, as the caller. 422 names ids that are not persons with an open
    error."""
    from mdsync_airflow.console import errors as errors_data
    from mdsync_airflow.console.pages import Links

    person_ids = errors_data.retry_person_ids(body)
    links = Links(request)
    conf = {"retry_failed": True, "person_ids": person_ids}
    who = user.get_name() if user is not None else "someone"
    note = (f"Retry of the rejected values of {len(person_ids)} person{'s' if len(person_ids) > 1 else ''}, "
            f"started from the sync console by {who}")
    started = actions.trigger_run(request, links.airflow, conf, note)
    run_id = started.get("dag_run_id")
    return {"run_id": run_id, "run_url": links.run(run_id), "conf": conf,
            "message": f"It re-sends the rejected values of person{'s' if len(person_ids) > 1 else ''} "
                       f"{', '.join(map(str, person_ids))}; values still refused stay on this page."
                       + actions.paused_note()}


# -- a person, and why it did not sync --------------------------------------------------------------------

def _query(q: str) -> str:
    if not (q or "").strip():
        raise HTTPException(422, "give an email, a Marketo person id (digits) or a Dynamics id (GUID) as q")
    return q.strip()


@router.get("/person", dependencies=[can_read])
def person(q: str = "", live: bool = True, page: int = 1, page_size: int = 100, pick: int = 0) -> dict:
    """A person by email, Marketo id or Dynamics id: the matching pairs; for the first (or ``pick``) both sides'
    current values side by side with differences marked (a live read; ``live=false`` skips it), the link, and the
    timeline of every decision (paged, newest first; each row names the task whose log has its line)."""
    from mdsync_airflow.console import person as person_data

    try:
        return person_data.story(_query(q), live=live, page=page, page_size=page_size, pick=pick)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


@router.get("/why", dependencies=[can_read])
def why(q: str = "", field: str | None = None, live: bool = True, pick: int = 0) -> dict:
    """Why didn't this sync? Every reason that applies to the person or Dynamics record ``q`` names (and ``field``),
    each with what to do about it; computed from the state store, the config and a live read."""
    from mdsync_airflow.console import person as person_data

    try:
        return person_data.explain(_query(q), field, live=live, pick=pick)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
