"""What every part of the sandbox app shares, passed explicitly: one :class:`Sandbox` on ``app.state.sandbox``.

Routers reach it through the :data:`SandboxDep` dependency (``sb: SandboxDep`` in a path operation), the
middleware through ``request.app.state.sandbox``. Nothing is kept in module globals, so several apps (one
per data folder) can live in one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from .guard import Guard
from .imports import ImportJobs
from .store import MarketoStore


@dataclass
class Sandbox:
    """One sandbox instance: its data, the limits in front of it, its bulk import jobs and credentials."""

    store: MarketoStore
    guard: Guard
    imports: ImportJobs
    client_id: str
    client_secret: str
    daily_quota: int


def sandbox(request: Request) -> Sandbox:
    """The :class:`Sandbox` of the app serving ``request``."""
    return request.app.state.sandbox


SandboxDep = Annotated[Sandbox, Depends(sandbox)]
