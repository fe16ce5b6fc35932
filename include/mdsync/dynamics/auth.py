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
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from collections.abc import Callable

import msal
import requests
from requests.adapters import HTTPAdapter

from mdsync.errors import ServiceError

log = logging.getLogger(__name__)
DEFAULT_AUTHORITY = "https://login.microsoftonline.com/{tenant_id}"


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


def identity_session(authority: str, verify) -> requests.Session:
    """The session MSAL uses: ignores ``REQUESTS_CA_BUNDLE`` (trust_env off) so ``verify`` is honoured."""
    session = requests.Session()
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
    """

    def __init__(self, org_url: str, client_id: str, client_secret: str, tenant_id: str, *, authority=None,
                 verify=True, username=None, password=None,
                 token_listener: Callable[[str], None] | None = None) -> None:
        self.authority = (authority or DEFAULT_AUTHORITY.format(tenant_id=tenant_id)).rstrip("/")
        self.scopes = [org_url.rstrip("/") + "/.default"]
        self.username, self.password = username, password
        self.token_listener = token_listener
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        known = urllib.parse.urlsplit(self.authority).hostname == "login.microsoftonline.com"
        try:
            self.app = msal.ConfidentialClientApplication(
                client_id, client_credential=client_secret, authority=self.authority,
                instance_discovery=None if known else False, http_client=identity_session(self.authority, verify))
        except ValueError as exc:  # MSAL raises ValueError when the authority's discovery fails
            raise ServiceError("dynamics", None, str(exc), request=f"GET {self.authority}/v2.0/.well-known/"
                               "openid-configuration", next_step="check the connection's tenant_id / authority "
                               "and that the identity endpoint is reachable") from exc

    def token(self) -> str:
        """A valid access token (from MSAL's cache when it has one)."""
        with self._lock:
            result = self._acquire()
        if "access_token" not in result:
            raise ServiceError("dynamics", result.get("error"), result.get("error_description", "no token"),
                               request=f"POST {self.authority}/oauth2/v2.0/token",
                               next_step="check the Dynamics connection's client id, secret, tenant"
                                         + (" and user credentials" if self.username else ""))
        token = result["access_token"]
        if token not in self._seen:
            self._seen.add(token)
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

    def renew(self) -> None:
        """Forget cached tokens after the Web API refused one (401), so the next :meth:`token` is fresh."""
        with self._lock:
            if self.username is None:
                self.app.remove_tokens_for_client()
            else:
                for account in self.app.get_accounts(username=self.username):
                    self.app.remove_account(account)
