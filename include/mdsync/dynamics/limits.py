"""How the Dataverse client paces itself against the service protection limits (api-limits.md).

Dataverse limits each user, per web server, to 6,000 requests and 20 minutes of execution time per sliding
5 minutes, and to 52 concurrent requests; past them it answers 429 with ``Retry-After``. The client:

- caps the requests it has in flight itself (``max_concurrent``, default 8; bulk writes send
  ``max_parallel_requests`` at once, lowered to the service's ``x-ms-dop-hint``, see :mod:`.writes`);
- with ``MDSYNC_LIMITS_URL`` set, also keeps the deployment as a whole under a shared window of
  ``MDSYNC_DYNAMICS_REQUESTS_PER_WINDOW`` (5,000) requests per ``MDSYNC_DYNAMICS_WINDOW_SECONDS`` (300) and
  ``MDSYNC_DYNAMICS_MAX_CONCURRENT`` (40) requests in flight per org and user, through Redis
  (:mod:`mdsync.limits`, keys ``mdsync:limits:dynamics:<org host>:<client id or hashed user name>``);
- on a 429, waits its ``Retry-After`` and pauses every other request of the client (of the deployment, when
  shared) for as long, since the service refuses them all until then and a client that keeps sending
  lengthens the penalty.

The execution-time limit is not counted on our side (the service answers 429 when it is reached, which the
client waits out as above).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from mdsync import limits as shared


def instance_name(org_url: str, client_id: str, username: str | None) -> str:
    """``<org host>:<client id>``, or ``<org host>:user-<hash>`` for the username/password grant: the service
    limits each user, and a user name is no business of Redis."""
    host = (urlsplit(org_url).netloc or org_url).lower()
    return f"{host}:{shared.user_tag(username) if username else client_id.lower()}"


def client_limits(org_url: str, client_id: str, username: str | None, max_concurrent: int,
                  url=shared.FROM_SETTINGS) -> shared.CallLimits:
    """The call limits of one :class:`~mdsync.dynamics.DynamicsClient`.

    Per process (no Redis URL): ``max_concurrent`` requests in flight from the client, as before. Shared: the
    client's own ``max_concurrent`` plus the deployment's window and cap from the settings.
    """
    from mdsync.settings import Settings

    url, lease_s = shared.configured(url)
    instance = instance_name(org_url, client_id, username)
    if not url:
        return shared.CallLimits("dynamics", instance, max_calls_per_window=None, window_ms=None,
                                 max_concurrent=max_concurrent)
    settings = Settings.from_env()
    return shared.CallLimits("dynamics", instance, max_calls_per_window=settings.dynamics_requests_per_window,
                             window_ms=shared.widened_window_ms(settings.dynamics_window_seconds),
                             max_concurrent=settings.dynamics_max_concurrent, local_concurrent=max_concurrent,
                             url=url, lease_s=lease_s)
