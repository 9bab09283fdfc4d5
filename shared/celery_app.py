"""The Celery app both sides build and its task names (queue names: shared/queues.py).

Producers send tasks by name (``send_task``) and never import worker code, so an
``inferq[client]`` install needs neither torch nor onnxruntime.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from shared import codec, filestore, redis_results
from shared.errors import ConfigError
from shared.queues import HIGH_SUFFIX, queue_name
from shared.settings import Settings

INFER_TASK = "inferq.infer"
INFER_MANY_TASK = "inferq.infer_many"  # several jobs in one message (producer/coalesce.py)


RELIABLE_REDIS = "shared.redis_transport:Transport"
SAFE_SQS = "shared.sqs_transport:Transport"


def require_broadcasts(app: Celery, what: str) -> None:
    """Refuse, naming ``what``, where workers take no broadcasts (Amazon SQS)."""
    if not app.conf.worker_enable_remote_control:
        raise ConfigError(f"{what} asks the workers over Celery's broadcasts, which inferq's "
                          "workers do not take on Amazon SQS (INFERQ_BROKER_URL=sqs://); "
                          "watch their Prometheus metrics instead")


def sqs_options(settings: Settings) -> dict[str, object]:
    """kombu's SQS transport, from the standard AWS settings (``AWS_DEFAULT_REGION``,
    ``AWS_ENDPOINT_URL`` for an SQS-compatible server, credentials from the usual chain)."""
    return {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1",
        # SQS redelivers a message not deleted within this (at most 12 h): as on Redis, it
        # must exceed the longest job.
        "visibility_timeout": min(settings.visibility_timeout, 43_200),
        # Long polls that return as soon as a message arrives, back to back.
        "wait_time_seconds": 10,
        "polling_interval": 0,
    }


def make_app(settings: Settings) -> Celery:
    codec.register(settings.max_message_bytes, settings.result_serializer)
    backend = settings.effective_result_backend()
    if settings.embedded:
        (settings.home / "results").mkdir(parents=True, exist_ok=True)
    if backend.startswith("file://"):
        backend = filestore.URL_PREFIX + backend  # atomic writes: pollers never see half
    elif backend.startswith(("redis://", "rediss://", "redis+socket://")):
        backend = redis_results.URL_PREFIX + backend  # no subscription per sent job
    app = Celery("inferq", broker=settings.broker_url or "memory://localhost/", backend=backend,
                 set_as_current=False)
    app.conf.update(_conf(settings))
    _choose_transport(app, settings)
    # Control messages (ping, inspect, our own broadcasts) in JSON, which `celery inspect`
    # and Flower speak; Celery would otherwise use the task serializer.
    app.control.mailbox.serializer = "json"
    if settings.embedded:
        # The in-memory transport is polled (every 1 s by default): poll often instead.
        app.conf.broker_transport_options["polling_interval"] = 0.002
    return app


def _conf(settings: Settings) -> dict[str, Any]:
    """Celery's settings for both sides."""
    vt = settings.visibility_timeout
    return dict(
        task_serializer=codec.SERIALIZER,
        result_serializer=codec.RESULT_SERIALIZER,
        accept_content=codec.ACCEPT,
        result_accept_content=[*codec.ACCEPT, codec.RESULT_CONTENT_TYPE],
        # A message is acked only after its result is stored; a worker that dies
        # mid-task leaves it to be redelivered (reject_on_worker_lost), and each
        # thread reserves one message at a time so a crash strands little.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # "running" comes from the job's claim (shared/claims.py), written anyway before
        # a job runs; Celery's STARTED record would be a second write per job.
        task_track_started=settings.embedded,
        result_expires=settings.result_expires,
        # A result-store outage is waited out (~60-90 s on average), as store_many does:
        # Celery's default budget (10 retries from 10 ms, full jitter) is ~10 s and can be
        # under 5 s, after which a job that ran is stored as failed.
        result_backend_always_retry=True,
        result_backend_max_retries=20,
        result_backend_base_sleep_between_retries_ms=200,
        result_backend_max_sleep_between_retries_ms=10_000,
        broker_connection_retry_on_startup=True,
        task_default_queue=queue_name(settings, "default"),
        worker_hijack_root_logger=False,
        # Task events cost the worker ~0.3 ms per job; Flower can switch them on when
        # someone is watching (`celery control enable_events`).
        worker_send_task_events=False,
        task_send_sent_event=False,
        broker_transport_options={
            # Redis: a message fetched but not acked within this time is redelivered;
            # it must exceed the longest task. The restore sweep runs often enough
            # for that bound to hold (kombu's default sweep is ~100 s).
            "visibility_timeout": vt,
            "unacked_restore_interval": max(1, min(2, vt // 4)),
            "unacked_restore_throttle": 1,
            # kombu's restore sweep holds a lock; a worker killed inside it would stop
            # every restore for the lock's life (kombu's default: 300 s).
            "unacked_mutex_expire": 15,
            # RabbitMQ: wait for the broker to confirm each publish.
            "confirm_publish": True,
        },
        result_backend_transport_options={"visibility_timeout": vt},
    )


def _choose_transport(app: Celery, settings: Settings) -> None:
    """inferq's own transports for Redis and SQS (kombu's with fixes), with their options."""
    if settings.reliable_fetch and (settings.broker_url or "").startswith(("redis://",
                                                                          "rediss://")):
        # No loss window between taking a message and recording it as unacked, and a dead
        # consumer's messages back in seconds (shared/redis_transport.py).
        app.conf.broker_transport = RELIABLE_REDIS
        app.conf.broker_transport_options.update(
            priority_suffix=HIGH_SUFFIX, owner_dead_after=settings.consumer_dead_after,
            # Each deployment (queue prefix) sweeps only its own unacked messages, with its
            # own visibility timeout, when several share one Redis database.
            state_prefix=settings.queue_prefix)
    if settings.broker_is_sqs:
        app.conf.broker_transport = SAFE_SQS  # malformed messages refused, not fatal
        app.conf.broker_transport_options.update(sqs_options(settings))
        # Broadcasts (ping, inspect, Flower) need a fanout exchange, which kombu builds
        # from SNS topics on SQS: not offered here (docs/ops.md, "Amazon SQS").
        app.conf.worker_enable_remote_control = False
