import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_ambient_tracking_uri(monkeypatch):
    """Tests choose their own MLflow store; a developer's MLFLOW_TRACKING_URI must not leak in."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def repo() -> Path:
    return REPO


def pytest_configure(config):
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
