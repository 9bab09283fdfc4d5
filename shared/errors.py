"""The exception hierarchy. Messages say what was wrong and what to do."""

from __future__ import annotations


class InferqError(Exception):
    """Base class of every error inferq raises on purpose."""


class ConfigError(InferqError):
    """A setting is missing or invalid; the message names the environment variable."""


class CodecError(InferqError):
    """A message payload is not an acceptable tensor message (dtype, shape, size)."""


class ModelNotFound(InferqError):
    """No such model (or version) in the model repository."""


class InvalidModelName(InferqError, ValueError):
    """A model name, variant or version that cannot be used (e.g. a path)."""


class InputError(InferqError):
    """Input does not match the model's manifest. Permanent: never retried."""

    def __init__(self, message: str, *, row: int | None = None, field: str | None = None):
        super().__init__(message)
        self.row = row
        self.field = field


class JobNotFound(InferqError):
    """The result store holds no record of this job id (never submitted, or expired)."""


class JobFailed(InferqError):
    """The job ran and failed; the message is the worker's error."""


class JobCancelled(InferqError):
    """The job was cancelled before a worker ran it."""


class BatchContractError(InferqError):
    """A model call returned a different number of rows than it was given."""


class TransientError(InferqError):
    """A failure worth retrying (device hiccup, store outage)."""
