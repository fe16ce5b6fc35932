"""OData literals and ``$filter`` building with correct escaping (DESIGN §9: a quote can't change a query).

Values are turned into OData literals (strings single-quoted with quotes doubled, GUIDs bare, datetimes
in UTC); column names are checked to be plain identifiers. URL encoding of the finished query (``&``,
``#``, ``%``, non-ASCII) is done once, when the request URL is built (:func:`query_string`).
"""

from __future__ import annotations

import datetime as dt
import math
import re
import urllib.parse
import uuid
from collections.abc import Iterable

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_OPERATORS = {"eq", "ne", "gt", "ge", "lt", "le"}


def odata_literal(value) -> str:
    """The OData literal for a Python value.

    :param value: ``None``, bool, int, float, str, :class:`uuid.UUID`, :class:`datetime.datetime`/``date``.
    :raises TypeError: for other types (and ValueError for NaN/infinite floats): never guessed.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} has no OData literal")
        return repr(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: give a timezone (UTC) so the filter is unambiguous")
        return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise TypeError(f"no OData literal for {type(value).__name__} value {value!r}")


def column(name: str) -> str:
    """Check that ``name`` is a plain column name (so it can't smuggle an expression) and return it."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ValueError(f"not a column name: {name!r}")
    return name


def compare(name: str, op: str, value) -> str:
    """``compare("lastname", "eq", "O'Brien")`` -> ``lastname eq 'O''Brien'``."""
    if op not in _OPERATORS:
        raise ValueError(f"unknown comparison operator {op!r}; use one of {sorted(_OPERATORS)}")
    return f"{column(name)} {op} {odata_literal(value)}"


def eq(name: str, value) -> str:
    """``name eq <literal>``."""
    return compare(name, "eq", value)


def isin(name: str, values: Iterable) -> str:
    """``name in (<literal>, ...)`` (OData 4.01 ``in``, accepted by Dataverse); one value becomes ``eq``
    because ``in ('x')`` reads as a parenthesised expression to some parsers."""
    items = [odata_literal(v) for v in values]
    if not items:
        raise ValueError(f"isin({name!r}) needs at least one value")
    if len(items) == 1:
        return f"{column(name)} eq {items[0]}"
    return f"{column(name)} in ({','.join(items)})"


def startswith(name: str, prefix: str) -> str:
    """``startswith(name, '<prefix>')``."""
    return f"startswith({column(name)},{odata_literal(prefix)})"


def and_(*clauses: str) -> str:
    """Join clauses with ``and`` (each parenthesised)."""
    return " and ".join(f"({c})" for c in clauses if c)


def or_(*clauses: str) -> str:
    """Join clauses with ``or`` (each parenthesised)."""
    return " or ".join(f"({c})" for c in clauses if c)


def key_segment(entity_set: str, key: str, value) -> str:
    """The URL path of a row addressed by an alternate key: ``contacts(mdsync_marketopersonid='a''b')``,
    percent-encoded so ``#``, ``%``, ``/``, ``?`` and non-ASCII stay part of the value."""
    return f"{column(entity_set)}({column(key)}={urllib.parse.quote(odata_literal(value), safe=chr(39))})"


def query_string(params: dict) -> str:
    """Encode query options (``$select``, ``$filter``...) with ``%20`` for spaces; None values are dropped."""
    return urllib.parse.urlencode({k: v for k, v in params.items() if v is not None}, quote_via=urllib.parse.quote,
                                  safe="$,")
