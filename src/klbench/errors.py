"""Errors a user can fix: the CLI prints them as one line and exits non-zero.

Anything else that escapes is a bug in klbench and keeps its traceback.
"""


class KlbenchError(Exception):
    """Base class: a problem with the user's input, data, config or environment."""


class ConfigError(KlbenchError):
    """A config key or value is wrong; the message names the key."""


class DataError(KlbenchError):
    """A dataset is unknown, missing or corrupt; the message names it and the fix."""


class TrainingError(KlbenchError):
    """Training could not continue (a non-finite loss, say); the message says where."""


class CheckpointError(KlbenchError):
    """A checkpoint is missing, corrupt or does not match the model."""


class TrackingError(KlbenchError):
    """The MLflow tracking store cannot be reached or written."""


class OutputError(KlbenchError):
    """The results folder cannot be written."""
