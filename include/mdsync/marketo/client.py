"""Marketo Engage REST client: auth, envelope checks, retries, limits, paging and batching.

Marketo answers most errors with HTTP 200 and ``success: false`` (error-codes.md), so every response's
envelope is checked, the identity service's too. Transient failures (606, 615, 604, 608, 611, 614, 713, 5xx,
time-outs, refused connections) are retried with exponential backoff (tenacity) and end in
:class:`~mdsync.errors.ServiceUnavailable` when they persist; quota exhaustion (607) stops at once with
:class:`~mdsync.errors.QuotaExhausted` naming when the quota resets; refused credentials
(:class:`~mdsync.errors.AuthError`), missing permissions (603, :class:`~mdsync.errors.AccessDenied`), request
errors, an unknown host name and an untrusted TLS certificate are never retried. Every error names the
connection (id and host). Record-level outcomes (created, updated, skipped with reasons) come back as data
in frames.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterable, Iterator
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import pandas as pd
import requests
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from mdsync.errors import (AccessDenied, AuthError, QuotaExhausted, ServiceError, ServiceUnavailable,
                           connection_label, transport_problem)
from mdsync.limits import FROM_SETTINGS, LimitsUnavailable

from .activities import ActivitiesMixin
from .auth import TokenManager
from .bulk import BulkExportMixin
from .imports import BulkImportMixin
from .frames import json_value, records_of, typed_frame
from .limits import shared_limits

log = logging.getLogger("mdsync.marketo")

BATCH = 300
#: losers per Merge Leads call (leads.md: more than 25 ids are refused with 1080)
MERGE_BATCH = 25
MAX_URI = 8000  # Marketo's limit is 8 KB; keep a little room for the host part
MAX_BODY = 1_000_000  # Marketo's limit is 1 MB per request body
# Response-level codes worth retrying: rate (606), concurrency (615), time-out (604), temporarily unavailable
# (608), system error (611), subscription temporarily unreachable (614), transient (713); plus HTTP 5xx and
# transport errors.
RETRY_CODES = {"604", "606", "608", "611", "614", "615", "713"}
AUTH_CODES = {"601", "602"}
# Request-level codes with which Get Leads by Filter Type refuses a value in filterValues (a type mismatch 1001,
# invalid data 1003): the chunk is bisected to find the value.
INVALID_VALUE_CODES = {"1001", "1003"}
REFUSED_COLUMNS = ["value", "code", "message"]
NOT_SENT = "not-sent"
CENTRAL = ZoneInfo("America/Chicago")


class TransientError(Exception):
    """A failure worth retrying (rate/concurrency limits, 5xx, transport errors); ``message`` is readable (a
    transport failure names the host and what went wrong, never the library's repr)."""

    def __init__(self, code: str, message: str, request: str, status: int | None = None) -> None:
        super().__init__(f"{code} {message} [{request}]")
        self.code = code
        self.message = message
        self.request = request
        self.status = status


def quota_reset_time(now: datetime | None = None) -> datetime:
    """When Marketo's daily quota resets: the next midnight US Central time (rest-api.md, error-codes.md 607:
    "resets daily at 12:00AM CST"), in UTC."""
    now = (now or datetime.now(timezone.utc)).astimezone(CENTRAL)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=CENTRAL)
    return midnight.astimezone(timezone.utc)


def quota_stop(code: str, message: str, request: str, where: str | None = None) -> QuotaExhausted:
    """The 607 error: when the quota resets (US Central midnight, in both Central and UTC time) and that nothing
    is lost by stopping."""
    resets = quota_reset_time()
    local = resets.astimezone(CENTRAL)
    return QuotaExhausted(
        "marketo", code, f"{message}: the subscription's daily API quota is used up", request=request,
        resets_at=resets, where=where,
        next_step=f"the run stops now and is not retried; the quota resets at midnight US Central time "
                  f"({local:%Y-%m-%d %H:%M %Z} = {resets.isoformat()}). Nothing is lost: no watermark moved, so "
                  "the first run after the reset picks up this window. Admin > Web Services shows the quota; "
                  "your Marketo account manager can raise it")


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _reason_columns(reasons: list[dict] | None) -> tuple[str | None, str | None]:
    if not reasons:
        return None, None
    return ",".join(str(r.get("code")) for r in reasons), "; ".join(str(r.get("message")) for r in reasons)


RESULT_COLUMNS = ["seq", "id", "status", "reason_code", "reason_message"]
_SHOWN = 20
RESULT_TYPES = {"seq": "integer", "id": "integer"}


class MarketoClient(ActivitiesMixin, BulkExportMixin, BulkImportMixin):
    """Client of one Marketo instance's REST API.

    :param base_url: REST base URL, ``https://<munchkin>.mktorest.com`` (identity, ``/rest`` and ``/bulk`` below it).
    :param client_id: / :param client_secret: LaunchPoint custom service credentials.
    :param session: a ``requests.Session`` to send calls with (one is created when None).
    :param verify: TLS verification: True, False or a CA bundle path (passed per request, so
        ``REQUESTS_CA_BUNDLE`` cannot override it).
    :param max_calls_per_window: / :param window_s: client-side rate window (Marketo: 100 per 20 s).
    :param max_concurrent: client-side concurrency cap (Marketo: 10).
    :param limits_url: ``redis://host:port/db`` to share the rate window and the concurrency cap with every
        process using that Redis, None to keep them in this process; by default ``MDSYNC_LIMITS_URL``.
    :param timeout: (connect, read) timeout in seconds (one number for both).
    :param token_listener: called with every new access token (the Airflow hook passes ``mask_secret``).
    :param max_attempts: attempts per call for retryable failures.
    :param retry_initial_s: / :param retry_max_s: exponential backoff bounds (with jitter).
    :param connection_id: the Airflow connection the client was built from, named in every error.
    """

    service = "marketo"

    def __init__(self, base_url: str, client_id: str, client_secret: str, *, session: requests.Session | None = None,
                 verify=True, max_calls_per_window: int = 100, window_s: float = 20, max_concurrent: int = 10,
                 timeout=(10, 120), token_listener: Callable[[str], None] | None = None, max_attempts: int = 8,
                 retry_initial_s: float = 1.0, retry_max_s: float = 30.0, connection_id: str | None = None,
                 limits_url=FROM_SETTINGS) -> None:
        if not base_url or "://" not in base_url:
            raise ValueError(f"Marketo base URL must include the scheme, e.g. https://123-ABC-456.mktorest.com: "
                             f"got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.connection_id = connection_id
        #: how errors name this client's connection
        self.where = connection_label("marketo", connection_id, self.base_url)
        self.session = session or requests.Session()
        self.verify = verify
        self.timeout = timeout
        #: the instance's call limits, shared by every client of this process for the instance
        self.limits = shared_limits(self.base_url, max_calls_per_window, window_s, max_concurrent, limits_url)
        self.max_attempts = max_attempts
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.calls_made = 0
        #: seconds this client's calls waited for the limits (progress lines and the rate-limit waits metric)
        self.waited_s = 0.0
        self._waited_lock = threading.Lock()
        self._describe: pd.DataFrame | None = None
        self._describe_lock = threading.Lock()
        self.auth = TokenManager(self.base_url, client_id, client_secret, self._send, token_listener,
                                 envelope_error=self._envelope_error, where=self.where)

    # ------------------------------------------------------------------ transport
    def _send(self, method: str, path: str, **kwargs) -> requests.Response:
        """One HTTP call within the shared limits; transport failures become :class:`TransientError`."""
        request = f"{method} {path}"
        try:
            held = self.limits.acquire()
        except LimitsUnavailable as exc:  # shared limits fail closed: no call without them; backed off and retried
            raise TransientError("limits", str(exc), request) from None
        with self._waited_lock:
            self.waited_s += held.waited_s
        try:
            started = time.monotonic()
            resp = self.session.request(method, self.base_url + path, timeout=self.timeout, verify=self.verify,
                                        **kwargs)
        except (requests.ConnectionError, requests.Timeout) as exc:
            self.calls_made += 1
            reason, retryable = transport_problem(exc, self.base_url, self.timeout)
            if not retryable:  # a host name that does not resolve, an untrusted certificate: setup, not luck
                raise ServiceError(self.service, "transport", reason, request=request, where=self.where,
                                   next_step="check the connection's host (the REST base URL, Admin > Web "
                                             "Services) and extra.verify (True, False or a CA bundle path); "
                                             "not retried") from None
            raise TransientError("transport", reason, request) from None
        finally:
            self.limits.release(held)
        self.calls_made += 1
        log.debug("Marketo %s -> HTTP %s in %.0f ms", request, resp.status_code, (time.monotonic() - started) * 1000)
        if resp.status_code >= 500:
            raise TransientError(str(resp.status_code), f"HTTP {resp.status_code} {resp.reason}", request,
                                 resp.status_code)
        return resp

    def _envelope_error(self, code: str, message: str, request: str) -> Exception:
        """The exception for a response-level error code (the identity service's envelope too)."""
        if code in RETRY_CODES:
            return TransientError(code, message, request)
        if code == "607":
            return quota_stop(code, message, request, self.where)
        if code == "603":
            return AccessDenied(self.service, code, message, request=request, where=self.where,
                                next_step=f"{_next_step(code)}; not retried")
        return ServiceError(self.service, code, message, request=request, where=self.where, next_step=_next_step(code))

    def _call_once(self, method: str, path: str, *, raw: bool = False, **kwargs):
        reauthenticated = False
        while True:
            token = self.auth.token()
            headers = {**kwargs.pop("headers", {}), "Authorization": f"Bearer {token}"}
            resp = self._send(method, path, headers=headers, **kwargs)
            kwargs["headers"] = {k: v for k, v in headers.items() if k != "Authorization"}
            request = f"{method} {path}"
            if resp.status_code in (413, 414):
                raise ServiceError(self.service, str(resp.status_code), resp.reason or "request too large",
                                   request=request, status=resp.status_code, where=self.where,
                                   next_step="this is a client bug: requests are split to stay under 1 MB / 8 KB")
            if raw and resp.status_code in (200, 206):
                return resp
            if raw:
                raise ServiceError(self.service, str(resp.status_code), resp.text[:300], request=request,
                                   status=resp.status_code)
            try:
                body = resp.json()
            except ValueError:
                raise ServiceError(self.service, None, f"malformed response (not JSON): {resp.text[:200]!r}",
                                   request=request, status=resp.status_code, retryable=True) from None
            if not isinstance(body, dict) or "success" not in body:
                raise ServiceError(self.service, None, f"malformed response (no envelope): {str(body)[:200]}",
                                   request=request, status=resp.status_code, retryable=True)
            if body["success"]:
                return body
            errors = body.get("errors") or [{"code": None, "message": "success: false without errors"}]
            code, message = str(errors[0].get("code")), str(errors[0].get("message"))
            if code in AUTH_CODES:
                self.auth.invalidate(token)
                if not reauthenticated:
                    reauthenticated = True
                    log.info("Marketo %s on %s: re-authenticating once", code, request)
                    continue
                raise AuthError(self.service, code, message, request=request,
                                next_step="a new access token was refused too; check that the LaunchPoint custom "
                                          "service and its API-only user are active (Admin > LaunchPoint); "
                                          "not retried")
            raise self._envelope_error(code, message, request)

    def _call(self, method: str, path: str, **kwargs):
        """Send a call with retries; return the decoded envelope (or the response when ``raw=True``)."""
        def before_sleep(state):
            exc = state.outcome.exception()
            log.warning("Marketo %s on %s (attempt %d/%d); backing off %.1f s", exc.code, exc.request,
                        state.attempt_number, self.max_attempts, state.next_action.sleep)

        retrying = Retrying(retry=retry_if_exception_type(TransientError), stop=stop_after_attempt(self.max_attempts),
                            wait=wait_exponential_jitter(multiplier=self.retry_initial_s, max=self.retry_max_s,
                                                        jitter=self.retry_initial_s),
                            before_sleep=before_sleep, reraise=False)
        try:
            for attempt in retrying:
                with attempt:
                    return self._call_once(method, path, **dict(kwargs))
        except RetryError as exc:
            last = exc.last_attempt.exception()
            step = ("check the connection's host and that this machine can reach it; " if last.code == "transport"
                    else "") + "the task is retried later (Airflow retries); nothing was written by this call"
            raise ServiceUnavailable(self.service, last.code, f"{last.message} (still failing after "
                                     f"{self.max_attempts} attempts)", request=last.request, status=last.status,
                                     where=self.where, next_step=step) from None
        except ServiceError as exc:
            exc.where = exc.where or self.where
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _error(self, code: str | None, message: str, **kw) -> ServiceError:
        """A :class:`ServiceError` naming this client's connection."""
        return ServiceError(self.service, code, message, where=self.where, **kw)

    def _get(self, path: str, params: dict | None = None):
        """GET, or POST with ``_method=GET`` and a form body when the URI would exceed 8 KB (error-codes.md 414)."""
        query = urlencode({k: v for k, v in (params or {}).items() if v is not None})
        if len(path) + 1 + len(query) <= MAX_URI:
            return self._call("GET", path + ("?" + query if query else ""))
        return self._call("POST", path + "?_method=GET", data=query,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})

    def _post_json(self, path: str, body: dict):
        return self._call("POST", path, data=_json_bytes(body), headers={"Content-Type": "application/json"})

    # ------------------------------------------------------------------ describe
    def describe_leads(self, refresh: bool = False) -> pd.DataFrame:
        """The lead fields (Describe Lead 2): one row per field.

        Columns: ``rest_name``, ``display_name``, ``data_type``, ``length``, ``updateable``, ``searchable``,
        ``crm_managed``. Cached for the client's life (describe rarely changes); ``refresh`` asks again.
        """
        with self._describe_lock:  # threads sharing a client describe once
            if self._describe is not None and not refresh:
                return self._describe
            self._describe = self._describe_fields()
            return self._describe

    def use_describe(self, describe: pd.DataFrame) -> None:
        """Reuse a describe read earlier (e.g. by another task's schema refresh) instead of calling again.

        :param describe: a frame as returned by :meth:`describe_leads`.
        """
        with self._describe_lock:
            self._describe = describe

    def _describe_fields(self) -> pd.DataFrame:
        body = self._get("/rest/v1/leads/describe2.json")
        entity = (body.get("result") or [{}])[0]
        searchable = {f for group in entity.get("searchableFields", []) for f in group}
        rows = [{"rest_name": f["name"], "display_name": f.get("displayName"), "data_type": f.get("dataType"),
                 "length": f.get("length"), "updateable": bool(f.get("updateable")),
                 "searchable": f["name"] in searchable, "crm_managed": bool(f.get("crmManaged"))}
                for f in entity.get("fields", [])]
        return typed_frame(rows, ["rest_name", "display_name", "data_type", "length", "updateable", "searchable",
                                  "crm_managed"],
                           {"length": "integer", "updateable": "boolean", "searchable": "boolean",
                            "crm_managed": "boolean"})

    def field_types(self) -> dict[str, str]:
        """REST field name -> Marketo data type, from describe."""
        d = self.describe_leads()
        return dict(zip(d["rest_name"], d["data_type"]))

    # ------------------------------------------------------------------ usage
    def usage(self, days: int = 1) -> pd.DataFrame:
        """The subscription's API calls per day as Marketo counts them against the daily quota (Usage API).

        ``days=1`` asks Get Daily Usage (``stats/usage.json``, today), ``days=7`` Get Weekly Usage
        (``stats/usage/last7days.json``); days are Marketo's quota days, which start at midnight US Central time.
        The call goes through the client's limits and retries and costs one call of the quota itself.

        :param days: 1 (today) or 7 (today and the six days before).
        :returns: one row per day and API user, oldest day first: ``date`` (the quota day, a naive
            ``datetime64``), ``total`` (the subscription's calls that day, every API user's), ``user_id`` and
            ``user_calls`` (that user's calls); a day without calls has one row with ``user_id`` missing and
            ``user_calls`` 0.
        :raises ValueError: for ``days`` other than 1 or 7 (Marketo has no other period).
        :raises mdsync.errors.AccessDenied: when Marketo answers 603 "Access denied" (the Swagger spec lists no
            permission for the Usage API, but a subscription can still refuse it, e.g. by IP restriction or a
            role without API access). Not retried: a caller that only wants a figure to compare falls back to
            its own counts (e.g. ``calls_made``, which counts identity calls too).
        :raises mdsync.errors.QuotaExhausted: on 607 (the quota is used up, so usage cannot be asked either).
        :raises mdsync.errors.ServiceUnavailable: when transient failures outlast the retries.
        """
        paths = {1: "/rest/v1/stats/usage.json", 7: "/rest/v1/stats/usage/last7days.json"}
        if days not in paths:
            raise ValueError(f"Marketo usage covers 1 day (today) or 7 days, not days={days!r}")
        body = self._get(paths[days])
        rows = [{"date": str(day.get("date"))[:10], "total": day.get("total") or 0, "user_id": user.get("userId"),
                 "user_calls": user.get("count") or 0}
                for day in body.get("result") or []
                for user in (day.get("users") or [{"userId": None, "count": 0}])]
        frame = typed_frame(rows, ["date", "total", "user_id", "user_calls"],
                            {"date": "date", "total": "integer", "user_calls": "integer"})
        # Marketo does not document the order of the days; callers get them oldest first.
        return frame.sort_values(["date", "user_id"], kind="stable", na_position="first").reset_index(drop=True)

    # ------------------------------------------------------------------ leads
    def get_leads(self, filter_type: str, values: Iterable, fields: list[str] | None = None) -> pd.DataFrame:
        """Leads whose ``filter_type`` field matches any of ``values`` (batches of 300, every page).

        Values the service refuses (see :meth:`lookup_leads`) are logged as a warning, each with the service's
        reason, and the leads of all other values are returned.

        :param filter_type: a searchable field (``id``, ``email``, custom string/integer fields).
        :param fields: REST field names to return; Marketo's defaults when None.
        :returns: one row per lead, columns typed per describe.
        """
        found, refused = self.lookup_leads(filter_type, values, fields)
        if not refused.empty:
            shown = "; ".join(f"{v!r}: {c} {m}" for v, c, m in refused.head(_SHOWN).itertuples(index=False))
            log.warning("Marketo lookup by %s: %d values refused and left out (%s%s)", filter_type, len(refused),
                        shown, "; ..." if len(refused) > _SHOWN else "")
        return found

    def lookup_leads(self, filter_type: str, values: Iterable, fields: list[str] | None = None
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Leads matching ``values`` on ``filter_type``, and the values that could not be looked up.

        ``filterValues`` is a comma-separated list with no escape, so a value containing a comma (or blank)
        cannot be sent: it is refused up front with code ``not-sent``. Values go 300 to a call; when the
        service refuses a call as a whole for an invalid value (1001/1003, e.g. an email that is not one), the
        chunk is split in halves until the offending values are alone, and those are refused with the service's
        code and message; every other value's leads are returned. A chunk with one bad value costs about
        ``2 * log2(300)`` extra calls.

        :param filter_type: a searchable field (``id``, ``email``, custom string/integer fields).
        :param values: values to match (None and duplicates are dropped).
        :param fields: REST field names to return; Marketo's defaults when None.
        :returns: ``(found, refused)``: one row per lead (columns typed per describe), and one row per refused
            value with columns ``value``, ``code``, ``message``.
        """
        values = list(dict.fromkeys(str(json_value(v)) for v in values if json_value(v) is not None))
        columns = ["id", *[f for f in (fields or ["email", "updatedAt", "createdAt", "firstName", "lastName"])
                           if f != "id"]]
        types = self.field_types()
        refused = [{"value": v, "code": NOT_SENT,
                    "message": "contains a comma: filterValues is comma-separated, so the value would be read as "
                               "several" if "," in v else "blank after trimming"}
                   for v in values if "," in v or not v.strip()]
        sendable = [v for v in values if "," not in v and v.strip()]
        records: list[dict] = []
        chunks = deque(_chunks(sendable, BATCH))
        while chunks:
            chunk = chunks.popleft()
            try:
                records.extend(self._leads_by_filter(filter_type, chunk, columns))
            except ServiceError as exc:
                if exc.code not in INVALID_VALUE_CODES:
                    raise
                if len(chunk) == 1:
                    refused.append({"value": chunk[0], "code": exc.code, "message": exc.service_message})
                    continue
                half = len(chunk) // 2
                chunks.extendleft([chunk[half:], chunk[:half]])
        return (typed_frame(records, columns, types),
                typed_frame(refused, REFUSED_COLUMNS, {}))

    def _leads_by_filter(self, filter_type: str, chunk: list[str], columns: list[str]) -> list[dict]:
        """Every page of Get Leads by Filter Type for up to 300 values."""
        records: list[dict] = []
        token = None
        while True:
            body = self._get("/rest/v1/leads.json", {
                "filterType": filter_type, "filterValues": ",".join(chunk), "fields": ",".join(columns),
                "batchSize": BATCH, "nextPageToken": token})
            records.extend(body.get("result") or [])
            token = body.get("nextPageToken")
            if not body.get("moreResult") or not token:
                return records

    def _batches_by_size(self, records: list[dict], overhead: int) -> Iterator[list[tuple[int, dict]]]:
        """Groups of (input position, record) with at most 300 records and under 1 MB of JSON each."""
        batch: list[tuple[int, dict]] = []
        size = overhead
        for seq, rec in enumerate(records):
            rec_size = len(_json_bytes(rec)) + 1
            if batch and (len(batch) == BATCH or size + rec_size > MAX_BODY):
                yield batch
                batch, size = [], overhead
            batch.append((seq, rec))
            size += rec_size
        if batch:
            yield batch

    def _write_batches(self, path: str, records: list[dict], envelope: dict, reason_key: str = "reasons"
                       ) -> pd.DataFrame:
        rows = []
        overhead = len(_json_bytes(envelope)) + 20
        for batch in self._batches_by_size(records, overhead):
            if overhead + len(_json_bytes(batch[0][1])) > MAX_BODY:
                seq, _ = batch[0]
                rows.append({"seq": seq, "id": None, "status": "skipped", "reason_code": "413",
                             "reason_message": "record alone exceeds Marketo's 1 MB request limit; not sent"})
                continue
            body = self._post_json(path, {**envelope, "input": [r for _, r in batch]})
            results = body.get("result") or []
            if len(results) != len(batch):
                raise self._error(None, f"{len(results)} results for {len(batch)} records", request=f"POST {path}",
                                  next_step="the batch outcome is unknown; re-run", retryable=True)
            for (seq, _), res in zip(batch, results):
                code, message = _reason_columns(res.get(reason_key) or res.get("reasons") or res.get("errors"))
                rows.append({"seq": seq, "id": res.get("id"), "status": res.get("status"), "reason_code": code,
                             "reason_message": message, "marketo_guid": res.get("marketoGUID")})
        frame = typed_frame(rows, RESULT_COLUMNS + ["marketo_guid"], RESULT_TYPES)
        return frame.set_index("seq", drop=False).rename_axis(None)

    def sync_leads(self, records, action: str = "createOrUpdate", lookup_field: str = "email") -> pd.DataFrame:
        """Create and/or update leads (Sync Leads), 300 per call and under 1 MB per call.

        :param records: a frame or an iterable of mappings of REST field names to values (None clears a field).
        :param action: ``createOrUpdate``, ``createOnly``, ``updateOnly`` or ``createDuplicate``.
        :param lookup_field: the dedupe key (``email`` by default; ``id`` only with ``updateOnly``).
        :returns: one row per input record, in input order: ``seq``, ``id``, ``status`` (created, updated,
            skipped), ``reason_code``, ``reason_message``.
        """
        rows = records_of(records)
        frame = self._write_batches("/rest/v1/leads.json", rows, {"action": action, "lookupField": lookup_field})
        return frame.drop(columns=["marketo_guid"])

    def delete_leads(self, ids: Iterable[int]) -> pd.DataFrame:
        """Delete leads by id, 300 per call; one result row per id (``deleted`` or ``skipped`` 1004)."""
        rows = [{"id": int(i)} for i in ids]
        return self._write_batches("/rest/v1/leads/delete.json", rows, {}).drop(columns=["marketo_guid"])

    def merge_leads(self, winner_id: int, loser_ids: Iterable[int]) -> None:
        """Merge losers into the winner (Merge Leads; at most 25 losers per call, so larger sets are split)."""
        losers = [int(i) for i in loser_ids]
        for chunk in _chunks(losers, MERGE_BATCH):
            self._call("POST", f"/rest/v1/leads/{int(winner_id)}/merge.json?" +
                       urlencode({"leadIds": ",".join(map(str, chunk))}))

    def merge_persons(self, merges) -> pd.DataFrame:
        """Merge each winner's losers into it (Merge Leads, up to 25 losers a call), one outcome per loser.

        A call is all or nothing: when Marketo refuses one (a lead not found, 1004; a loser that is also the
        winner, 1003), its losers are sent again one at a time, so one bad id does not hold back the others.
        Outages (retried, then :class:`~mdsync.errors.ServiceUnavailable`) and quota stops are raised, not
        recorded: nothing about the record is known then.

        :param merges: a frame (or mappings) with ``winner_id`` and ``loser_id``.
        :returns: ``winner_id``, ``loser_id``, ``ok``, ``error_code``, ``error_message`` per input row, in order.
        """
        frame = pd.DataFrame(records_of(merges), columns=["winner_id", "loser_id"]).astype("int64")
        rows = []
        for winner, part in frame.drop_duplicates().groupby("winner_id", sort=False):
            for chunk in _chunks(part["loser_id"].tolist(), MERGE_BATCH):
                rows += self._merge_chunk(int(winner), chunk, alone=len(chunk) == 1)
        out = pd.DataFrame(rows, columns=["winner_id", "loser_id", "ok", "error_code", "error_message"])
        key = pd.MultiIndex.from_frame(frame)
        return out.set_index(["winner_id", "loser_id"]).reindex(key).reset_index()

    def _merge_chunk(self, winner: int, losers: list[int], alone: bool) -> list[tuple]:
        try:
            self.merge_leads(winner, losers)
        except (ServiceUnavailable, QuotaExhausted, AuthError, AccessDenied):
            raise
        except ServiceError as exc:
            if not alone:
                log.info("Marketo refused merging %d leads into %s (%s %s); merging them one at a time",
                         len(losers), winner, exc.code, exc.service_message)
                return [r for loser in losers for r in self._merge_chunk(winner, [loser], alone=True)]
            return [(winner, losers[0], False, exc.code, exc.service_message)]
        return [(winner, loser, True, None, None) for loser in losers]


def _json_bytes(body) -> bytes:
    """Compact UTF-8 JSON: non-ASCII text as itself (2-4 bytes a character), not as 6-12 byte escapes."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _next_step(code: str) -> str:
    if code == "603":
        return ("grant the API-only user's role the permission this call needs (Admin > Users & Roles: Read-Write "
                "Lead, Read-Only Activity, Read-Write Custom Activity, Read-Write Activity Metadata), or allow this "
                "machine's IP address if API access is restricted by IP")
    if code in ("609", "610", "612", "1003", "1006", "1011"):
        return "the request was refused as sent; fix the request (field names, values, filter) and re-run"
    return "not retried; see the Marketo error code reference"
