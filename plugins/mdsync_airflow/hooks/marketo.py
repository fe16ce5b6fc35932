"""``MarketoHook``: reads the ``marketo_default`` connection and hands back a :class:`mdsync.marketo.MarketoClient`.

Connection (DESIGN §6): ``host`` = REST base URL (``https://<munchkin>.mktorest.com``), ``login`` = client id,
``password`` = client secret. ``extra`` may hold ``verify`` (bool or CA bundle path), ``max_calls_per_window``,
``window_s``, ``max_concurrent`` (to share the instance with other integrations) and ``timeout`` (seconds per
request, a number or ``[connect, read]``; default ``[10, 120]``). A missing field, an unknown extra key or a
value of the wrong kind is a :class:`~mdsync.errors.ConfigError` naming the connection and the entry.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.http.hooks.http import HttpHook

from mdsync_airflow.hooks import extras as conn_extras

#: Extra keys the hook consumes itself (HttpHook's own are allowed too; any other key is refused, since
#: HttpHook would send it to Marketo as an HTTP header).
CLIENT_EXTRAS = ("max_calls_per_window", "window_s", "max_concurrent", "timeout", "verify", "verify_ssl")


class MarketoHook(HttpHook):
    """Build a Marketo client from an Airflow HTTP connection.

    :param marketo_conn_id: the connection id (``marketo_default``).
    """

    conn_name_attr = "marketo_conn_id"
    default_conn_name = "marketo_default"
    conn_type = "http"
    hook_name = "Marketo Engage"

    def __init__(self, marketo_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(method="GET", http_conn_id=marketo_conn_id, **kwargs)
        self.marketo_conn_id = marketo_conn_id

    def get_conn(self, headers: dict | None = None, extra_options: dict | None = None):
        """The HttpHook session, minus basic auth: Marketo takes a bearer token, never the secret per call."""
        session = super().get_conn(headers=headers, extra_options=extra_options)
        session.auth = None
        for key in CLIENT_EXTRAS:
            session.headers.pop(key, None)
        return session

    def get_client(self, **client_kwargs):
        """A :class:`~mdsync.marketo.MarketoClient` for the connection; new access tokens are masked in logs.

        :param client_kwargs: passed on to the client (e.g. ``max_attempts``).
        :raises mdsync.errors.ConfigError: the connection is undefined, lacks a field, or has a bad extra.
        """
        from airflow.sdk.log import mask_secret

        from mdsync.marketo import MarketoClient

        cid = self.marketo_conn_id
        conn = conn_extras.connection(self, cid, f"AIRFLOW_CONN_{cid.upper()}")
        if conn.password:
            mask_secret(conn.password)
        extra = conn.extra_dejson
        conn_extras.check_extra_keys(cid, extra, CLIENT_EXTRAS)
        conn_extras.require(cid, [("host", conn.host, "the REST base URL, Admin > Web Services, without /rest"),
                                  ("login", conn.login, "the client id"), ("password", conn.password, "the client secret")])
        limits = {k: v for k, kind in (("max_calls_per_window", int), ("window_s", float), ("max_concurrent", int))
                  if (v := conn_extras.positive(cid, extra, k, kind)) is not None}
        timeout = conn_extras.timeout(cid, extra)
        verify = conn_extras.verify(cid, extra)
        session = self.get_conn()
        return MarketoClient(self.base_url, conn.login, conn.password, session=session, verify=verify,
                             token_listener=mask_secret, timeout=timeout, connection_id=cid,
                             **{**limits, **client_kwargs})

    def test_connection(self) -> tuple[bool, str]:
        """Fetch a token and describe leads: proves the URL, the credentials and the API user's read access."""
        try:
            fields = self.get_client(max_attempts=2).describe_leads()
        except Exception as exc:  # shown in the UI's "Test" result
            return False, str(exc)
        return True, f"Connected: {len(fields)} lead fields visible"
