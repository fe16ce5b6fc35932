"""The Airflow UI in a real browser (headless Chromium) against a real ``airflow api-server`` with this
repository's plugins: signing in on the login page, and the operator console's entry in the navigation."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from playwright.sync_api import expect

from tests.fixtures.airflow_server import login, save_screenshot

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONSOLE = "Sync console"


def test_admin_signs_in_on_the_login_page_and_sees_the_home_page(browser, airflow_api_server):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, locale="en-US", timezone_id="UTC")
    try:
        page = context.new_page()
        page.goto(airflow_api_server.url("/"))
        # no cookie yet: the UI sends the browser to the SimpleAuthManager's form
        page.wait_for_url("**/auth/login?next=*")
        page.get_by_label("Username").fill("admin")
        page.get_by_label("Password").fill("not-" + airflow_api_server.passwords["admin"])
        page.get_by_role("button", name="Sign in").click()
        page.get_by_text("Invalid credentials").wait_for()
        assert "/auth/login" in page.url
        assert not [c for c in context.cookies() if c["name"] == "_token"]

        login(page, airflow_api_server, "admin")
        page.get_by_role("heading", name="Welcome").wait_for()
        assert page.url == airflow_api_server.url("/")
        expect(page.get_by_role("link", name="Dags", exact=True)).to_be_visible()
        # the DAG serialized by the fixture is what the home page counts as active
        page.get_by_role("link", name="Dags", exact=True).click()
        page.get_by_role("link", name="marketo_dynamics_sync").first.wait_for()
        token = [c for c in context.cookies() if c["name"] == "_token"]
        assert len(token) == 1 and token[0]["path"] == "/", token
    finally:
        context.close()


def test_the_navigation_has_the_sync_console_entry_showing_the_console(browser_page, airflow_api_server):
    page = browser_page("viewer")
    page.goto(airflow_api_server.url("/"))
    page.get_by_role("heading", name="Welcome").wait_for()
    entry = page.get_by_role("link", name=CONSOLE, exact=True)
    entry.wait_for(timeout=10_000)
    entry_href = entry.get_attribute("href")
    assert entry_href.startswith("/plugin/"), entry_href

    # the iframe's document request carries the UI's _token cookie: the console answers it as the viewer
    with page.expect_response(lambda r: r.request.resource_type == "document"
                              and urlsplit(r.url).path.startswith("/mdsync/")) as console_document:
        entry.click()
    assert console_document.value.status == 200, (console_document.value.status, console_document.value.url)
    page.wait_for_url(airflow_api_server.url(entry_href) + "**")
    # an external view is the plugin's page in an iframe titled with the view's name (the UI mirrors the
    # iframe's path into its own URL: /plugin/<url_route>/mdsync/...)
    iframe = page.locator(f"iframe[title='{CONSOLE}']")
    src = iframe.get_attribute("src")
    assert urlsplit(src).path.startswith("/mdsync/"), src
    console = iframe.content_frame
    console.locator("h1").wait_for()  # the console's own page, not the iframe's initial about:blank
    assert console.locator("h1").inner_text().strip(), "the console page has an empty heading"
    assert save_screenshot(page, "sync-console").stat().st_size > 0
