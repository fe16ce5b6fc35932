"""Client-credentials access tokens from Marketo's identity service (authentication.md)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import requests

from mdsync.errors import AuthError, ServiceError

log = logging.getLogger(__name__)

# Renew when this share of the token's life is left (capped), so calls do not run into 602.
RENEW_FRACTION = 0.1
RENEW_MAX_S = 60.0
# Marketo returns the same token until it expires; below this many seconds we wait it out and fetch anew.
LAST_SECONDS = 2.0


class TokenManager:
    """Fetches, caches and renews the bearer token of one custom service.

    :param session: HTTP session for the identity call.
    :param base_url: the instance's REST base URL (identity lives at ``/identity``).
    :param client_id: / :param client_secret: the LaunchPoint custom service credentials.
    :param send: callable performing the HTTP request (lets the client apply its limits and count calls).
    :param token_listener: called with every new token (Airflow's ``mask_secret``).
    :param envelope_error: builds the exception for a Marketo error code in the identity answer (a response
        envelope with ``success: false``, e.g. 607 or 606), as for any other call.
    :param where: how errors name the connection.
    """

    def __init__(self, base_url: str, client_id: str, client_secret: str, send: Callable[..., requests.Response],
                 token_listener: Callable[[str], None] | None = None,
                 envelope_error: Callable[[str, str, str], Exception] | None = None, where: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id
        self._secret = client_secret
        self._send = send
        self._listener = token_listener
        self._envelope_error = envelope_error
        self.where = where
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0
        self._lifespan = 3600.0
        self._renewal_asked = False

    def token(self) -> str:
        """A token valid for the next call, renewed ahead of expiry."""
        with self._lock:
            remaining = self._expires_at - time.monotonic()
            margin = min(RENEW_MAX_S, self._lifespan * RENEW_FRACTION)
            if self._token is None:
                self._fetch()
            elif remaining < min(LAST_SECONDS, self._lifespan * RENEW_FRACTION / 2):
                # The service would hand back the same, nearly dead token: let it expire, then fetch anew.
                time.sleep(max(0.0, remaining))
                self._fetch()
            elif remaining < margin and not self._renewal_asked:
                # Ask once; the service may answer with the same token and its remaining life.
                self._renewal_asked = True
                self._fetch()
            return self._token  # type: ignore[return-value]

    def invalidate(self, token: str) -> None:
        """Forget ``token`` after the service called it invalid or expired (601/602)."""
        with self._lock:
            if self._token == token:
                self._token = None
                self._expires_at = 0.0

    def _fetch(self) -> None:
        # POST with a form body keeps the secret out of URLs (and so out of access logs and proxies).
        request = "POST /identity/oauth/token"
        resp = self._send("POST", "/identity/oauth/token",
                          data={"grant_type": "client_credentials", "client_id": self.client_id,
                                "client_secret": self._secret})
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        errors = body.get("errors") if body.get("success") is False else None
        if errors and self._envelope_error is not None:
            # Marketo's response envelope (a limit or the daily quota), not an OAuth answer about the credentials
            first = errors[0] if isinstance(errors[0], dict) else {}
            raise self._envelope_error(str(first.get("code")), str(first.get("message")), request)
        if resp.status_code != 200 or "access_token" not in body:
            desc = body.get("error_description") or body.get("error") or _shown(resp.text, self._secret)
            code = str(body.get("error") or resp.status_code)
            if resp.status_code in (400, 401, 403) and body.get("error") not in (None, "invalid_request"):
                raise AuthError(
                    "marketo", code, f"identity refused the client credentials: {desc}", request=request,
                    status=resp.status_code, where=self.where,
                    next_step=f"check the connection's login (client id {self.client_id!r}) and password (client "
                              "secret) against Admin > LaunchPoint > View Details of the custom service; not retried")
            raise ServiceError("marketo", code, f"identity did not issue a token: {desc}", request=request,
                               status=resp.status_code, where=self.where,
                               next_step="check that the connection's host is the REST base URL of Admin > Web "
                                         "Services (without /rest)")
        new = body["access_token"]
        expires_in = float(body.get("expires_in", 3600))
        if new != self._token and self._listener is not None:
            self._listener(new)
        if new != self._token:
            self._lifespan = max(expires_in, 1.0)
            self._renewal_asked = False
        self._token = new
        self._expires_at = time.monotonic() + expires_in
        log.debug("Marketo access token obtained for client %s, valid %.0f s", self.client_id, expires_in)


def _shown(text: str, secret: str) -> str:
    """The start of an unexpected answer, with the secret blanked should a service ever echo it back."""
    return text[:200].replace(secret, "***") if secret else text[:200]
