"""Reading a connection for the hooks: required fields, ``extra`` keys and their values, checked up front.

A wrong connection is a setup error no retry can fix, so it is a :class:`~mdsync.errors.ConfigError` naming
the connection id, the entry (``host``, ``extra.timeout``...) and what it should hold. Unknown ``extra`` keys
are refused too: ``HttpHook`` would send them to the service as HTTP headers, and a misspelt ``timout`` would
silently be ignored.
"""

from __future__ import annotations

import difflib
from typing import Any

from mdsync.errors import ConfigError

#: ``extra`` keys ``HttpHook`` itself understands (airflow.providers.http.hooks.http)
HTTP_HOOK_EXTRAS = ("timeout", "verify", "verify_ssl", "proxies", "proxy", "cert", "stream", "allow_redirects",
                    "max_redirects", "trust_env", "check_response", "srv_lookup")
DEFAULT_TIMEOUT = (10.0, 120.0)


def connection(hook, conn_id: str, env_name: str):
    """The Airflow connection, or a :class:`ConfigError` naming how to define it."""
    from airflow.exceptions import AirflowNotFoundException

    try:
        return hook.get_connection(conn_id)
    except AirflowNotFoundException:
        raise ConfigError(f"Airflow connection '{conn_id}' is not defined: set {env_name} or add it under Admin > "
                          "Connections (README: 'Pointing it at real Marketo and Dynamics')") from None


def require(conn_id: str, fields: list[tuple[str, Any, str]]) -> None:
    """Fail naming every required field that is empty: ``(name, value, what it holds)``."""
    missing = [f"{name} ({meaning})" for name, value, meaning in fields if not value]
    if missing:
        raise ConfigError(f"Airflow connection '{conn_id}' lacks {', '.join(missing)}")


def check_extra_keys(conn_id: str, extra: dict, own: tuple[str, ...]) -> None:
    """Refuse ``extra`` keys neither the hook nor ``HttpHook`` knows, suggesting the closest known one."""
    known = list(dict.fromkeys([*own, *HTTP_HOOK_EXTRAS]))
    unknown = [k for k in extra if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(f"Airflow connection '{conn_id}': unknown extra {', '.join(hints)}; the known keys are "
                          f"{', '.join(own)} (and HttpHook's {', '.join(HTTP_HOOK_EXTRAS)})")


def _seconds(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds > 0 else None


def timeout(conn_id: str, extra: dict) -> float | tuple[float, float]:
    """``extra.timeout``: seconds for every request (a number, or ``[connect, read]``); the default
    (10 s to connect, 120 s to read) when unset."""
    value = extra.get("timeout")
    if value is None or value == "":
        return DEFAULT_TIMEOUT
    if isinstance(value, (list, tuple)) and len(value) == 2:
        pair = tuple(_seconds(v) for v in value)
        if None not in pair:
            return pair  # type: ignore[return-value]
    elif _seconds(value) is not None:
        return _seconds(value)  # type: ignore[return-value]
    raise ConfigError(f"Airflow connection '{conn_id}': extra.timeout {value!r} is not a number of seconds or "
                      "[connect, read] seconds (e.g. 30 or [10, 120])")


def verify(conn_id: str, extra: dict, key: str = "verify") -> bool | str:
    """TLS verification from ``extra``: true / false, or the path of a CA bundle."""
    value = extra.get(key, extra.get("verify_ssl"))
    if value is None or value == "":
        return True
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        return value
    raise ConfigError(f"Airflow connection '{conn_id}': extra.{key} {value!r} is not true, false or the path "
                      "of a CA bundle")


def positive(conn_id: str, extra: dict, key: str, kind: type) -> int | float | None:
    """A positive ``int`` or ``float`` setting from ``extra`` (None when unset)."""
    if key not in extra:
        return None
    value = extra[key]
    try:
        number = kind(value)
        ok = not isinstance(value, bool) and number > 0 and (kind is not int or float(value) == number)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"Airflow connection '{conn_id}': extra.{key} {value!r} is not a positive "
                          f"{'whole number' if kind is int else 'number'}")
    return number
