"""Exceptions shared by the engine and the service clients.

Record-level failures (a rejected lead, a refused column) are data, not exceptions: they come back in
result frames. These exceptions are for failures that stop an operation as a whole.

Every error says whether retrying can help (:attr:`SyncError.retryable`): bad credentials, missing
permissions, a missing field, column or alternate key, an invalid config and a used-up daily quota cannot be
fixed by running the same task again, so the Airflow boundary fails the task at once (no task retries);
failures that outlasted a client's own backoff (5xx, throttling, time-outs, a refused connection) keep
Airflow's retries. :func:`is_retryable` decides for any exception.

Messages never carry secrets or access tokens: they name the connection (its id and host), the request
(method and path, never a query value or header) and what to do.
"""

from __future__ import annotations

from datetime import datetime


class SyncError(Exception):
    """Base class of every error this package raises on purpose."""

    #: whether running the same task again, unchanged, can succeed
    retryable = False


class ConfigError(SyncError):
    """The sync config, a connection or a run parameter is invalid. The message names the file or connection,
    the entry and the problem."""


class StateStoreError(SyncError):
    """The state store cannot be opened, migrated or written."""

    retryable = True


class ServiceError(SyncError):
    """A remote service answered with an error, or could not be reached.

    :param service: ``"marketo"`` or ``"dynamics"``.
    :param code: the service's own error code (Marketo ``"1003"``, Dataverse ``"0x80040217"``...).
    :param message: what the service said.
    :param request: which call failed (method and path, never a token).
    :param next_step: what happens next / what the operator can do.
    :param where: the connection the call went through, e.g. ``Marketo connection 'marketo_default'
        (https://123-ABC-456.mktorest.com)``; the clients fill it in.
    :param retryable: whether a later attempt of the task can succeed unchanged (default: no; a request the
        service refused as sent is refused again).
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
        where: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        self.service = service
        self.code = code
        self.service_message = message
        self.request = request
        self.status = status
        self.next_step = next_step
        self.where = where
        if retryable is not None:
            self.retryable = retryable
        super().__init__(message)

    def __str__(self) -> str:
        head = self.where or self.service
        what = "error"
        if self.code:
            what += f" {self.code}"
        if self.status:
            what += f" (HTTP {self.status})"
        text = f"{head}: {what}: {self.service_message}"
        if self.request:
            text += f" [{self.request}]"
        if self.next_step:
            text += f". Next: {self.next_step}"
        return text


class AuthError(ServiceError):
    """The service refused the connection's credentials (or the token they bought): fix the connection."""


class AccessDenied(ServiceError):
    """The credentials work, but the API user lacks a permission this call needs: fix the user's role."""


class ServiceUnavailable(ServiceError):
    """A transient failure (5xx, throttling, a time-out, a refused connection) outlasted the client's backoff.

    Retrying the task later may succeed, so Airflow's retries apply.
    """

    retryable = True


class QuotaExhausted(ServiceError):
    """A daily quota is used up (Marketo 607); retrying before ``resets_at`` is pointless, so the run stops."""

    def __init__(self, service: str, code: str, message: str, *, resets_at: datetime | None = None, **kw) -> None:
        self.resets_at = resets_at
        kw.setdefault("next_step", f"stop until the quota resets at {resets_at}" if resets_at else None)
        kw["retryable"] = False
        super().__init__(service, code, message, **kw)


def is_retryable(exc: BaseException) -> bool:
    """Whether retrying the task can help: a :class:`SyncError` says so itself; anything else (a bug, a lost
    file, an unexpected library error) keeps the retries it always had."""
    if isinstance(exc, SyncError):
        return exc.retryable
    return True


def one_line(exc: BaseException) -> str:
    """The error as one line (a config error listing several problems joins them with ``; ``)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) == 1:
        return lines[0]
    return f"{lines[0]} {'; '.join(lines[1:])}"


# -- transport failures -----------------------------------------------------------------------------------

def _causes(exc: BaseException):
    """``exc`` and what it wraps: ``__cause__``, ``__context__``, urllib3's ``reason`` and wrapped first args."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None) if isinstance(getattr(e, "reason", None),
                                                                                       BaseException) else None]
        todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]


def transport_problem(exc: BaseException, host: str, timeout=None) -> tuple[str, bool]:
    """A transport failure (``requests``/``urllib3``/``socket``) as ``(readable reason, worth retrying)``.

    The reason names ``host`` and what went wrong (refused, host name not found, TLS, time-out), never the
    library's own repr (which names pools, URLs and adapters). A host name that does not resolve and a TLS
    certificate that is not trusted are setup problems, not worth retrying; refused and reset connections
    and time-outs are.
    """
    import socket
    import ssl

    import requests

    chain = list(_causes(exc))
    names = {type(e).__name__ for e in chain}
    read_s = timeout[1] if isinstance(timeout, (tuple, list)) else timeout
    connect_s = timeout[0] if isinstance(timeout, (tuple, list)) else timeout
    cert = next((e for e in chain if isinstance(e, ssl.SSLCertVerificationError)), None)
    if cert is not None:
        return f"the TLS certificate of {host} is not trusted ({getattr(cert, 'verify_message', None) or cert})", False
    if any(isinstance(e, socket.gaierror) for e in chain) or "NameResolutionError" in names:
        return f"the host name of {host} was not found (DNS)", False
    tls = next((e for e in chain if isinstance(e, ssl.SSLError)), None)
    if tls is not None or isinstance(exc, requests.exceptions.SSLError):
        return f"the TLS handshake with {host} failed ({getattr(tls, 'reason', None) or 'TLS error'})", False
    if isinstance(exc, requests.exceptions.ConnectTimeout) or "ConnectTimeoutError" in names:
        return f"no connection to {host} within {connect_s} s (connect time-out)", True
    if isinstance(exc, (requests.exceptions.ReadTimeout, socket.timeout, TimeoutError)) or "ReadTimeoutError" in names:
        return f"{host} did not answer within {read_s} s (read time-out)", True
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return f"{host} refused the connection (nothing listens there, or a firewall)", True
    if any(isinstance(e, ConnectionResetError) for e in chain) or "RemoteDisconnected" in names \
            or "ProtocolError" in names or "ChunkedEncodingError" in names:
        return f"{host} dropped the connection", True
    return f"cannot reach {host} ({type(exc).__name__})", True


def connection_label(service: str, connection_id: str | None, url: str) -> str:
    """``Marketo connection 'marketo_default' (https://host)``, or ``Marketo (https://host)`` without an id."""
    from urllib.parse import urlsplit

    name = {"marketo": "Marketo", "dynamics": "Dynamics"}.get(service, service)
    parts = urlsplit(url)
    host = f"{parts.scheme}://{parts.netloc}" if parts.netloc else url
    return f"{name} connection '{connection_id}' ({host})" if connection_id else f"{name} ({host})"
