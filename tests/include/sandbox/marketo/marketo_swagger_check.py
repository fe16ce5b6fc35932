"""Validate sandbox responses against the official Marketo Swagger spec (reference/marketo/swagger-mapi.json)."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from jsonschema import Draft4Validator

SPEC = Path(__file__).resolve().parents[4].parent / "shared" / "reference" / "marketo" / "swagger-mapi.json"


def _loosen(node):
    """Swagger generated from Java types: ``type: object`` without properties is ``java.lang.Object``.

    It stands for any JSON value (e.g. ``Attribute.value`` holds strings and numbers in every documented
    example), so it becomes the empty schema. Everything else is kept exactly as specified.
    """
    if isinstance(node, dict):
        if node.get("type") == "object" and not ({"properties", "additionalProperties", "$ref", "items"} & set(node)):
            return {k: v for k, v in node.items() if k not in ("type",)}
        return {k: _loosen(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_loosen(v) for v in node]
    return node


@lru_cache(maxsize=1)
def _spec() -> dict:
    return json.loads(SPEC.read_text())


@lru_cache(maxsize=1)
def _routes() -> list[tuple[str, re.Pattern, dict]]:
    out = []
    for path, ops in _spec()["paths"].items():
        pattern = re.compile("^" + re.sub(r"\\{[^}]+\\}", r"[^/]+", re.escape(path)) + "$")
        for method, op in ops.items():
            schema = op.get("responses", {}).get("200", {}).get("schema")
            if schema:
                out.append((method.upper(), pattern, schema))
    return out


def schema_for(method: str, path: str) -> dict | None:
    """The 200-response schema of the Swagger operation matching ``method path`` (None when not in the spec)."""
    for m, pattern, schema in _routes():
        if m == method and pattern.match(path):
            return schema
    return None


def _documented_exception(path: str, body, error) -> bool:
    """Where the spec and the developer docs disagree, the docs' documented response wins.

    Only one case: Add Custom Activities returns a skipped record as just ``status`` and ``errors``
    (activities.md example), while the Swagger ``CustomActivity`` requires ``id``, ``leadId``... as for an
    added one. A rejected activity has no id to give.
    """
    if path != "/rest/v1/activities/external.json" or error.validator != "required" or len(error.absolute_path) != 2:
        return False
    item = body["result"][error.absolute_path[1]]
    return item.get("status") == "skipped" and item.get("errors")


def validate_response(method: str, path: str, body) -> list[str]:
    """Schema violations of one response body (empty when it conforms)."""
    schema = schema_for(method, path)
    if schema is None:
        return [f"{method} {path} is not an operation of the Swagger spec"]
    root = {**schema, "definitions": _loosen(_spec()["definitions"])}
    return [f"{method} {path}: {'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in Draft4Validator(root).iter_errors(body) if not _documented_exception(path, body, e)]
