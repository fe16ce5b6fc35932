"""Lead changes, deleted and merged leads, and custom activities (activities.md, paging-tokens.md)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Iterable

import pandas as pd

from .frames import json_value, records_of, typed_frame

CHANGE_COLUMNS = ["id", "marketo_guid", "lead_id", "activity_date", "activity_type_id", "field", "field_id",
                  "old_value", "new_value", "reason", "source"]
DELETED_COLUMNS = ["id", "marketo_guid", "lead_id", "activity_date", "activity_type_id", "primary_attribute_value"]
ACTIVITY_TYPES = {"id": "integer", "lead_id": "integer", "activity_type_id": "integer", "field_id": "integer",
                  "activity_date": "datetime"}
#: Marketo activity types: Merge Leads (the winner's), Delete Lead (each deleted or merged-away lead's)
MERGE_LEADS, DELETE_LEAD = 32, 37
MERGE_COLUMNS = ["id", "marketo_guid", "winner_id", "loser_id", "activity_date"]
MERGE_TYPES = {"id": "integer", "winner_id": "integer", "loser_id": "integer", "activity_date": "datetime"}


def merge_ids(value) -> list[int]:
    """The losers a Merge Leads activity names in its ``Merge IDs`` attribute (``"[12,34]"``, or one id)."""
    text = str(value if value is not None else "").strip().strip("[]")
    return [int(part) for part in (p.strip() for p in text.split(",")) if part.isdigit()]


def _attr(activity: dict, *names: str):
    for a in activity.get("attributes") or []:
        if a.get("name") in names:
            return a.get("value")
    return None


class ActivitiesMixin:
    """Activity operations of :class:`~mdsync.marketo.client.MarketoClient`."""

    def get_paging_token(self, since: datetime) -> str:
        """A date-based paging token for activities at or after ``since`` (naive datetimes are UTC)."""
        body = self._get("/rest/v1/activities/pagingtoken.json", {"sinceDatetime": json_value(since)})
        return body["nextPageToken"]

    def _activity_pages(self, path: str, token: str, params: dict, max_pages: int | None = None
                        ) -> tuple[list[dict], str, bool]:
        """Every activity from ``token`` to the end (or ``max_pages`` pages); returns them, the token to continue
        from next time, and whether more remained."""
        out: list[dict] = []
        pages = 0
        while True:
            body = self._get(path, {**params, "nextPageToken": token, "batchSize": 300})
            out.extend(body.get("result") or [])
            token = body.get("nextPageToken") or token
            pages += 1
            # Marketo may return fewer than 300 items with moreResult true: only moreResult ends the walk.
            if not body.get("moreResult"):
                return out, token, False
            if max_pages is not None and pages >= max_pages:
                return out, token, True

    def get_lead_changes(self, paging_token: str, fields: Iterable[str], max_pages: int | None = None
                         ) -> tuple[pd.DataFrame, str]:
        """Data Value Change (13) and New Lead (12) activities for ``fields``, from the token to the end.

        :param max_pages: stop after this many pages (300 activities each); the frame's
            ``attrs["more_result"]`` then says whether activities remained (the caller may read the window
            in bulk instead).
        :returns: one row per field change (New Lead rows have no field) and the next paging token to store.
        """
        activities, token, more = self._activity_pages("/rest/v1/activities/leadchanges.json", paging_token,
                                                       {"fields": ",".join(fields)}, max_pages)
        rows = []
        for act in activities:
            base = {"id": act.get("id"), "marketo_guid": act.get("marketoGUID"), "lead_id": act.get("leadId"),
                    "activity_date": act.get("activityDate"), "activity_type_id": act.get("activityTypeId"),
                    "reason": _attr(act, "Reason"), "source": _attr(act, "Source", "Source Type")}
            changes = act.get("fields") or []
            if not changes:
                rows.append(base)
            for ch in changes:
                rows.append({**base, "field": ch.get("name"), "field_id": ch.get("id"),
                             "old_value": ch.get("oldValue"), "new_value": ch.get("newValue")})
        frame = typed_frame(rows, CHANGE_COLUMNS, ACTIVITY_TYPES)
        frame.attrs["more_result"] = more
        return frame, token

    def get_deleted_leads(self, paging_token: str) -> tuple[pd.DataFrame, str]:
        """Delete Lead activities from the token to the end, and the next paging token."""
        activities, token, _ = self._activity_pages("/rest/v1/activities/deletedleads.json", paging_token, {})
        rows = [{"id": a.get("id"), "marketo_guid": a.get("marketoGUID"), "lead_id": a.get("leadId"),
                 "activity_date": a.get("activityDate"), "activity_type_id": a.get("activityTypeId"),
                 "primary_attribute_value": a.get("primaryAttributeValue")} for a in activities]
        return typed_frame(rows, DELETED_COLUMNS, ACTIVITY_TYPES), token

    def get_merges_and_deletions(self, paging_token: str) -> tuple[pd.DataFrame, pd.DataFrame, str]:
        """Merge Leads (32) and Delete Lead (37) activities from the token to the end, in one series of Get Lead
        Activities calls (one call a page, as Get Deleted Leads would cost alone).

        A merge deletes its losers, so each loser also has a Delete Lead activity: callers tell merged-away
        persons from deleted ones with the merges frame.

        :returns: ``(deleted, merges, next token)``: the Delete Lead activities as :meth:`get_deleted_leads`
            returns them; one row per merged-away lead (``id``, ``marketo_guid`` of the activity, ``winner_id``,
            ``loser_id``, ``activity_date``), in activity order.
        """
        activities, token, _ = self._activity_pages("/rest/v1/activities.json", paging_token,
                                                    {"activityTypeIds": f"{MERGE_LEADS},{DELETE_LEAD}"})
        deleted = [{"id": a.get("id"), "marketo_guid": a.get("marketoGUID"), "lead_id": a.get("leadId"),
                    "activity_date": a.get("activityDate"), "activity_type_id": a.get("activityTypeId"),
                    "primary_attribute_value": a.get("primaryAttributeValue")}
                   for a in activities if a.get("activityTypeId") == DELETE_LEAD]
        merges = [{"id": a.get("id"), "marketo_guid": a.get("marketoGUID"), "winner_id": a.get("leadId"),
                   "loser_id": loser, "activity_date": a.get("activityDate")}
                  for a in activities if a.get("activityTypeId") == MERGE_LEADS
                  for loser in merge_ids(_attr(a, "Merge IDs", "Merge Ids"))]
        return (typed_frame(deleted, DELETED_COLUMNS, ACTIVITY_TYPES), typed_frame(merges, MERGE_COLUMNS, MERGE_TYPES),
                token)

    def get_activities(self, paging_token: str, activity_type_ids: Iterable[int],
                       lead_ids: Iterable[int] | None = None) -> tuple[list[dict], str]:
        """Raw activities of up to 10 types (optionally for up to 30 leads), from the token to the end."""
        params = {"activityTypeIds": ",".join(str(int(t)) for t in activity_type_ids)}
        if lead_ids is not None:
            params["leadIds"] = ",".join(str(int(i)) for i in lead_ids)
        return self._activity_pages("/rest/v1/activities.json", paging_token, params)[:2]

    # ------------------------------------------------------------------ custom activities
    def ensure_custom_activity_type(self, api_name: str, name: str, primary_attribute: dict,
                                    attributes: Iterable[dict] = (), *, description: str = "",
                                    trigger_name: str | None = None, filter_name: str | None = None) -> int:
        """The id of the approved custom activity type ``api_name``, creating and approving it when missing.

        :param api_name: alphanumeric with at least one letter (Marketo's rule), e.g. ``dynamicsSyncError``.
        :param primary_attribute: ``{"apiName", "name", "dataType"?, "description"?}``.
        :param attributes: secondary attributes, same keys (``dataType`` required); missing ones are added.
        """
        wanted = [dict(a) for a in attributes]
        types = self._get("/rest/v1/activities/external/types.json").get("result") or []
        current = next((t for t in types if t.get("apiName") == api_name), None)
        if current is None:
            body = {"apiName": api_name, "name": name, "description": description,
                    "triggerName": trigger_name or f"Has {name}", "filterName": filter_name or f"Had {name}",
                    "primaryAttribute": dict(primary_attribute)}
            current = self._post_json("/rest/v1/activities/external/type.json", body)["result"][0]
            existing: set[str] = set()
        else:
            described = self._get(f"/rest/v1/activities/external/type/{api_name}/describe.json",
                                  {"draft": "true" if current.get("status") != "approved" else None})["result"][0]
            existing = {a["apiName"] for a in described.get("attributes") or []}
        missing = [a for a in wanted if a["apiName"] not in existing]
        if missing:
            self._post_json(f"/rest/v1/activities/external/type/{api_name}/attributes/create.json",
                            {"attributes": missing})
        if missing or current.get("status") != "approved":
            current = self._call("POST", f"/rest/v1/activities/external/type/{api_name}/approve.json")["result"][0]
        return int(current["id"])

    def add_custom_activities(self, records) -> pd.DataFrame:
        """Add custom activities (300 per call). Each record: ``leadId``, ``activityDate``, ``activityTypeId``,
        ``primaryAttributeValue`` and ``attributes`` (a list of ``{"apiName", "value"}`` or a mapping).

        :returns: one row per record, in order: ``seq``, ``id``, ``marketo_guid``, ``status`` (added/skipped),
            ``reason_code``, ``reason_message``.
        """
        rows = []
        for rec in records_of(records):
            attrs = rec.get("attributes") or []
            if isinstance(attrs, dict):
                attrs = [{"apiName": k, "value": json_value(v)} for k, v in attrs.items()]
            rec["attributes"] = attrs
            rec["activityDate"] = rec.get("activityDate") or json_value(datetime.now(timezone.utc))
            rows.append(rec)
        return self._write_batches("/rest/v1/activities/external.json", rows, {}, reason_key="errors")
