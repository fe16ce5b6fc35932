"""Value conversion between Marketo's JSON representation and the sandbox's SQLite columns.

Validation mirrors what Marketo checks on Sync Leads: type (record-level 1001), length and email format.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timezone

from .fields import LeadField

# Marketo accepts ASCII addresses only (leads.md "only ASCII characters are supported in the email address").
_EMAIL_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


class InvalidValue(ValueError):
    """A value Marketo would refuse for a field; ``code`` and ``message`` are the record-level reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def utc_now() -> datetime:
    """The current time at Marketo's one-second resolution."""
    return datetime.now(timezone.utc).replace(microsecond=0)


def format_datetime(value: datetime) -> str:
    """ISO 8601 in UTC with a ``Z``, the form the sandbox stores and returns."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_datetime(text: str) -> datetime:
    """Parse an ISO 8601 datetime (``Z``, ``+hh:mm`` or ``+hhmm`` offsets; no offset or a bare date is UTC)."""
    parsed = datetime.fromisoformat(text.strip())  # Python 3.11 reads every ISO 8601 form Marketo uses
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def _type_error(value, field: LeadField) -> InvalidValue:
    return InvalidValue("1001", f"Invalid value '{value}'. Required of type '{field.data_type}'")


def to_db(field: LeadField, value):
    """Validate a JSON value for ``field`` and convert it to its SQLite form (``None`` clears the field).

    :raises InvalidValue: with Marketo's record-level code and message.
    """
    if value is None:
        return None
    t = field.data_type
    if t in ("integer", "score", "percent"):
        if isinstance(value, bool):
            raise _type_error(value, field)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
        if isinstance(value, str) and not value.strip():
            return None
        raise _type_error(value, field)
    if t in ("float", "currency"):
        if isinstance(value, bool):
            raise _type_error(value, field)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            if not value.strip():
                return None
            try:
                return float(value)
            except ValueError:
                raise _type_error(value, field) from None
        raise _type_error(value, field)
    if t == "boolean":
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int) and value in (0, 1):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return int(value.strip().lower() in _TRUE)
        raise _type_error(value, field)
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise _type_error(value, field)
    text = str(value)
    if t == "datetime":
        if not text.strip():
            return None
        try:
            return format_datetime(parse_datetime(text))
        except ValueError:
            raise _type_error(value, field) from None
    if t == "date":
        if not text.strip():
            return None
        try:
            return date.fromisoformat(text.strip()[:10]).isoformat()
        except ValueError:
            raise _type_error(value, field) from None
    if text == "":
        return None
    if t == "email":
        if not text.isascii() or not _EMAIL_RE.match(text):
            raise InvalidValue("1001", f"Invalid value '{text}'. Required of type 'email'")
    if field.length is not None and len(text) > field.length:
        raise InvalidValue(
            "1001",
            f"Invalid value for field '{field.name}': length {len(text)} exceeds the maximum length {field.length}",
        )
    return text


def from_db(field: LeadField, value):
    """Convert a stored value back to Marketo's JSON representation."""
    if value is None:
        return None
    if field.data_type == "boolean":
        return bool(value)
    return value


def to_text(field: LeadField, value) -> str | None:
    """A stored value as text, the form Data Value Change activities and CSV exports carry."""
    if value is None:
        return None
    if field.data_type == "boolean":
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and field.data_type not in ("float", "currency"):
        return str(int(value))
    return str(value)
