"""The console's HTML pages, rendered on the server from the same functions as the JSON API (:mod:`.api`)."""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from mdsync_airflow.console import charts
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
