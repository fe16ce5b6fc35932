"""The background worker that starts queued bulk jobs, like Marketo's bulk services.

Lead and activity exports share one queue (two processing at a time); imports have their own (two importing
at a time). Each started job runs in its own thread; a failure is recorded on the job (status Failed), and an
injected ``job_failure`` fault fails the job when it starts.
"""

from __future__ import annotations

import threading
import time

from .guard import Guard
from .imports import ImportJobs
from .store import MarketoStore


class BulkRunner:
    """Starts queued export and import jobs until :meth:`stop`."""

    def __init__(self, store: MarketoStore, imports: ImportJobs, guard: Guard, export_delay_s: float = 0.0) -> None:
        self.store = store
        self.imports = imports
        self.guard = guard
        self.export_delay_s = export_delay_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_export(self, job_id: str) -> None:
        if self.export_delay_s:
            time.sleep(self.export_delay_s)
        try:
            kind = self.store.db.execute("SELECT kind FROM exports WHERE exportId = ?", (job_id,)).fetchone()[0]
            if self.guard.take_faults(f"/bulk/v1/{kind}/export", job=True):
                raise RuntimeError("injected job failure")
            self.store.run_export(job_id)
        except Exception as exc:  # recorded on the job, as Marketo reports a Failed export
            self.store.fail_export(job_id, f"{type(exc).__name__}: {exc}")

    def run_import(self, batch_id: int) -> None:
        try:
            if self.guard.take_faults("/bulk/v1/leads.json", job=True):
                raise RuntimeError("injected job failure")
            self.imports.run(batch_id)
        except Exception as exc:  # recorded on the job, as Marketo reports a Failed import
            self.imports.fail(batch_id, f"{type(exc).__name__}: {exc}")

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = False
            for take, run in ((self.store.next_export, self.run_export), (self.imports.next_job, self.run_import)):
                job = take()
                if job is not None:
                    started = True
                    threading.Thread(target=run, args=(job,), daemon=True).start()
            if not started:
                self._stop.wait(0.05)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="marketo-bulk", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
