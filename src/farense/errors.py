"""Errors meant for people: each says what went wrong, where (file, line, field), and what to do."""

from __future__ import annotations


class FarenseError(Exception):
    """Base of every error the CLI prints as one clear message instead of a traceback."""

    exit_code = 1


class ConfigError(FarenseError):
    exit_code = 2


class DataError(FarenseError):
    """The dataset has no usable example, or cannot be read."""


class ModelSourceError(FarenseError):
    """The base model source is missing, unreadable or of an unknown kind."""


class TrainingError(FarenseError):
    """Training stopped: NaN loss, out of memory, corrupt checkpoints."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C or a cancelled run stopped training; its last checkpoint resumes it."""

    exit_code = 130
