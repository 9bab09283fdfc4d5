"""One typed settings object, read from ``INFERQ_*`` environment variables.

Built by :func:`load_settings` (never at import), which turns a validation failure into
a :class:`ConfigError` naming the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigError

ENV_PREFIX = "INFERQ_"
# ``scheme://user:password@`` (the password up to the last "@" before the host, so one with
# an unescaped "@" is still covered), and ``?password=`` as redis-py also reads it.
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s]*:)[^\s/]*@")
_QUERY_PASSWORD = re.compile(r"(?i)([?&](?:password|passwd|pwd)=)[^&\s]*")
_SECRET_FIELDS = frozenset({"api_keys", "callback_secret"})


def scrub(text: str) -> str:
    """``text`` with every password in a URL masked (``redis://:pw@host`` ->
    ``redis://:***@host``): for messages and logs that may quote a broker or store URL."""
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    broker_url: str | None = Field(
        None, description="redis://… or amqp://…; unset runs the embedded in-memory default"
    )
    result_backend: str | None = Field(
        None, description="redis://… result store; defaults to the broker URL when it is Redis"
    )
    home: Path = Field(
        Path.home() / ".inferq", description="local state: the embedded result store, caches"
    )
    model_repo: str = Field("models", description="the model repository: a folder, or a "
                            "bucket URL (s3://bucket/prefix; gs://, az:// with fsspec)")
    model_cache: Path | None = Field(None, description="bucket repositories: the local "
                                     "cache of manifests and artifacts (default: "
                                     "INFERQ_HOME/model-cache)")
    model_source: Literal["auto", "repo", "store"] = Field(
        "auto", description="what producers and the API validate against: the repository, "
        "or the model catalog workers keep in the result store (auto: the repository when "
        "it is a bucket or an existing folder, else the catalog)")
    model_refresh_s: float = Field(5.0, gt=0, le=3600, description="bucket repositories: "
                                   "seconds between listings (new versions, defaults)")
    queue_prefix: str = Field("", description="prefix of every queue name and of the "
                              "broker's bookkeeping keys: deployments sharing a Redis "
                              "database stay apart")
    result_expires: int = Field(7 * 24 * 3600, ge=60, description="seconds a result is kept")
    visibility_timeout: int = Field(
        3600, ge=1, description="Redis broker: seconds before an unacked message is redelivered"
    )
    reliable_fetch: bool = Field(True, description="Redis broker: fetch with inferq's "
                                 "transport (no loss window, dead consumers' messages back "
                                 "in seconds); false: kombu's own BRPOP fetch")
    consumer_dead_after: float = Field(10.0, ge=1, description="Redis broker: seconds without "
                                       "a worker's heartbeat before its unacked messages go "
                                       "back on their queues")
    chunk_rows: int | None = Field(None, ge=1, le=1_000_000, description=(
        "rows per message in bulk jobs; unset: about 1 MiB of input per message, per model "
        "(digits 4,096, text 1,024)"))
    max_in_flight: int = Field(64, ge=1, description="bulk chunks outstanding at once per producer")
    # 512: bulk digits ran ~5% faster than at 256 (fewer GIL hand-backs per row, the raw
    # model itself is as fast at either); online batches rarely reach it.
    max_batch_rows: int = Field(512, ge=1, description="rows per model call")
    max_delay_ms: float = Field(5.0, ge=0, description="longest a row waits for batch-mates")
    coalesce: bool = Field(True, description="concurrent single-job submits of one process "
                           "share a broker message (producer/coalesce.py)")
    metrics_port: int = Field(0, ge=0, le=65535, description="worker: serve Prometheus "
                              "metrics on this port; 0 = off")
    log_format: Literal["text", "json"] = Field("text", description="log lines as text, or "
                                                "one JSON object each (docs/logs.md)")
    tracing: Literal["off", "otlp", "console"] = Field(
        "off", description="OpenTelemetry spans of each job (docs/ops.md, Tracing): otlp "
        "exports to OTEL_EXPORTER_OTLP_ENDPOINT; off costs nothing")
    concurrency: int = Field(32, ge=1, description="task threads per worker process")
    ort_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = cores")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$",
                        description="where models run: cpu, or cuda in a GPU-pinned worker")
    result_serializer: Literal["msgpack", "json"] = Field(
        "msgpack", description="how workers store results: msgpack (compact, inferq's "
        "arrays), or json (a plain Celery client reads them); either is read back")
    max_message_bytes: int = Field(64 * 2**20, ge=1024, description="cap on one decoded payload")
    max_deliveries: int = Field(8, ge=2, description="deliveries of one message before it is "
                                "dead-lettered (its worker died each time)")
    task_max_retries: int = Field(3, ge=0, description="retries of a row whose model call "
                                  "failed with a transient error (out of memory, device)")
    # -- the results API (`inferq api`) ----------------------------------------------------
    api_keys: str = Field("", description="comma list of tenant:key pairs (hashed on load); "
                          "or use INFERQ_API_KEYS_FILE")
    api_keys_file: Path | None = Field(None, description="JSON keys file written by "
                                       "`inferq api-key add` (hashes only)")
    api_max_body_bytes: int = Field(64 * 2**20, ge=1024, description="request body cap (413)")
    api_max_job_rows: int = Field(64, ge=1, description="rows in one job request")
    api_max_batch_rows: int = Field(1_000_000, ge=1, description="rows in one batch request")
    api_rate_per_s: int = Field(200, ge=0, description="requests per second per tenant "
                                "unless its key says otherwise; 0 = unlimited")
    api_queue_limit: int = Field(10_000, ge=0, description="messages waiting in a model's "
                                 "queue above which new work gets 429; 0 = no limit")
    api_queue_limits: dict[str, int] = Field(default_factory=dict, description="per-model "
                                             "queue limits, JSON, e.g. {\"minilm\": 500}")
    api_tenant_queue_share: float = Field(0.5, gt=0, le=1, description="each tenant's share "
                                          "of a model's queue limit: its own waiting jobs "
                                          "up to this are admitted even when the queue is "
                                          "full; unless its key says otherwise")
    api_wait_max_s: float = Field(30.0, gt=0, le=300, description="longest ?wait= long poll")
    callback_secret: str = Field("", description="HMAC-SHA256 key signing callbacks unless "
                                 "the tenant's key has its own")
    callback_allow_private: bool = Field(False, description="allow callbacks to loopback "
                                         "and private addresses (trusted tenants only)")
    callback_max_attempts: int = Field(8, ge=1, le=30, description="callback deliveries tried")
    fault_injection: str = Field(
        "", description="testing only: comma list such as 'delay_ms=20'; empty in production"
    )

    @field_validator("api_keys_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("model_repo", mode="before")
    @classmethod
    def _path_is_text(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("queue_prefix")
    @classmethod
    def _plain_prefix(cls, value: str) -> str:
        if value and not all(c.isalnum() or c in "._-" for c in value):
            raise ValueError("use letters, digits, '.', '_' and '-' only")
        return value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """repr() and str() mask URL passwords and secrets: a settings object printed in a
        log line or a traceback with locals must not carry them."""
        for name, value in super().__repr_args__():
            if name in _SECRET_FIELDS and value:
                yield name, "***"
            elif isinstance(value, str):
                yield name, scrub(value)
            else:
                yield name, value

    @property
    def broker_is_sqs(self) -> bool:
        return (self.broker_url or "").startswith("sqs://")

    @property
    def embedded(self) -> bool:
        return not self.broker_url

    def effective_result_backend(self) -> str:
        if self.result_backend:
            return self.result_backend
        if self.embedded:
            return "file://" + str((self.home / "results").resolve())
        if self.broker_url and self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        raise ConfigError(
            "INFERQ_RESULT_BACKEND: required when INFERQ_BROKER_URL is not Redis "
            "(set it to a redis:// URL so results persist and any process can read them)"
        )

    def effective_model_cache(self) -> Path:
        return self.model_cache or self.home / "model-cache"

    def effective_ort_threads(self) -> int:
        return self.ort_threads or (os.cpu_count() or 1)


def load_settings(**overrides: object) -> Settings:
    """Read the environment (plus overrides); a bad value raises ConfigError naming it."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            problems.append(f"{ENV_PREFIX}{field.upper()}: {err['msg']}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None
