"""``MarketoHook``: reads the ``marketo_default`` connection and hands back a :class:`mdsync.marketo.MarketoClient`.

Connection (DESIGN §6): ``host`` = REST base URL (``https://<munchkin>.mktorest.com``), ``login`` = client id,
``password`` = client secret. ``extra`` may hold ``verify`` (bool or CA bundle path), ``max_calls_per_window``,
``window_s``, ``max_concurrent`` (to share the instance with other integrations) and ``timeout``.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.http.hooks.http import HttpHook

#: Extra keys the hook consumes itself (everything else in extra is left to HttpHook, which sends it as headers).
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

    def get_client(self):
        """A :class:`~mdsync.marketo.MarketoClient` for the connection; new access tokens are masked in logs."""
        from airflow.sdk.log import mask_secret

        from mdsync.marketo import MarketoClient

        conn = self.get_connection(self.marketo_conn_id)
        session = self.get_conn()
        if not conn.host or not conn.login or not conn.password:
            raise ValueError(f"Airflow connection {self.marketo_conn_id!r} needs host (the REST base URL), login "
                             "(client id) and password (client secret)")
        extra = conn.extra_dejson
        verify = extra.get("verify", extra.get("verify_ssl", True))
        if isinstance(verify, str) and verify.lower() in ("true", "false"):
            verify = verify.lower() == "true"
        limits = {k: type_(extra[k]) for k, type_ in (("max_calls_per_window", int), ("window_s", float),
                                                       ("max_concurrent", int)) if k in extra}
        timeout = extra.get("timeout")
        mask_secret(conn.password)
        return MarketoClient(self.base_url, conn.login, conn.password, session=session, verify=verify,
                             token_listener=mask_secret,
                             timeout=tuple(timeout) if isinstance(timeout, list) else (timeout or (10, 120)),
                             **limits)

    def test_connection(self) -> tuple[bool, str]:
        """Fetch a token and describe leads: proves the URL, the credentials and the API user's read access."""
        try:
            fields = self.get_client().describe_leads()
        except Exception as exc:
            return False, str(exc)
        return True, f"Connected: {len(fields)} lead fields visible"
