"""The console's FastAPI app: HTML pages (:mod:`.pages`), the JSON API (:mod:`.api`) and static files."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

#: where the API server mounts the console
PREFIX = "/mdsync"
HERE = Path(__file__).resolve().parent


def create_app() -> FastAPI:
    """The console app (routes import the engine lazily, so registering the plugin stays cheap)."""
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
