"""The Airflow boundary: errors no retry can fix become AirflowFailException (one line); the rest pass unchanged."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowFailException

from mdsync.errors import AuthError, ConfigError, QuotaExhausted, ServiceError, ServiceUnavailable, StateStoreError
from mdsync_airflow.failfast import fail_fast, failing_fast


@pytest.mark.parametrize("exc", [
    ConfigError("invalid sync config:\n  sync.yaml: a: is required but missing\n  sync.yaml: b: typo?"),
    AuthError("marketo", "unauthorized", "identity refused the client credentials", where="Marketo connection 'm'"),
    QuotaExhausted("marketo", "607", "Daily quota reached", next_step="the run stops now"),
    ServiceError("dynamics", "0x80060888", "Could not find a property named 'adress1_city'", status=400),
])
def test_errors_no_retry_can_fix_fail_the_task_in_one_line(exc, caplog):
    with pytest.raises(AirflowFailException) as err, failing_fast():
        raise exc
    text = str(err.value)
    assert "\n" not in text and err.value.__cause__ is None and err.value.__suppress_context__
    assert text.split(":")[0] in str(exc).splitlines()[0]
    assert any("not retried" in r.getMessage() and text in r.getMessage() for r in caplog.records)


def test_a_config_error_listing_several_problems_joins_them():
    failed = fail_fast(ConfigError("invalid sync config:\n  a.yaml: x: bad\n  a.yaml: y: worse"))
    assert str(failed) == "invalid sync config: a.yaml: x: bad; a.yaml: y: worse"


@pytest.mark.parametrize("exc", [
    ServiceUnavailable("marketo", "606", "rate limit (still failing after 8 attempts)"),
    ServiceError("marketo", None, "export job 1 ended Failed", retryable=True),
    StateStoreError("database is locked"),
    ValueError("something unexpected"),
    FileNotFoundError("staged file"),
])
def test_retryable_and_unexpected_errors_pass_unchanged(exc):
    assert fail_fast(exc) is exc
    with pytest.raises(type(exc)) as err, failing_fast():
        raise exc
    assert err.value is exc
