"""MLflow tracking: the only module that imports mlflow.

Conventions (DESIGN.md): one experiment per model family; run name
`{dataset}/{model}/seed{seed}`; tags for provenance; params = the flattened run config;
metrics `{split}/{term}` (split train, val or test) with step = optimizer step, sent in
batches; artifacts = the
run directory. A re-run of a run key marks the older FINISHED runs superseded, and a run
left RUNNING by a killed job is closed as KILLED when its key starts again.
"""

import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from klbench.errors import TrackingError

RUN_KEY_TAG = "klbench.run_key"
SUPERSEDED_TAG = "klbench.superseded"
# MLflow's per-request limits of log_batch.
MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH = 1000, 100
# Metrics are buffered and written at most this often (and at the end): with 8 jobs
# sharing one SQLite file each write waits for the others' locks, so a write per
# evaluation would cost more than short evaluation intervals; every few seconds still shows live curves in the UI.
FLUSH_SECONDS = 5.0


def set_environment_defaults() -> None:
    """MLflow settings klbench's jobs run with unless the user set them: called on import, and
    again by a fork-server child once it has taken its client's environment."""
    # Quiet MLflow's INFO chatter and its "View run at" links in job logs.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # An unreachable tracking server should fail a job in seconds, not after MLflow's default
    # minutes of retries with backoff; set these yourself for a flaky remote server.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


set_environment_defaults()


def resolve_tracking_uri(config_uri: str | None) -> str:
    """MLFLOW_TRACKING_URI if set, else the config's, else MLflow's own default
    (sqlite:///mlflow.db in the working directory, written as an absolute path)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or config_uri
    return uri or f"sqlite:///{Path('mlflow.db').resolve()}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client: Any, name: str) -> str:
    """Experiment id by name, creating it; tolerant of a parallel job creating it first."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        return client.get_experiment_by_name(name).experiment_id


def _first_line(error: Exception) -> str:
    """The gist of an MLflow/SQLAlchemy error: its type and first line, at most ~200 characters."""
    text = str(error).strip()
    refused = re.search(r"\[Errno \d+\] [^\"')]+", text)
    if refused:  # requests buries the reason in a long retry message
        return f"cannot connect ({refused.group(0)})"
    line = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {line[:200]}{'...' if len(line) > 200 else ''}"


def open_store(uri: str, experiments: list[str]) -> tuple[Any, list[str]]:
    """A client of the store and the ids of these experiments, creating what is missing;
    one TrackingError line for a store that cannot be used."""
    try:
        client = _client(uri)
        return client, [ensure_experiment(client, name) for name in experiments]
    except Exception as error:  # mlflow raises many types for an unusable store
        raise TrackingError(f"cannot use MLflow tracking store {uri}: {_first_line(error)}") from None


def init_store(uri: str, experiments: list[str]) -> None:
    """Create the tracking store and experiments once, before parallel jobs start:
    several processes creating a new SQLite store at once crash in its migration."""
    open_store(uri, experiments)


SUMMARY_EXPERIMENT = "summary"


def log_pipeline_summary(uri: str, folders: Mapping[str, list[Path]], tags: Mapping[str, Any],
                         metrics: Mapping[str, float]) -> dict[str, str | None]:
    """One MLflow run per pipeline invocation in the `summary` experiment, holding the
    tables and figures as artifacts (folder name -> files); the previous summary is marked
    superseded, like a re-run of a training run. Returns where it is (for mlflow.json)."""
    tracker = RunTracker(uri, SUMMARY_EXPERIMENT, "pipeline/summary", tags, {})
    tracker.start()
    try:
        tracker.log_metrics(metrics, step=0)
        for folder, paths in folders.items():
            tracker.log_artifacts(paths, folder)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    return tracker.describe()


def flatten(values: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten(value, f"{name}.")
        else:
            yield name, value


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# what each timed call of a RunTracker does, for the one line of a store that fails mid-run
ACTIONS = {"_start": "creating the run", "_queue": "logging the metrics", "_flush": "logging the metrics",
           "log_artifact": "uploading the artifacts", "_finish": "closing the run"}


class RunTracker:
    """One MLflow run for one training job.

    `open_seconds` is the one-time cost of reaching the store (importing mlflow and its
    SQLAlchemy store, opening it, finding the experiment); `seconds` is the time spent
    logging (the run, params, metrics, artifacts, status); `open_cpu_seconds` and
    `cpu_seconds` are the same in CPU time of this process. They are kept apart because the
    first is a fixed cost of any process that uses MLflow, the second what our logging adds.
    """

    def __init__(self, uri: str, experiment: str, run_key: str, tags: Mapping[str, Any], params: Mapping[str, Any]):
        self.uri, self.experiment, self.run_key = uri, experiment, run_key
        self.seconds = self.cpu_seconds = 0.0
        self.open_seconds = self.open_cpu_seconds = 0.0
        self.run_id: str | None = None
        self._pending: list = []
        self._last_flush = time.monotonic()
        self.experiment_id: str | None = None
        self._tags, self._params = dict(tags), dict(params)
        self._older_finished: list[str] = []

    def _timed(self, fn, *args, **kwargs):
        """fn(...) timed as logging; a store that fails (a tracking server gone, say) is one
        TrackingError line, not MLflow's retry traceback."""
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        except TrackingError:
            raise
        except Exception as error:  # mlflow and requests raise many types for a store gone away
            action = ACTIONS.get(fn.__name__, fn.__name__)
            raise TrackingError(f"MLflow tracking store {self.uri} failed while {action} of {self.run_key}: "
                                f"{_first_line(error)}; once it is reachable again, rerun "
                                "(snakemake --rerun-incomplete)") from None
        finally:
            self.seconds += time.perf_counter() - start
            self.cpu_seconds += time.process_time() - cpu

    def start(self, store: "RunTracker | None" = None) -> None:
        """Create the run; reach the store first, or use the open store of another tracker of
        the same experiment (the runs of one job share one client)."""
        if store is not None and store.uri == self.uri and store.experiment == self.experiment:
            self.client, self.experiment_id = store.client, store.experiment_id
        else:
            opened, cpu = time.perf_counter(), time.process_time()
            try:
                self.client, (self.experiment_id,) = open_store(self.uri, [self.experiment])
            finally:
                self.open_seconds = time.perf_counter() - opened
                self.open_cpu_seconds = time.process_time() - cpu
        self._timed(self._start)

    def _start(self) -> None:
        from mlflow.entities import Param

        # one search per run key: RUNNING runs were left by a killed job and are closed now;
        # FINISHED ones are marked superseded once this run has finished too
        for older in self._runs_of_key():
            if older.info.status == "RUNNING":
                self.client.set_tag(older.info.run_id, "klbench.closed_reason", "left RUNNING by a killed job")
                self.client.set_terminated(older.info.run_id, "KILLED")
            elif older.info.status == "FINISHED" and older.data.tags.get(SUPERSEDED_TAG) != "true":
                self._older_finished.append(older.info.run_id)
        tags = {RUN_KEY_TAG: self.run_key, **{k: str(v) for k, v in self._tags.items()}}
        run = self.client.create_run(self.experiment_id, run_name=self.run_key, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flatten(self._params)]
        for chunk in _chunks(params, MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=chunk)

    def _runs_of_key(self) -> list:
        query = f"tags.`{RUN_KEY_TAG}` = '{self.run_key}'"
        return self.client.search_runs([self.experiment_id], filter_string=query, max_results=1000)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue the metrics of one step; written in batches every FLUSH_SECONDS and at the end."""
        self._timed(self._queue, [(k, v, step) for k, v in metrics.items()])

    def log_curves(self, curves: Mapping[str, list[float]]) -> None:
        """Queue each curve as one metric history with step = grid index."""
        self._timed(self._queue, [(name, v, i) for name, values in curves.items() for i, v in enumerate(values)])

    def _queue(self, points: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(name, float(value), now, step) for name, value, step in points)
        if time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self._flush()

    def flush(self) -> None:
        """Write every queued metric now."""
        self._timed(self._flush)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for chunk in _chunks(pending, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)
        self._last_flush = time.monotonic()

    def log_artifacts(self, paths: list[Path], folder: str | None = None) -> None:
        """Copy files into the run's artifacts (into `folder` there, if given)."""
        for path in paths:
            self._timed(self.client.log_artifact, self.run_id, str(path), folder)

    def finish(self, status: str) -> None:
        """End the run; after a FINISHED run, mark older FINISHED runs of the key superseded."""
        if self.run_id is None:
            return
        self._timed(self._finish, status)

    def _finish(self, status: str) -> None:
        self._flush()  # also for a failed run: its curves up to the failure are worth seeing
        self.client.set_terminated(self.run_id, status)
        if status == "FINISHED":
            for older in self._older_finished:
                self.client.set_tag(older, SUPERSEDED_TAG, "true")
                self.client.set_tag(older, "klbench.superseded_by", self.run_id)

    def describe(self) -> dict[str, str | None]:
        return {"tracking_uri": self.uri, "experiment": self.experiment, "experiment_id": self.experiment_id,
                "run_id": self.run_id, "run_name": self.run_key}
