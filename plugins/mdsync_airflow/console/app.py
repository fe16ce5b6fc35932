"""The console's FastAPI app: HTML pages (:mod:`.pages`), the JSON API (:mod:`.api`) and static files.

Airflow imports plugins in every process that loads them, each Celery task process included, so importing this
module (and :mod:`.plugin`) must stay cheap: no FastAPI, no pages, no API, no engine, no pandas. The plugin
registers :data:`console_app`, an ASGI app that builds the real one (:func:`create_app`) on the first request
that reaches it, in the API server only.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

if TYPE_CHECKING:
    from fastapi import FastAPI

#: where the API server mounts the console
PREFIX = "/mdsync"
HERE = Path(__file__).resolve().parent


def create_app() -> FastAPI:
    """Build the console app: its API under ``/api``, its pages, its static files, its error pages.

    :return: the FastAPI app the API server's mount forwards requests to (through :class:`LazyConsoleApp`)
    """
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    from mdsync_airflow.console import api, pages

    app = FastAPI(title="Marketo ⇄ Dynamics sync console", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.include_router(api.router, prefix="/api")
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.exception_handler(HTTPException)
    async def _refused(request: Request, exc: HTTPException):
        # pages answer a refused or failed request with a short page (no data), the API with JSON
        if request.url.path.startswith(f"{request.scope.get('root_path', '')}/api") or exc.status_code not in (401, 403):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return HTMLResponse(pages.refused(request, exc.status_code, str(exc.detail)), status_code=exc.status_code)

    return app


class LazyConsoleApp:
    """An ASGI app that builds the console (:func:`create_app`) once, on the first call, and forwards every call.

    Airflow mounts any ASGI app given in ``fastapi_apps`` (``app.mount(url_prefix, app)``), so the scope this
    receives (``root_path`` ending in :data:`PREFIX`) is exactly what the real app would receive mounted directly.
    Airflow's API server enters the lifespan of FastAPI sub-apps only; the console has none (a unit test keeps it
    so), and a ``lifespan`` call made to this app directly (uvicorn serving it alone) is forwarded all the same.
    """

    def __init__(self, factory: Callable[[], Any] = create_app) -> None:
        """:param factory: builds the real ASGI app; called once, by the first request"""
        self._factory = factory
        self._app: Any = None
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        """Whether the real app has been built (by a first request)."""
        return self._app is not None

    def get_app(self) -> Any:
        """The real app, built on the first call (one build even when threads race: the loser waits for it).

        :return: the app :func:`create_app` made
        """
        if self._app is None:
            with self._lock:
                if self._app is None:
                    self._app = self._factory()
        return self._app

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        """Forward an ASGI call to the real app, building it first (in a worker thread) when this is the first."""
        app = self._app
        if app is None:
            from anyio import to_thread

            # the build imports the pages, the API and pandas (seconds): off the event loop, which also serves
            # the UI and the task execution API meanwhile
            app = await to_thread.run_sync(self.get_app)
        await app(scope, receive, send)


#: the app the plugin registers (``fastapi_apps``); the real console is built by its first request
console_app = LazyConsoleApp()
