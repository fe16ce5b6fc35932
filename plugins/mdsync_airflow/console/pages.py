"""The console's HTML pages, rendered on the server from the same functions as the JSON API (:mod:`.api`)."""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from mdsync_airflow.console import charts, sources
from mdsync_airflow.console import health as health_data
from mdsync_airflow.console.app import HERE, PREFIX
from mdsync_airflow.console.auth import can_read
from mdsync_airflow.run_once import DAG_ID

router = APIRouter()

#: the console's pages, in the order of its tabs
TABS = [("health", "Health", "/"), ("person", "A person", "/person"), ("collisions", "Collisions", "/collisions"),
        ("errors", "Errors", "/errors"), ("why", "Why didn't it sync?", "/why"), ("runs", "Runs", "/runs")]


@lru_cache(maxsize=1)
def _env():
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    env.filters["n"] = lambda v: "–" if v is None else f"{int(v):,}"
    env.filters["when"] = lambda v: "–" if not v else str(v)[:19].replace("T", " ")
    return env


class Links:
    """URLs of the request's deployment: the console's own pages and Airflow's run and task pages."""

    def __init__(self, request: Request) -> None:
        self.root = request.scope.get("root_path", "").rstrip("/")  # ".../mdsync", behind any prefix
        self.airflow = self.root[: -len(PREFIX)] if self.root.endswith(PREFIX) else ""

    def page(self, path: str, **query) -> str:
        q = "&".join(f"{k}={quote(str(v))}" for k, v in query.items() if v not in (None, ""))
        return f"{self.root}{path}" + (f"?{q}" if q else "")

    def run(self, run_id: str) -> str:
        """Airflow's page of a run of the sync DAG."""
        return f"{self.airflow}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}"

    def task(self, run_id: str, task_id: str) -> str:
        """Airflow's page (and log) of a task of a run."""
        return f"{self.run(run_id)}/tasks/{quote(task_id, safe='')}"

    def static(self, name: str) -> str:
        return f"{self.root}/static/{name}"


def render(request: Request, template: str, tab: str, **data) -> HTMLResponse:
    """A page of the console (``template`` in ``templates/``), with the tabs and links."""
    html = _env().get_template(template).render(links=Links(request), tabs=TABS, tab=tab, dag_id=DAG_ID, **data)
    return HTMLResponse(html)


def refused(request: Request, status: int, detail: str) -> str:
    """The page for a request without a valid login (401) or without the permission (403): no data."""
    links = Links(request)
    return _env().get_template("refused.html").render(links=links, tabs=TABS, tab=None, status=status, detail=detail,
                                                      login=f"{links.airflow}/auth/login/?next={quote(str(request.url))}")


@router.get("/", response_class=HTMLResponse, dependencies=[can_read])
def health_page(request: Request):
    data = health_data.health()
    labels = {"records": "field values written and records created", "calls_marketo": "Marketo calls",
              "calls_dynamics": "Dataverse calls"}
    day, week = data["series"]["day"], data["series"]["week"]
    charts_html = {
        "records_day": charts.bars(day, ["records"], labels, "Records synced per run, last 24 hours"),
        "calls_day": charts.bars(day, ["calls_marketo", "calls_dynamics"], labels, "API calls per run, last 24 hours"),
        "records_week": charts.bars(week, ["records"], labels, "Records synced per hour, last 7 days"),
        "calls_week": charts.bars(week, ["calls_marketo", "calls_dynamics"], labels, "API calls per hour, last 7 days"),
    }
    return render(request, "health.html", "health", data=data, charts=charts_html)


# -- runs ------------------------------------------------------------------------------------------------

@router.get("/runs", response_class=HTMLResponse, dependencies=[can_read])
def runs_page(request: Request, page: int = 1):
    page = max(page, 1)
    rows = health_data.recent_runs(limit=50, offset=(page - 1) * 50)
    return render(request, "runs.html", "runs", runs=rows, page=page, more=len(rows) == 50)


@router.get("/runs/{run_id}", response_class=HTMLResponse, dependencies=[can_read])
def run_page(request: Request, run_id: str, action: str | None = None, page: int = 1):
    from mdsync_airflow.console import runs as runs_data

    found = runs_data.run(run_id)
    if not found:
        return render(request, "run.html", "runs", run=None, run_id=run_id)
    rows = (runs_data.preview if found["dry_run"] else runs_data.decisions)(run_id, action or None, page, 100)
    return render(request, "run.html", "runs", run=found, run_id=run_id, rows=rows, action=action or "",
                  quoted=quote(run_id, safe=""))


# -- collisions and errors ---------------------------------------------------------------------------------

def _page_size(value: int) -> int:
    from mdsync_airflow.console.collisions import MAX_PAGE_SIZE

    return min(max(value, 1), MAX_PAGE_SIZE)


@router.get("/collisions", response_class=HTMLResponse, dependencies=[can_read])
def collisions_page(request: Request, entity: str | None = None, field: str | None = None, winner: str | None = None,
                    run: str | None = None, since: str | None = None, until: str | None = None, q: str | None = None,
                    page: int = 1, page_size: int = 50):
    from mdsync_airflow.console import collisions as collisions_data

    f = collisions_data.filters_from(entity, field, winner, run, since, until, q)
    data = collisions_data.page(f, max(page, 1), _page_size(page_size))
    return render(request, "collisions.html", "collisions", data=data, filters=f,
                  choices=collisions_data.filter_choices())


@router.get("/errors", response_class=HTMLResponse, dependencies=[can_read])
def errors_page(request: Request, target: str | None = None, field: str | None = None, entity: str | None = None,
                q: str | None = None, page: int = 1, page_size: int = 50):
    from mdsync_airflow.console import errors as errors_data

    f = errors_data.filters_from(target, field, entity, q)
    data = errors_data.page(f, max(page, 1), _page_size(page_size))
    return render(request, "errors.html", "errors", data=data, filters=f, choices=errors_data.filter_choices())


# -- a person, and why it did not sync --------------------------------------------------------------------

@router.get("/person", response_class=HTMLResponse, dependencies=[can_read])
def person_page(request: Request, q: str = "", page: int = 1, pick: int = 0):
    from mdsync_airflow.console import person as person_data

    data, problem = None, None
    if q.strip():
        try:
            data = person_data.story(q.strip(), page=page, pick=pick)
        except ValueError as exc:
            problem = str(exc)
    return render(request, "person.html", "person", q=q, data=data, problem=problem, page=page, pick=pick)


@router.get("/why", response_class=HTMLResponse, dependencies=[can_read])
def why_page(request: Request, q: str = "", field: str = "", pick: int = 0):
    from mdsync_airflow.console import person as person_data

    data, problem = None, None
    if q.strip():
        try:
            data = person_data.explain(q.strip(), field.strip() or None, pick=pick)
        except ValueError as exc:
            problem = str(exc)
    fields = sorted({f.name for e in sources.config().entities.values() for f in e.fields})
    return render(request, "why.html", "why", q=q, field=field, data=data, problem=problem, fields=fields)
