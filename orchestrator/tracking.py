"""MLflow tracking for one run, written from the driver.

Workers report to Ray; the driver receives rank 0's reports and logs them here. One tracking client
lives in one process, so workers need no route to the tracking server, and an outage is handled in
one place: nothing here ever raises into training. Metrics are queued and flushed by a background thread;
while the server is unreachable they wait (a warning says so once), the run itself is created once the
server answers. A server that answered once and went away is waited for at the end (`close_grace_s`: a
restarted server takes seconds to come back); whatever could not be sent by then is written to an outbox
file beside the run's checkpoints, with the command that sends it later.

Each training step is logged once: a resumed run continues its MLflow run past the last step it logged,
and steps a restarted worker group does again are not sent twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from mlflow.entities import DatasetInput, Metric

from orchestrator.mlflow_client import METRICS_PER_CALL, RUN_NAME_TAG, TrackingClient, tracking_uri

log = logging.getLogger("flotilla.tracking")


class Tracker:
    """One MLflow run. Create it, `start()`, `log_metrics()` as results arrive, `close()` at the end."""

    def __init__(self, experiment: str, run_name: str, params: dict[str, str], tags: dict[str, str],
                 artifacts: dict[str, str], outbox: Path, system_metrics_interval: float | None = 5.0,
                 flush_interval: float = 2.0, close_grace_s: float = 60.0, dataset: DatasetInput | None = None):
        self.experiment, self.run_name = experiment, run_name
        self.params, self.tags, self.artifacts = params, tags, artifacts
        self.dataset = dataset
        """The run's training data, logged as its input (MLflow keeps one input per dataset digest, so a resumed
        run logs it once)."""
        self.outbox = Path(outbox)
        self.system_metrics_interval = system_metrics_interval
        self.flush_interval, self.close_grace_s = flush_interval, close_grace_s
        self.mlflow = TrackingClient("training goes on and metrics are kept to send later")
        self.run_id: str | None = None
        self._pending: list[Metric] = []
        self._logged_through = -1
        """The last training step logged (this process's, or the resumed MLflow run's last `loss` step)."""
        self._lock = threading.Lock()
        self._sending = threading.Lock()
        """Held while a flush sends: the flusher thread and the driver (orchestrator.model_logging) both flush."""
        self._stop = threading.Event()
        self._monitor = None
        self._thread = threading.Thread(target=self._flush_forever, name="flotilla-mlflow", daemon=True)

    def start(self) -> str | None:
        """Create (or find, when the run is being resumed) the MLflow run; returns its id, or None while
        the server is unreachable (the flusher keeps trying)."""
        self._try_open()
        self._thread.start()
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int, once_per_step: bool = True) -> None:
        """Queue one step's metrics. `once_per_step`: a step at or before the last one logged is dropped (a
        resumed or restarted run doing it again); False for records that belong to an earlier step."""
        if once_per_step:
            with self._lock:
                if step <= self._logged_through:
                    return
                self._logged_through = step
        now = int(time.time() * 1000)
        self.queue([Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))])

    def queue(self, metrics: list[Metric]) -> None:
        with self._lock:
            self._pending.extend(metrics)

    def close(self, status: str = "FINISHED") -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._try_open()
        deadline, said = time.monotonic() + self.close_grace_s, False
        # A server that answered before is likely restarting: wait for it rather than leave an outbox.
        while not self.flush() and self.run_id is not None and time.monotonic() < deadline:
            if not said:
                log.warning("waiting up to %.0f s for MLflow at %s to take the run's last metrics",
                            self.close_grace_s, tracking_uri())
                said = True
            time.sleep(self.flush_interval)
        if self._monitor is not None:
            self._monitor.finish()
        if self.run_id is not None:
            self.mlflow.attempt("end the run", lambda: self.mlflow.client.set_terminated(self.run_id, status))
        with self._lock:
            left, self._pending = self._pending, []
        if left or self.run_id is None:
            self._write_outbox(left, status)

    # -- internals -----------------------------------------------------------------------------------

    def _try_open(self) -> None:
        if self.run_id is None:
            self.mlflow.attempt("open the run", self.open_run)

    def open_run(self) -> None:
        """Create or find the run and log params, tags and artifacts; raises if MLflow does not answer."""
        client = self.mlflow.client
        experiment_id = self.mlflow.experiment_id(self.experiment)
        found = client.search_runs([experiment_id], f"tags.`{RUN_NAME_TAG}` = '{self.run_name}'", max_results=1)
        if found:  # a resumed run continues its MLflow run, so its curves stay one line
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            logged = found[0].data.params
            params = {k: v for k, v in self.params.items() if k not in logged}
            last = max((m.step for m in client.get_metric_history(run_id, "loss")), default=-1)
            with self._lock:
                self._logged_through = max(self._logged_through, last)
                self._pending = [m for m in self._pending if m.step > last]  # queued before the run was found
        else:
            run_id = client.create_run(experiment_id, run_name=self.run_name, tags={RUN_NAME_TAG: self.run_name}).info.run_id
            params = self.params
        self.mlflow.log_batch(run_id, params=params, tags=self.tags)
        for name, text in self.artifacts.items():
            client.log_text(run_id, text, name)
        if self.dataset is not None:
            client.log_inputs(run_id, [self.dataset])
        self.run_id = run_id
        if self.system_metrics_interval:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(run_id, sampling_interval=self.system_metrics_interval, resume_logging=bool(found))
            self._monitor.start()

    def flush(self) -> bool:
        """Send what is queued; True when nothing is left waiting."""
        if self.run_id is None:
            return False
        with self._sending:
            while True:
                # One call's worth at a time: what MLflow did not take stays queued, in order, ahead of what arrives.
                with self._lock:
                    chunk = self._pending[:METRICS_PER_CALL]
                if not chunk:
                    return True
                if not self.mlflow.attempt("send metrics", lambda: self.mlflow.log_batch(self.run_id, metrics=chunk)):
                    return False
                with self._lock:
                    del self._pending[: len(chunk)]

    def _flush_forever(self) -> None:
        while not self._stop.wait(self.flush_interval):
            self._try_open()
            self.flush()

    def _write_outbox(self, metrics: list[Metric], status: str) -> None:
        self.outbox.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "experiment": self.experiment, "run_name": self.run_name, "run_id": self.run_id, "status": status,
            "params": self.params if self.run_id is None else {}, "tags": self.tags if self.run_id is None else {},
            "artifacts": self.artifacts if self.run_id is None else {},
            "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics],
        }
        with self.outbox.open("a") as f:
            f.write(json.dumps(record) + "\n")
        log.warning("MLflow could not take %d metrics of run %s; they are in %s (send them with: flotilla sync %s)",
                    len(metrics), self.run_name, self.outbox, self.outbox)


def sync_outbox(outbox: Path) -> int:
    """Send what an outage left in an outbox file; returns the number of runs sent. Raises if MLflow is down."""
    outbox = Path(outbox)
    records = [json.loads(line) for line in outbox.read_text().splitlines() if line.strip()]
    for r in records:
        tracker = Tracker(r["experiment"], r["run_name"], r["params"], r["tags"], r["artifacts"], outbox,
                          system_metrics_interval=None)
        tracker.open_run()
        tracker.queue([Metric(k, v, ts, step) for k, v, ts, step in r["metrics"]])
        if not tracker.flush():
            raise RuntimeError(f"MLflow at {tracking_uri()} did not accept the metrics of {r['run_name']}")
        tracker.mlflow.client.set_terminated(tracker.run_id, r["status"])
    outbox.rename(outbox.with_suffix(".sent"))
    return len(records)
