"""At the Airflow boundary: an error no retry can fix fails the task at once, in one line.

Bad credentials, a missing permission, field, column or alternate key, an invalid config, connection or run
parameter, and Marketo's used-up daily quota (:func:`mdsync.errors.is_retryable` is false) become an
``AirflowFailException``: the task fails without its retries, and the log shows one line naming the
connection or config entry and what to do (the engine's own traceback adds nothing to it). Everything
else (a service still failing after the client's backoff, an unexpected error) is raised unchanged, so
Airflow's retries apply as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("mdsync")


def fail_fast(exc: BaseException) -> BaseException:
    """The exception to raise for ``exc``: an ``AirflowFailException`` with its one-line message when no retry
    can fix it, else ``exc`` itself."""
    from airflow.sdk.exceptions import AirflowFailException

    from mdsync.errors import is_retryable, one_line

    if isinstance(exc, AirflowFailException) or is_retryable(exc):
        return exc
    line = one_line(exc)
    log.error("%s (not retried: running this task again cannot fix it)", line)
    return AirflowFailException(line)


@contextmanager
def failing_fast() -> Iterator[None]:
    """Run a task's work; see :func:`fail_fast`."""
    try:
        yield
    except Exception as exc:
        failed = fail_fast(exc)
        if failed is exc:
            raise
        raise failed from None
