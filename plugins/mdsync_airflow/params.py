"""Run parameters of a DAG run, checked before any work: a typo or a value of the wrong kind is one clear line.

Airflow passes every key of a run's ``conf`` to the tasks, declared or not, so ``{"person_id": [12]}`` (for
``person_ids``) would silently do nothing. Here the DAG's declared params are the only valid keys; an unknown
key is refused with the list of valid ones (and the closest, when it looks like a typo), and every value is
checked against its param's schema (Airflow does so when a run is triggered, but not for every way a run can
be made). Problems are :class:`~mdsync.errors.ConfigError` (no retry fixes them).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from mdsync.errors import ConfigError


def _schema(declared: Mapping, key: str) -> dict:
    getter = getattr(declared, "get_param", None)
    param = getter(key) if getter is not None else declared.get(key)
    schema = getattr(param, "schema", param)
    return schema if isinstance(schema, dict) else {}


def expected(schema: dict) -> str:
    """What a value of ``schema`` looks like, in words (``a list of whole numbers, e.g. [1234]``)."""
    if "enum" in schema:
        return "one of " + ", ".join(repr(v) for v in schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "boolean":
        return "true or false"
    if kind == "integer":
        return "a whole number"
    if kind == "number":
        return "a number"
    if kind == "string":
        return "a string"
    if kind == "array":
        items = schema.get("items") or {}
        if items.get("type") == "integer":
            return "a list of whole numbers, e.g. [1234, 5678]"
        return "a list" + (f" of {expected(items)} values" if items else "")
    if kind == "object":
        return "a JSON object"
    return "a value matching the parameter's schema"


def validate_conf(conf: Any, declared: Mapping) -> None:
    """Refuse unknown keys and values that do not fit their param.

    :param conf: the run's ``conf`` as given (``dag_run.conf``).
    :param declared: the DAG's params (``dag.params``: a ``ParamsDict`` or a plain mapping of schemas).
    :raises ConfigError: one line naming the parameter and the problem.
    """
    if conf is None:
        return
    if not isinstance(conf, Mapping):
        raise ConfigError(f"run parameters must be a JSON object such as {{\"dry_run\": true}}, got "
                          f"{type(conf).__name__} {conf!r}")
    valid = list(declared.keys())
    unknown = [k for k in conf if k not in valid]
    if unknown:
        named = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            named.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(f"unknown run parameter{'s' if len(unknown) > 1 else ''} {', '.join(named)}; the valid "
                          f"ones are {', '.join(valid)}")
    from jsonschema import FormatChecker, validators

    for key, value in conf.items():
        schema = _schema(declared, key)
        if not schema:
            continue
        validator = validators.validator_for(schema)(schema, format_checker=FormatChecker())
        error = next(iter(sorted(validator.iter_errors(value), key=lambda e: list(e.path))), None)
        if error is not None:
            where = key + "".join(f"[{p}]" for p in error.path)
            raise ConfigError(f"run parameter {where}: {error.instance!r} is not valid, expected "
                              f"{expected(error.schema if error.path else schema)} ({key} = {value!r})")


def person_ids(value: Any) -> list[int]:
    """``person_ids`` as Marketo lead ids (positive whole numbers; a whole float such as 12.0 is 12)."""
    if value in (None, ""):
        return []
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"run parameter person_ids: {value!r} is not valid, expected a list of whole numbers, "
                          "e.g. [1234, 5678]")
    ids = []
    for i, v in enumerate(value):
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and float(v).is_integer() and v >= 1
        if not ok:
            raise ConfigError(f"run parameter person_ids[{i}]: {v!r} is not a Marketo person id (a positive whole "
                              f"number, e.g. 1234)")
        ids.append(int(v))
    return list(dict.fromkeys(ids))


def run_params(context: Mapping[str, Any]) -> dict[str, Any]:
    """The run's parameters (declared defaults merged with its ``conf``), after :func:`validate_conf`."""
    dag = context.get("dag")
    dag_run = context.get("dag_run")
    declared = getattr(dag, "params", None)
    if declared is not None and dag_run is not None:
        validate_conf(getattr(dag_run, "conf", None), declared)
    params = dict(context.get("params") or {})
    params["person_ids"] = person_ids(params.get("person_ids"))
    return params
