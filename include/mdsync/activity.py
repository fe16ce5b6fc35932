"""The activity log: one readable line per record decision, in the task log and in the state store.

Actions: ``create``, ``update``, ``link``, ``unlink``, ``collision``, ``skip``, ``error``, ``ambiguous``.
``python -m mdsync.activity --email ann@example.com`` (``make activity EMAIL=…``) prints a person's history.
"""

from __future__ import annotations

import argparse
import logging
import sys

import pandas as pd

COLUMNS = [
    "entity_type", "person_id", "email", "dynamics_type", "dynamics_id", "action", "field", "old_value",
    "new_value", "winner", "detail",
]


def activity_frame(rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
    """Rows (dicts or a frame) -> an activity frame with every column (missing ones empty)."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    return frame.reindex(columns=COLUMNS).astype(object).where(lambda f: f.notna(), None)


def _short(value, limit: int = 80) -> str:
    if _blank(value):
        return "(empty)"
    text = repr(str(value))
    return text if len(text) <= limit else text[: limit - 4] + "…'"


def _blank(value) -> bool:
    return value is None or (not isinstance(value, str) and pd.isna(value)) or value == ""


def format_line(row: dict) -> str:
    """One human-readable line for an activity row."""
    row = {k: (None if _blank(v) else v) for k, v in row.items()}
    who = f"person {row.get('person_id')}" if row.get("person_id") is not None else "no person"
    if row.get("email"):
        who += f" <{row['email']}>"
    if row.get("dynamics_id"):
        who += f" ⇄ {row.get('dynamics_type') or 'record'} {row['dynamics_id']}"
    action = str(row.get("action") or "?")
    text = f"{action.upper():<9} {who}"
    if row.get("field"):
        text += f" | {row['field']}"
        if action in ("update", "collision", "error", "skip"):
            text += f": {_short(row.get('old_value'))} -> {_short(row.get('new_value'))}"
    if row.get("winner"):
        text += f" | winner: {row['winner']}"
    if row.get("detail"):
        text += f" | {row['detail']}"
    return text


def log_activity(frame: pd.DataFrame, logger: logging.Logger, limit: int | None = None) -> None:
    """Write one line per activity row to ``logger`` (errors at WARNING, the rest at INFO)."""
    rows = frame.to_dict("records")
    shown = rows if limit is None else rows[:limit]
    for row in shown:
        level = logging.WARNING if row.get("action") in ("error", "ambiguous") else logging.INFO
        logger.log(level, "%s", format_line(row))
    if limit is not None and len(rows) > limit:
        logger.info("... and %d more activity rows (all are in the state store's activity table)", len(rows) - limit)


def main(argv: list[str] | None = None) -> int:
    from mdsync.state import open_store

    parser = argparse.ArgumentParser(prog="python -m mdsync.activity", description="Print a person's sync history.")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--email", help="the person's email (case-insensitive; also finds rows under older emails)")
    who.add_argument("--person", type=int, help="the Marketo person id")
    who.add_argument("--dynamics-id", help="the Dynamics lead or contact id")
    who.add_argument("--run", help="an Airflow run id: everything that run did")
    parser.add_argument("--state-url", help="state store URL (default: $MDSYNC_STATE_URL or the Airflow home's SQLite)")
    args = parser.parse_args(argv)
    store = open_store(args.state_url)
    history = store.activity(email=args.email, person_id=args.person, dynamics_id=args.dynamics_id, run_id=args.run)
    if history.empty:
        print(f"no activity found in {store!r} for {args.email or args.person or args.dynamics_id or args.run}")
        return 1
    for row in history.to_dict("records"):
        print(f"{row['at']:%Y-%m-%d %H:%M:%S}  {row['run_id'] or '-':<40}  {format_line(row)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
