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


class UnsafeModelPath(ModelNotFound):
    """A model's folder or file leads outside the model repository (a symlink, or a path
    in its manifest): refused, never read."""


class InvalidModelName(InferqError, ValueError):
    """A model name, variant or version that cannot be used (e.g. a path)."""


class InputError(InferqError):
    """Input does not match the model's manifest. Permanent: never retried."""

    def __init__(self, message: str, *, row: int | None = None, field: str | None = None):
        # one line, whatever a parser's own message (quoted in it) held
        super().__init__(" ".join(message.split()))
        self.row = row
        self.field = field


class JobNotFound(InferqError):
    """The result store holds no record of this job id (never submitted, or expired)."""


class JobFailed(InferqError):
    """The job ran and failed; the message is the worker's error."""


class JobCancelled(JobFailed):
    """The job was cancelled before a worker ran it (a JobFailed: it has no result)."""


class JobExpired(JobFailed):
    """The job's deadline passed before a worker started it, so it was not run."""


class DeadLettered(JobFailed):
    """The job (or its row) was not run again: its worker process died each time it ran
    it. The dead-letter list (``inferq dead-letters``) holds its history."""


class BatchContractError(InferqError):
    """A model call returned a different number of rows than it was given."""


class TransientError(InferqError):
    """A failure worth retrying (device hiccup, store outage)."""


class AuthError(InferqError):
    """The HTTP API refused the API key (401): missing, unknown or revoked."""


class Busy(TransientError):
    """The HTTP API asked to slow down (429): the tenant's rate limit, or the model's queue
    is over its depth limit. ``retry_after``: seconds the server suggested, if it did."""

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


RateLimited = Busy  # the same error, by the name HTTP clients often look for


class Unavailable(TransientError):
    """The service or what it depends on (broker, result store) is down (503); nothing was
    enqueued. ``retry_after``: seconds the server suggested, if it did."""

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after
