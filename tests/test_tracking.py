"""MLflow tracking against real SQLite stores."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from klbench.errors import TrackingError
from klbench.tracking import SUPERSEDED_TAG, RunTracker, init_store, resolve_tracking_uri


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_tracking_uri("sqlite:///other.db") == "sqlite:///other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri("sqlite:///other.db") == "http://127.0.0.1:5999"


@pytest.fixture
def store(tmp_path) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    init_store(uri, ["vae"])
    return uri


def tracker(uri: str, key: str = "toy/vae/seed0") -> RunTracker:
    return RunTracker(uri, "vae", key, {"dataset": "toy", "seed": 0}, {"train": {"epochs": 2, "lr": 0.001}})


def test_run_has_name_tags_flattened_params_and_stepped_metrics(store):
    t = tracker(store)
    t.start()
    t.log_metrics({"train/rate": 1.5, "train/distortion": 3.0}, step=1)
    t.log_metrics({"train/rate": 1.25, "train/distortion": 2.5}, step=2)
    t.finish("FINISHED")
    client = MlflowClient(store)
    run = client.get_run(t.run_id)
    assert run.info.run_name == "toy/vae/seed0" and run.info.status == "FINISHED"
    assert run.data.tags["dataset"] == "toy" and run.data.tags["klbench.run_key"] == "toy/vae/seed0"
    assert run.data.params == {"train.epochs": "2", "train.lr": "0.001"}
    history = client.get_metric_history(t.run_id, "train/rate")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 1.5), (2, 1.25)]
    assert t.seconds > 0


def test_more_metrics_than_one_batch_holds_are_all_logged(store):
    t = tracker(store)
    t.start()
    t.log_metrics({f"test/m{i}": float(i) for i in range(2500)}, step=0)
    t.finish("FINISHED")
    assert len(MlflowClient(store).get_run(t.run_id).data.metrics) == 2500


def test_metrics_are_written_in_timed_batches_and_flushed_by_a_failed_finish(store, monkeypatch):
    import klbench.tracking

    t = tracker(store)
    t.start()
    client = MlflowClient(store)
    t.log_metrics({"train/rate": 1.0}, step=1)
    assert "train/rate" not in client.get_run(t.run_id).data.metrics  # queued, not yet a SQLite write
    monkeypatch.setattr(klbench.tracking, "FLUSH_SECONDS", 0.0)
    t.log_metrics({"train/rate": 2.0}, step=2)  # the interval has passed: both steps go out
    assert len(client.get_metric_history(t.run_id, "train/rate")) == 2
    monkeypatch.setattr(klbench.tracking, "FLUSH_SECONDS", 3600.0)
    t.log_metrics({"train/rate": 3.0}, step=3)
    t.finish("FAILED")
    run = client.get_run(t.run_id)
    assert run.info.status == "FAILED" and len(client.get_metric_history(t.run_id, "train/rate")) == 3


def test_rerun_supersedes_the_older_finished_run_and_closes_stale_running_ones(store):
    first = tracker(store)
    first.start()
    first.finish("FINISHED")
    killed = tracker(store)
    killed.start()  # never finished: a SIGKILLed job leaves its run RUNNING
    again = tracker(store)
    again.start()
    again.finish("FINISHED")
    client = MlflowClient(store)
    assert client.get_run(killed.run_id).info.status == "KILLED"
    assert client.get_run(first.run_id).data.tags[SUPERSEDED_TAG] == "true"
    assert SUPERSEDED_TAG not in client.get_run(again.run_id).data.tags
    other_key = tracker(store, "toy/vae/seed1")
    other_key.start()
    other_key.finish("FINISHED")
    assert SUPERSEDED_TAG not in client.get_run(again.run_id).data.tags


def test_failed_status_is_recorded(store):
    t = tracker(store)
    t.start()
    t.finish("FAILED")
    assert MlflowClient(store).get_run(t.run_id).info.status == "FAILED"


def test_unusable_store_is_one_clear_error(tmp_path):
    not_a_folder = Path(tmp_path) / "file"
    not_a_folder.write_text("")
    with pytest.raises(TrackingError, match="cannot use MLflow tracking store") as error:
        init_store(f"sqlite:///{not_a_folder / 'mlflow.db'}", ["vae"])
    assert "\n" not in str(error.value)
