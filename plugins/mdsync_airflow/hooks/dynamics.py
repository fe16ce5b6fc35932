"""``DynamicsHook``: reads the ``dynamics_default`` connection and returns a :class:`mdsync.dynamics.DynamicsClient`.

Connection (DESIGN §6): ``host`` = organisation URL, ``login`` = client id, ``password`` = client secret,
``extra`` = ``{"tenant_id": ..., "authority": optional, "verify": optional CA bundle path or bool,
"timeout": optional seconds per request (a number or [connect, read], default [10, 120]),
"max_parallel_requests": optional bulk-write requests sent at once (default 4, lowered to the service's
``x-ms-dop-hint``; the service allows 52 concurrent requests per user),
"username"/"password": optional, for the username/password grant}``. A missing field, an unknown extra key
or a value of the wrong kind is a :class:`~mdsync.errors.ConfigError` naming the connection and the entry.
"""

from __future__ import annotations

from airflow.providers.http.hooks.http import HttpHook

from mdsync_airflow.hooks import extras as conn_extras

# Extras that configure the Dataverse client: never let HttpHook turn them into request headers.
_CLIENT_EXTRAS = ("tenant_id", "authority", "username", "password", "max_parallel_requests")
#: every extra key the hook reads (HttpHook's own are allowed too; any other key is refused)
KNOWN_EXTRAS = (*_CLIENT_EXTRAS, "verify", "timeout")


class DynamicsHook(HttpHook):
    """Thin hook over the HTTP provider's ``HttpHook`` for the Dataverse Web API.

    :param dynamics_conn_id: Airflow connection id (default ``dynamics_default``).
    """

    conn_name_attr = "dynamics_conn_id"
    default_conn_name = "dynamics_default"
    conn_type = "http"
    hook_name = "Dynamics 365 (Dataverse)"

    def __init__(self, dynamics_conn_id: str = default_conn_name, **kwargs) -> None:
        super().__init__(method="GET", http_conn_id=dynamics_conn_id, **kwargs)
        self.dynamics_conn_id = dynamics_conn_id

    def _configure_session_from_auth(self, session, connection):
        # Dataverse takes MSAL bearer tokens; HttpHook's default would send login/password as Basic auth.
        session.auth = None
        return session

    def _configure_session_from_extra(self, session, connection, extra_options):
        session = super()._configure_session_from_extra(session, connection, extra_options)
        for key in _CLIENT_EXTRAS:
            session.headers.pop(key, None)
        return session

    def get_client(self, **client_kwargs):
        """Build the Dataverse client from the connection; new access tokens are masked in task logs.

        :param client_kwargs: passed on to :class:`~mdsync.dynamics.DynamicsClient` (e.g. ``max_concurrent``).
        :raises mdsync.errors.ConfigError: the connection is undefined, lacks the org URL, client id/secret or
            tenant, or has a bad extra.
        """
        from airflow.sdk.log import mask_secret

        from mdsync.dynamics import DynamicsClient

        cid = self.dynamics_conn_id
        conn = conn_extras.connection(self, cid, f"AIRFLOW_CONN_{cid.upper()}")
        extra = conn.extra_dejson
        for secret in (conn.password, extra.get("password")):
            if secret:
                mask_secret(secret)
        conn_extras.check_extra_keys(cid, extra, KNOWN_EXTRAS)
        conn_extras.require(cid, [("host", conn.host, "the organisation URL"), ("login", conn.login, "the client id"),
                                  ("password", conn.password, "the client secret"),
                                  ("extra.tenant_id", extra.get("tenant_id"), "the directory id")])
        timeout = conn_extras.timeout(cid, extra)
        verify = conn_extras.verify(cid, extra)
        parallel = conn_extras.positive(cid, extra, "max_parallel_requests", int)
        if parallel is not None:
            client_kwargs.setdefault("max_parallel_requests", parallel)
        session = self.get_conn()
        return DynamicsClient(
            self.base_url, conn.login, conn.password, extra["tenant_id"], authority=extra.get("authority"),
            verify=verify, username=extra.get("username"), password=extra.get("password"),
            session=session, token_listener=mask_secret, timeout=timeout, connection_id=cid, **client_kwargs)
