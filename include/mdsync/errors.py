"""Exceptions shared by the engine and the service clients.

Record-level failures (a rejected lead, a refused column) are data, not exceptions: they come back in
result frames. These exceptions are for failures that stop an operation as a whole.
"""

from __future__ import annotations


class SyncError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(SyncError):
    """The sync config is invalid. The message names the file, the entry and the problem."""


class StateStoreError(SyncError):
    """The state store cannot be opened, migrated or written."""


class ServiceError(SyncError):
    """A remote service answered with an error that retrying will not fix.

    :param service: ``"marketo"`` or ``"dynamics"``.
    :param code: the service's own error code (Marketo ``"1003"``, Dataverse ``"0x80040217"``...).
    :param message: what the service said.
    :param request: which call failed (method and path, never a token).
    :param next_step: what happens next / what the operator can do.
    """

    def __init__(
        self,
        service: str,
        code: str | None,
        message: str,
        *,
        request: str | None = None,
        status: int | None = None,
        next_step: str | None = None,
    ) -> None:
        self.service = service
        self.code = code
        self.service_message = message
        self.request = request
        self.status = status
        self.next_step = next_step
        parts = [f"{service} error"]
        if code:
            parts[0] += f" {code}"
        if status:
            parts[0] += f" (HTTP {status})"
        text = f"{parts[0]}: {message}"
        if request:
            text += f" [{request}]"
        if next_step:
            text += f". Next: {next_step}"
        super().__init__(text)


class QuotaExhausted(ServiceError):
    """A daily quota is used up (Marketo 607); retrying before ``resets_at`` is pointless."""

    def __init__(self, service: str, code: str, message: str, *, resets_at=None, **kw) -> None:
        self.resets_at = resets_at
        kw.setdefault("next_step", f"stop until the quota resets at {resets_at}" if resets_at else None)
        super().__init__(service, code, message, **kw)
