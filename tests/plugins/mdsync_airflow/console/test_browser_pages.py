"""The operator console's pages in a real browser (headless Chromium) after real cycles of the DAG.

A module-scoped set-up runs the DAG in this process with ``dag.test()`` (as ``make sync`` does without a
scheduler) against the session's two sandboxes, writing to the state store of the real ``airflow api-server``
(``airflow_api_server.state_url``) and to the metadata database this process shares with it. So the runs are
Airflow's own runs, and the console the server serves shows their decisions:

- ``cycle 1`` links Lena (a lead) and Ann (a contact) by email, creates Cat (a Dynamics-only contact) in Marketo
  and Max (marked for sync in Marketo) in Dynamics;
- then both sides change Lena's job title (a lead: Marketo wins) and Cat's city (a contact: Dynamics wins), and
  Cat's Marketo title becomes 'Intern', which a Dataverse business rule refuses;
- ``cycle 2`` records the two collisions and Dynamics' rejection of Cat's title.

Each page is then checked in the browser for that data (auto-waiting locators, no sleeps) and photographed with
:func:`save_screenshot` (to ``docs/screenshots`` only with ``MDSYNC_SCREENSHOTS=1``).
"""

from __future__ import annotations

import csv
import io
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest
from playwright.sync_api import expect

from tests.fixtures.airflow_server import DAG_ID, REPO, save_screenshot
from tests.fixtures.sync_env import SyncWorld

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: what the Dataverse business rule answers when a contact's job title is 'Intern'
RULE = "Interns are not synced to Dynamics (business rule)."
#: the longest a page (or an action on it) may take to show what is checked, under a loaded machine
SHOWN_MS = 20_000


@dataclass
class Cycles:
    """What the set-up made: the server, the two runs (Airflow run ids) and the people's ids (``seed_people``'s,
    and ``cat_pid``: the person the first cycle created in Marketo)."""

    server: object
    first: str
    second: str
    ids: dict

    def page_url(self, path: str) -> str:
        """The absolute URL of a console page, e.g. ``/errors``."""
        return self.server.url(f"/mdsync{path}")


def _load_dag():
    """The sync DAG parsed from the repository's DAG folder, as ``make sync`` loads it."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag(DAG_ID)


def _cycle(dag, conf: dict) -> str:
    """One run of the DAG in this process (``dag.test()``); its run id once it succeeded."""
    from mdsync_airflow.run_once import run_in_process

    outcome = run_in_process(conf, dag=dag)
    assert outcome.state == "success", f"run {outcome.run_id} ended {outcome.state} {outcome.line}"
    return outcome.run_id


@pytest.fixture(scope="module")
def cycles(airflow_api_server, marketo_sandbox, dataverse_sandbox, tmp_path_factory):
    """Two real cycles of the DAG whose runs the server's Airflow and console both know (see the module doc)."""
    server = airflow_api_server
    mp = pytest.MonkeyPatch()
    marketo_sandbox.reset()
    dataverse_sandbox.reset()
    tmp = tmp_path_factory.mktemp("browser-pages")
    mp.setenv("AIRFLOW_CONN_MARKETO_DEFAULT", marketo_sandbox.connection_json())
    mp.setenv("AIRFLOW_CONN_DYNAMICS_DEFAULT", dataverse_sandbox.connection_json())
    # the server's own store and staging: its environment was fixed when it started
    mp.setenv("MDSYNC_STATE_URL", server.state_url)
    mp.setenv("MDSYNC_STAGING_URL", server.staging_url)
    mp.setenv("MDSYNC_OVERLAP_SECONDS", "2")  # our own writes come back within the overlap, not later
    mp.setenv("MDSYNC_BULK_POLL_SECONDS", "0.1")  # bulk jobs in the sandbox finish in moments
    mp.setenv("MDSYNC_TASK_RETRIES", "0")  # a failing task fails the set-up at once, with its error
    mp.delenv("MDSYNC_CONFIG", raising=False)
    server.empty_state_store()  # only this module's cycles (an earlier module may have recorded errors there)
    try:
        world = SyncWorld(marketo_sandbox, dataverse_sandbox, tmp)
        started = time.monotonic()
        dag = _load_dag()
        ids = world.seed_people()
        first = _cycle(dag, {})
        first_s = time.monotonic() - started

        cat = world.person("cat@example.com", fields=("id", "title", "city", "dynamicsRecordId"))
        assert cat["dynamicsRecordId"] == ids["cat"], cat  # created in Marketo from the Dynamics-only contact
        ids["cat_pid"] = int(cat["id"])
        dataverse_sandbox.admin("PUT", "rules", [{"entity": "contact", "column": "jobtitle", "op": "forbid",
                                                  "values": ["Intern"], "message": RULE}])
        # a collision per entity: both sides change the same field of a linked pair between two runs
        world.update_person(ids["lena_pid"], title="VP Marketing")
        world.update_record("leads", ids["lead"], jobtitle="Head of Engineering")
        world.update_person(ids["cat_pid"], city="Madrid", title="Intern")
        world.update_record("contacts", ids["cat"], address1_city="Sevilla")
        started = time.monotonic()
        second = _cycle(dag, {})
        # shown with -s: the first includes parsing the DAG and dag.test()'s first start in this process
        print(f"\nconsole pages set-up: cycle 1 {first_s:.1f} s, cycle 2 {time.monotonic() - started:.1f} s")
        yield Cycles(server, first, second, ids)
    finally:
        dataverse_sandbox.admin("PUT", "rules", [])
        mp.undo()


@pytest.fixture(autouse=True, scope="module")
def _patient_expect():
    """Auto-waiting assertions wait up to :data:`SHOWN_MS` (Playwright's 5 s is short on two busy cores)."""
    expect.set_options(timeout=SHOWN_MS)
    yield
    expect.set_options(timeout=5_000)


#: a cell whose text the test does not pin down (a time, a GUID)
ANY = re.compile(r".*", re.S)


def _stored_run(cycles: Cycles, run_id: str) -> dict:
    """The run's row in the server's state store (what its report task recorded)."""
    from mdsync.state import open_store

    found = open_store(cycles.server.state_url).runs(run_ids=[run_id], limit=1)
    assert len(found) == 1, f"run {run_id} is not in the server's state store"
    return found.iloc[0].to_dict()


def _airflow_run_path(run_id: str) -> str:
    """The path of Airflow's own page of a run of the sync DAG."""
    return f"/dags/{DAG_ID}/runs/{quote(run_id, safe='')}"


def _airflow_run(cycles: Cycles, run_id: str) -> dict:
    """A run of the sync DAG from Airflow's REST API."""
    r = cycles.server.api("admin", f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}")
    assert r.status_code == 200, f"GET dagRuns/{run_id}: {r.status_code} {r.text[:300]}"
    return r.json()


def _run_count(cycles: Cycles) -> int:
    r = cycles.server.api("admin", f"/api/v2/dags/{DAG_ID}/dagRuns", params={"limit": 1})
    assert r.status_code == 200, r.text
    return r.json()["total_entries"]


def _on_path(path: str):
    """``wait_for_url`` predicate: the page is at ``path`` (compared unquoted)."""
    return lambda url: unquote(urlsplit(url).path) == path


def _search(page, query: str, button: str) -> None:
    """Type ``query`` into the page's search field and submit it, as a user would."""
    page.get_by_label("Email, Marketo person id or Dynamics id").fill(query)
    page.get_by_role("button", name=button, exact=True).click()


# -- health ----------------------------------------------------------------------------------------------

def test_health_shows_the_runs_with_their_counts_the_calls_today_and_the_charts(cycles, browser_page):
    first, second = _stored_run(cycles, cycles.first), _stored_run(cycles, cycles.second)
    page = browser_page("viewer")
    page.goto(cycles.page_url("/"))
    rows = page.locator("#runs-table tbody tr")

    def cells(run_id: str):
        return rows.filter(has=page.get_by_role("link", name=run_id, exact=True)).locator("td")

    # Run, State, Type, Finished, Created D / M, Written D / M, Linked, Collisions, Errors D / M, Held, Calls M / D.
    # The first cycle links Lena, Ann, Cat and Max and creates Max in Dynamics and Cat in Marketo.
    expect(cells(cycles.first)).to_have_text([
        cycles.first, "success", "manual", ANY, "1 / 1", f"{first['written_dynamics']} / {first['written_marketo']}",
        "4", "0", "0 / 0", "0", f"{first['calls_marketo']} / {first['calls_dynamics']}"])
    # the second: Lena's title to Dynamics, Cat's city to Marketo, two collisions, Cat's title refused
    expect(cells(cycles.second)).to_have_text([
        cycles.second, "success", "manual", ANY, "0 / 0", "1 / 1", "0", "2", "1 / 0", "0",
        f"{second['calls_marketo']} / {second['calls_dynamics']}"])

    # calls today: Marketo's own usage endpoint, read live through the server's marketo_default connection
    marketo = page.locator("#calls-marketo")
    expect(marketo.locator("h3")).to_have_text("Marketo API calls today")
    expect(marketo.locator("p.big")).to_contain_text("of 50,000")
    expect(marketo).to_contain_text("Marketo usage endpoint (all integrations)")
    dataverse = page.locator("#calls-dynamics")
    expect(dataverse.locator("p.big")).to_have_text(
        f"{first['calls_dynamics'] + second['calls_dynamics']} of 40,000 (0.1 %)")
    expect(page.locator("#waiting")).to_contain_text("1 open error")

    # the four inline SVG charts; the last day's have a bar per run (and per service)
    expect(page.locator("section.charts svg.chart")).to_have_count(4)
    records = page.get_by_role("img", name="Records synced per run, last 24 hours").locator("rect > title")
    expect(records).to_have_count(2)
    expect(records.last).to_contain_text(f"run {cycles.second}")
    calls = page.get_by_role("img", name="API calls per run, last 24 hours").locator("rect > title")
    expect(calls).to_have_count(4)
    expect(calls.first).to_contain_text(f"Marketo calls: {first['calls_marketo']} · run {cycles.first}")
    assert save_screenshot(page, "health").stat().st_size > 0


# -- a run -----------------------------------------------------------------------------------------------

def test_a_runs_page_opened_from_health_shows_its_counts_and_decisions(cycles, browser_page):
    page = browser_page("viewer")
    page.goto(cycles.page_url("/"))
    page.locator("#runs-table").get_by_role("link", name=cycles.second, exact=True).click()
    page.wait_for_url(_on_path(f"/mdsync/runs/{cycles.second}"))
    expect(page.locator("main h2").first).to_have_text(f"Run {cycles.second}")
    counts = page.locator("#run-counts")
    expect(counts).to_contain_text("collisions 2")
    expect(counts).to_contain_text("errors Dynamics 1, Marketo 0")
    # Action, Entity, Person, Dynamics record, Field, From, To, Winner, Detail
    table = page.locator("#decisions-table")
    expect(table.locator("tr.action-collision")).to_have_count(2)
    expect(table.locator("tr.action-collision").filter(has_text="job_title").locator("td")).to_have_text(
        ["collision", "lead", ANY, ANY, "job_title", "Head of Engineering", "VP Marketing", "marketo", ANY])
    expect(table.locator("tr.action-collision").filter(has_text="city").locator("td")).to_have_text(
        ["collision", "contact", ANY, ANY, "city", "Madrid", "Sevilla", "dynamics", ANY])
    error = table.locator("tr.action-error")
    expect(error.locator("td")).to_have_text(
        ["error", "contact", re.compile(rf"^{cycles.ids['cat_pid']}\b.*cat@example\.com"), ANY, "job_title", "VP",
         "Intern", "", ANY])
    expect(error).to_contain_text(RULE)
    # Airflow's own page of the run is a link away
    state = page.get_by_role("link", name="success", exact=True)
    assert urlsplit(state.get_attribute("href")).path == _airflow_run_path(cycles.second)
    assert save_screenshot(page, "run").stat().st_size > 0


# -- collisions ------------------------------------------------------------------------------------------

def test_collisions_shows_both_values_and_the_winner_a_filter_narrows_them_and_the_csv_has_the_row(
        cycles, browser_page):
    page = browser_page("viewer")
    page.goto(cycles.page_url("/collisions"))
    rows = page.locator("#collisions-table tbody tr")
    expect(rows).to_have_count(2)
    # Time, Entity, Person, Dynamics record, Field, Marketo value, Dynamics value, Last synced, Winner, Run
    cat = rows.filter(has_text="cat@example.com")
    expect(cat.locator("td")).to_have_text(
        [ANY, "contact", ANY, re.compile(rf"contact\s+{cycles.ids['cat']}", re.I), "city", "Madrid", "Sevilla",
         "(empty)", "dynamics", cycles.second])
    expect(cat.locator("td.won")).to_have_text("Sevilla")  # the winning value is marked
    lena = rows.filter(has_text="job_title")
    expect(lena.locator("td")).to_have_text(
        [ANY, "lead", ANY, ANY, "job_title", "VP Marketing", "Head of Engineering", "Engineer", "marketo",
         cycles.second])
    expect(lena.locator("td.won")).to_have_text("VP Marketing")
    assert save_screenshot(page, "collisions").stat().st_size > 0

    page.get_by_role("combobox", name="Entity").select_option("contact")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url("**/collisions?*entity=contact*")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("cat@example.com")
    expect(page.locator("#collision-count")).to_have_text("1 collision matching, newest first.")

    with page.expect_download() as download:
        page.locator("#csv-link").click()
    assert download.value.suggested_filename == "mdsync-collisions.csv"
    exported = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text(encoding="utf-8"))))
    assert [{k: row[k] for k in ("entity", "person_id", "email", "field", "marketo_value", "dynamics_value",
                                 "winner", "run_id")} for row in exported] == [
        {"entity": "contact", "person_id": str(cycles.ids["cat_pid"]), "email": "cat@example.com", "field": "city",
         "marketo_value": "Madrid", "dynamics_value": "Sevilla", "winner": "dynamics", "run_id": cycles.second}]


# -- errors ----------------------------------------------------------------------------------------------

def _the_rejection(page, cycles: Cycles):
    """The errors page's row of Cat's refused job title, checked: the value, the service's message, the run."""
    page.goto(cycles.page_url("/errors"))
    rows = page.locator("#errors-table tbody tr")
    expect(rows).to_have_count(1)
    row = rows.first
    # (select), Person, Dynamics record, Rejected by, Field, Value, Message, Since, Last seen, Attempts, Run
    expect(row.locator("td")).to_have_text(
        ["", str(cycles.ids["cat_pid"]), re.compile(rf"contact\s+{cycles.ids['cat']}", re.I), "dynamics",
         "job_title", "Intern", re.compile(re.escape(RULE)), ANY, ANY, "1", cycles.second])
    expect(row.locator("td.error")).to_contain_text("0x80040265")  # the service's own error code
    return row


def test_errors_shows_the_rejected_value_and_an_admin_retries_it_through_airflow(cycles, browser_page):
    page = browser_page("admin")
    row = _the_rejection(page, cycles)
    row.get_by_role("checkbox", name=f"retry person {cycles.ids['cat_pid']}").check()
    page.get_by_role("button", name="Retry selected").click()
    result = page.locator("#action-result")
    expect(result).to_contain_text("Started run")
    expect(result).to_contain_text(f"re-sends the rejected values of person {cycles.ids['cat_pid']}")
    link = result.get_by_role("link")
    run_id = link.inner_text()
    assert link.get_attribute("href") == _airflow_run_path(run_id)
    run = _airflow_run(cycles, run_id)
    assert run["conf"] == {"retry_failed": True, "person_ids": [cycles.ids["cat_pid"]]}
    assert run["run_type"] == "manual" and "sync console by admin" in (run.get("note") or "")
    assert save_screenshot(page, "errors").stat().st_size > 0


def test_errors_retry_by_a_viewer_is_refused_and_starts_no_run(cycles, browser_page):
    page = browser_page("viewer")
    row = _the_rejection(page, cycles)
    runs_before = _run_count(cycles)
    row.get_by_role("checkbox").check()
    page.get_by_role("button", name="Retry selected").click()
    result = page.locator("#action-result")
    expect(result).to_contain_text("Not started (403)")
    expect(result).to_have_class(re.compile(r"\berror\b"))
    expect(result.get_by_role("link")).to_have_count(0)
    assert _run_count(cycles) == runs_before


# -- a person --------------------------------------------------------------------------------------------

def test_person_found_by_email_shows_both_sides_a_difference_and_the_timeline_with_links_to_runs(
        cycles, browser_page):
    page = browser_page("viewer")
    page.goto(cycles.page_url("/person"))
    _search(page, "cat@example.com", "Find")
    cat_pid = cycles.ids["cat_pid"]
    expect(page.locator("#subject")).to_contain_text(f"Person {cat_pid}")
    expect(page.locator("#subject")).to_contain_text(cycles.ids["cat"])

    # both sides read live: the refused title differs, the city both sides hold since the collision does not
    values = page.locator("#values-table tbody tr")
    title = values.filter(has=page.locator("td").first.filter(has_text=re.compile(r"^job_title\b")))
    expect(title).to_have_count(1)
    expect(title).to_have_class(re.compile(r"\bdiffers\b"))
    expect(title.locator("td").nth(1)).to_have_text("Intern")
    expect(title.locator("td").nth(2)).to_have_text("VP")
    expect(title.locator("td").last).to_contain_text("differs")
    city = values.filter(has=page.locator("td").first.filter(has_text=re.compile(r"^city\b")))
    expect(city.locator("td").nth(1)).to_have_text("Sevilla")
    expect(city.locator("td").nth(2)).to_have_text("Sevilla")
    expect(city).not_to_have_class(re.compile(r"\bdiffers\b"))

    # the timeline: the create of the first cycle, the collision of the second, each linking to its run's task
    timeline = page.locator("#timeline-table tbody")
    create = timeline.locator("tr.action-create")
    expect(create).to_have_count(1)
    collision = timeline.locator("tr.action-collision")
    expect(collision).to_have_count(1)
    expect(collision).to_contain_text("city")
    expect(collision).to_contain_text("Sevilla")
    expect(timeline.locator("tr.action-error")).to_contain_text("Intern")
    for row, run_id in ((create, cycles.first), (collision, cycles.second)):
        link = row.get_by_role("link", name=run_id, exact=True)
        expect(link).to_have_count(1)
        assert urlsplit(link.get_attribute("href")).path.startswith(_airflow_run_path(run_id) + "/tasks/"), \
            link.get_attribute("href")
    assert save_screenshot(page, "person").stat().st_size > 0

    # the link opens the run's task in Airflow's own UI
    href = create.get_by_role("link").get_attribute("href")
    create.get_by_role("link").click()
    page.wait_for_url(_on_path(unquote(urlsplit(href).path)))
    expect(page.get_by_text(cycles.first).first).to_be_visible()


# -- why didn't it sync? ---------------------------------------------------------------------------------

def test_why_names_the_rejected_value_with_the_services_message_and_what_to_do(cycles, browser_page):
    page = browser_page("viewer")
    page.goto(cycles.page_url("/why"))
    _search(page, "cat@example.com", "Explain")
    reason = page.locator("section.reason[data-code='value_rejected']")
    expect(reason).to_have_count(1)
    expect(reason.locator("h3")).to_contain_text("value_rejected")
    expect(reason.locator("h3")).to_contain_text("job_title")
    expect(reason).to_contain_text("Intern")
    expect(reason).to_contain_text(RULE)
    expect(reason.locator("p.action")).to_contain_text("What to do:")
    expect(reason.locator("p.action")).to_contain_text("retry_failed")
    expect(reason.get_by_role("link", name=f"run {cycles.second}")).to_have_count(1)
    assert save_screenshot(page, "why").stat().st_size > 0


# -- in Airflow's own UI ---------------------------------------------------------------------------------

def test_the_sync_console_entry_of_airflows_navigation_shows_the_runs_in_its_iframe(cycles, browser_page):
    page = browser_page("viewer")
    page.goto(cycles.server.url("/"))
    entry = page.get_by_role("link", name="Sync console", exact=True)
    entry.click()
    iframe = page.locator("iframe[title='Sync console']")
    expect(iframe).to_have_attribute("src", re.compile(r"/mdsync/"))
    console = iframe.content_frame
    runs = console.locator("#runs-table")
    expect(runs.get_by_role("link", name=cycles.first, exact=True)).to_be_visible()
    expect(runs.get_by_role("link", name=cycles.second, exact=True)).to_be_visible()
    expect(console.locator("#calls-marketo")).to_contain_text("Marketo usage endpoint")
    assert save_screenshot(page, "sync-console").stat().st_size > 0
