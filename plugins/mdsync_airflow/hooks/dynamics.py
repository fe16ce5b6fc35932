"""``DynamicsHook``: reads the ``dynamics_default`` connection and returns a :class:`mdsync.dynamics.DynamicsClient`.

Connection (DESIGN §6): ``host`` = organisation URL, ``login`` = client id, ``password`` = client secret,
``extra`` = ``{"tenant_id": ..., "authority": optional, "verify": optional CA bundle path or bool,
"username"/"password": optional, for the username/password grant}``.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.http.hooks.http import HttpHook

# Extras that configure the Dataverse client: never let HttpHook turn them into request headers.
_CLIENT_EXTRAS = ("tenant_id", "authority", "username", "password")


def _as_verify(value: Any) -> bool | str:
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return True if value is None or value == "" else value


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
        :raises mdsync.errors.ConfigError: when the connection lacks the org URL, client id/secret or tenant.
        """
        from airflow.sdk.log import mask_secret

        from mdsync.dynamics import DynamicsClient
        from mdsync.errors import ConfigError

        conn = self.get_connection(self.dynamics_conn_id)
        extra = conn.extra_dejson
        missing = [name for name, value in (("host", conn.host), ("login", conn.login), ("password", conn.password),
                                             ("extra.tenant_id", extra.get("tenant_id"))) if not value]
        if missing:
            raise ConfigError(f"Airflow connection '{self.dynamics_conn_id}' lacks {', '.join(missing)} "
                              "(host = org URL, login = client id, password = client secret, extra.tenant_id)")
        session = self.get_conn()
        mask_secret(conn.password)
        if extra.get("password"):
            mask_secret(extra["password"])
        return DynamicsClient(
            self.base_url, conn.login, conn.password, extra["tenant_id"], authority=extra.get("authority"),
            verify=_as_verify(extra.get("verify")), username=extra.get("username"), password=extra.get("password"),
            session=session, token_listener=mask_secret, **client_kwargs)
