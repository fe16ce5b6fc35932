"""Access tokens for the Dataverse Web API from MSAL (client credentials by default, ROPC as an option).

Tokens come from MSAL's cache (a cached token with under 5 minutes left counts as expired). After a 401
the client calls :meth:`TokenProvider.renew`, which drops the cached tokens so the next one is new.

ROPC and a local authority: MSAL's user-realm lookup for the password grant builds
``https://<host>/common/userrealm/<user>`` from the host name only, dropping an explicit port
(``https://127.0.0.1:8711/<tenant>`` -> ``https://127.0.0.1/common/userrealm/...``). When, and only when,
the authority has an explicit port, the session handed to MSAL mounts :class:`AuthorityPortAdapter` for
the port-less origin, which sends those requests to the authority's real port. MSAL stays unmodified,
the lookup is a real HTTP call (the sandbox answers it like Entra ID does for a managed domain), and
nothing changes for ``login.microsoftonline.com``.

Failures name the connection and the authority, never MSAL's discovery URLs or a raw ``requests`` error:
refused credentials (``invalid_client``, an unknown app or tenant, a wrong org URL as scope) are an
:class:`~mdsync.errors.AuthError`; an authority that cannot be reached is a
:class:`~mdsync.errors.ServiceUnavailable` (worth retrying) unless its host name does not resolve or its
TLS certificate is not trusted (setup problems, not retried).
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from collections.abc import Callable
from typing import NoReturn

import msal
import requests
from requests.adapters import HTTPAdapter

from mdsync.errors import AuthError, ServiceError, ServiceUnavailable, transport_problem

log = logging.getLogger(__name__)
DEFAULT_AUTHORITY = "https://login.microsoftonline.com/{tenant_id}"
#: OAuth error codes (RFC 6749 and Entra ID) that mean the connection's settings are wrong, not the service
REFUSED = {"invalid_client", "unauthorized_client", "invalid_grant", "invalid_request", "invalid_scope",
           "invalid_tenant", "unsupported_grant_type", "access_denied", "invalid_resource"}
#: OAuth error codes of a service that is down for now
UNAVAILABLE = {"temporarily_unavailable", "server_error"}


class AuthorityPortAdapter(HTTPAdapter):
    """Send requests for ``https://host/...`` (no port) to ``https://host:port/...``."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port

    def send(self, request, **kwargs):
        parts = urllib.parse.urlsplit(request.url)
        if parts.port is None:
            request.url = urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.hostname}:{self.port}"))
        return super().send(request, **kwargs)


class _TimeoutSession(requests.Session):
    """A session with a default per-request timeout (MSAL sends no timeout of its own to a given session)."""

    def __init__(self, timeout) -> None:
        super().__init__()
        self.timeout = timeout
        #: the HTTP status of the last identity call (MSAL reports a throttled or failing discovery as a bare
        #: ValueError or MsalServiceError, so the status says whether it was the service or the settings)
        self.last_status: int | None = None

    def request(self, method, url, **kwargs):
        kwargs.setdefault("timeout", self.timeout)
        self.last_status = None
        resp = super().request(method, url, **kwargs)
        self.last_status = resp.status_code
        return resp

    @property
    def service_down(self) -> bool:
        """Whether the last identity call was throttled (429) or failed on the service's side (5xx)."""
        return self.last_status is not None and (self.last_status == 429 or self.last_status >= 500)


def identity_session(authority: str, verify, timeout=(10, 120)) -> _TimeoutSession:
    """The session MSAL uses: ignores ``REQUESTS_CA_BUNDLE`` (trust_env off) so ``verify`` is honoured, and
    gives every identity call the connection's ``timeout``."""
    session = _TimeoutSession(timeout)
    session.trust_env = False
    session.verify = verify
    parts = urllib.parse.urlsplit(authority)
    if parts.port is not None and parts.port != 443:
        session.mount(f"https://{parts.hostname}/", AuthorityPortAdapter(parts.port))
    return session


class TokenProvider:
    """Gets Dataverse access tokens through MSAL's confidential client.

    :param org_url: organisation URL; the scope is ``<org_url>/.default``.
    :param username: with ``password``, use the username/password (ROPC) grant instead of client credentials.
    :param token_listener: called with every new access token (the hook passes Airflow's ``mask_secret``).
    :param timeout: (connect, read) seconds for each identity call.
    :param where: how errors name the connection (``Dynamics connection 'dynamics_default' (https://org)``).

    MSAL's application (which reads the authority's OpenID configuration) is made on the first :meth:`token`,
    so an unreachable authority fails a call, inside the client's retries, rather than the client's creation.
    """

    def __init__(self, org_url: str, client_id: str, client_secret: str, tenant_id: str, *, authority=None,
                 verify=True, username=None, password=None,
                 token_listener: Callable[[str], None] | None = None, timeout=(10, 120),
                 where: str | None = None) -> None:
        self.authority = (authority or DEFAULT_AUTHORITY.format(tenant_id=tenant_id)).rstrip("/")
        self.scopes = [org_url.rstrip("/") + "/.default"]
        self.username, self.password = username, password
        self.token_listener = token_listener
        self.client_id = client_id
        self.where = where or "Dynamics"
        self.timeout = timeout
        self._secret = client_secret
        self._verify = verify
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._current: str | None = None  # the token handed out last
        self._app: msal.ConfidentialClientApplication | None = None
        self._session: _TimeoutSession | None = None

    @property
    def app(self) -> msal.ConfidentialClientApplication:
        """MSAL's confidential client, made (and the authority discovered) on first use."""
        if self._app is None:
            known = urllib.parse.urlsplit(self.authority).hostname == "login.microsoftonline.com"
            self._session = identity_session(self.authority, self._verify, self.timeout)
            try:
                self._app = msal.ConfidentialClientApplication(
                    self.client_id, client_credential=self._secret, authority=self.authority,
                    instance_discovery=None if known else False, http_client=self._session)
            except requests.RequestException as exc:
                self._unreachable(exc)
            except (ValueError, msal.exceptions.MsalServiceError) as exc:
                self._down("its OpenID discovery", exc)
                # MSAL's ValueError: "the authority answered, but has no OpenID configuration"
                raise AuthError(
                    "dynamics", "authority", f"the authority {self.authority} has no OpenID configuration for this "
                    "tenant", where=self.where,
                    next_step="check the connection's extra.tenant_id (the directory id of the app registration) "
                              "and extra.authority (default https://login.microsoftonline.com/<tenant_id>); "
                              "not retried") from None
        return self._app

    def _down(self, what: str, exc: Exception) -> None:
        """Raise :class:`ServiceUnavailable` when MSAL's failure was a throttled or failing identity call."""
        if self._session is not None and self._session.service_down:
            status = self._session.last_status
            detail = getattr(exc, "_error_description", None) or getattr(exc, "_error", None) or ""
            raise ServiceUnavailable("dynamics", f"HTTP {status}", f"the authority {self.authority} answered HTTP "
                                     f"{status} to {what}" + (f": {detail}" if detail else ""), where=self.where,
                                     next_step="the identity service is down or throttling for now; retried") from None

    def _unreachable(self, exc: requests.RequestException) -> NoReturn:
        reason, retryable = transport_problem(exc, f"the authority {self.authority}", self.timeout)
        step = "check the connection's extra.authority and extra.tenant_id" + (
            " and extra.verify (a CA bundle path)" if "TLS" in reason else "")
        if retryable:
            raise ServiceUnavailable("dynamics", "transport", reason, where=self.where,
                                     next_step=f"{step}, and that this machine can reach it") from None
        raise ServiceError("dynamics", "transport", reason, where=self.where,
                           next_step=f"{step}; not retried") from None

    def token(self) -> str:
        """A valid access token (from MSAL's cache when it has one).

        :raises AuthError: the identity service refused the connection's credentials.
        :raises ServiceUnavailable: the authority could not be reached or is down for now (worth retrying).
        """
        with self._lock:
            try:
                result = self._acquire()
            except requests.RequestException as exc:
                self._unreachable(exc)
            except msal.exceptions.MsalServiceError as exc:  # e.g. a 503 whose body MSAL cannot read as OAuth
                self._down("a token request", exc)
                result = {"error": getattr(exc, "_error", None) or "server_error",
                          "error_description": getattr(exc, "_error_description", None) or str(exc)}
            token = result.get("access_token")
            fresh = token is not None and token not in self._seen
            if token is not None:
                self._seen.add(token)
                self._current = token
        if token is None:
            code = result.get("error")
            desc = result.get("error_description") or "no token"
            if code in UNAVAILABLE:
                raise ServiceUnavailable("dynamics", code, desc, where=self.where,
                                         next_step="the identity service is down for now; the task is retried")
            cls = AuthError if code in REFUSED else ServiceError
            raise cls("dynamics", code, f"the authority {self.authority} refused the credentials: {desc}",
                      where=self.where,
                      next_step="check the connection's login (client id " + repr(self.client_id) + "), password "
                                "(client secret), extra.tenant_id and host (the org URL is the token's scope)"
                                + (", and extra.username / extra.password" if self.username else "")
                                + "; not retried")
        if fresh:
            if self.token_listener:
                self.token_listener(token)
            log.info("dynamics: new access token from %s (source %s)", "password grant" if self.username
                     else "client credentials", result.get("token_source", "identity provider"))
        return token

    def _acquire(self) -> dict:
        if self.username is None:
            return self.app.acquire_token_for_client(scopes=self.scopes)
        accounts = self.app.get_accounts(username=self.username)
        if accounts:
            result = self.app.acquire_token_silent(self.scopes, account=accounts[0])
            if result and "access_token" in result:
                return result
        return self.app.acquire_token_by_username_password(self.username, self.password, scopes=self.scopes)

    def renew(self, refused: str | None = None) -> bool:
        """Forget cached tokens after the Web API refused one (401), so the next :meth:`token` is fresh.

        :param refused: the token that was refused; when another one was handed out since (a request in
            parallel renewed it already), nothing is dropped and False is returned.
        """
        if self._app is None:
            return True
        with self._lock:
            if refused is not None and refused != self._current:
                return False
            if self.username is None:
                self.app.remove_tokens_for_client()
            else:
                for account in self.app.get_accounts(username=self.username):
                    self.app.remove_account(account)
        return True
