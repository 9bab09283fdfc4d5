"""Every Redis key and channel name inferq writes, in one place.

Names that hold a deployment's shared state carry ``INFERQ_QUEUE_PREFIX`` (queues, the
catalog, dead letters, the API's records, the transport's owners), so deployments can
share one database. Names keyed by a job, message or process id (claims, delivery
counts, reply channels) are unique already and carry none. Celery names the result of a
job (``celery-task-meta-<id>``, ``backend.get_key_for_task``).
"""

from __future__ import annotations

import uuid

# -- per job, message or process (ids are unique: no prefix) ------------------------------


def claim(job_id: str) -> str:
    """Who runs a job, or whether it was cancelled first (shared/claims.py)."""
    return f"inferq-claim-{job_id}"


def deliveries(message_id: str) -> str:
    """A redelivered message's delivery count and poison-row search (workers/deliveries.py)."""
    return f"inferq-deliveries-{message_id}"


def new_reply_channel(kind: str = "") -> str:
    """A producer process's own channel, where workers publish its results (``kind``:
    ``api`` for an API process)."""
    return f"inferq-reply-{kind + '-' if kind else ''}{uuid.uuid4().hex}"


# -- per deployment (INFERQ_QUEUE_PREFIX) -------------------------------------------------


def dead_letters(queue_prefix: str) -> str:
    """The dead-letter list (shared/dead_letters.py)."""
    return f"{queue_prefix}inferq-dead-letters"


def catalog(queue_prefix: str) -> str:
    """The model catalog hash (shared/catalog.py)."""
    return f"{queue_prefix}inferq.catalog"


def api_prefix(queue_prefix: str) -> str:
    """The API's records: ``job-<id>``, ``batch-<id>``, ``callbacks``, ``open-…``,
    ``rate-…`` after this prefix (api/store.py)."""
    return f"{queue_prefix}inferq-api-"


# -- the Redis transport (shared/redis_transport.py), after its ``state_prefix`` ------------
OWNER = "_inferq.owner"  # hash: delivery tag -> owner holding it
CONSUMERS = "_inferq.consumers"  # sorted set: owner -> last heartbeat (server time)
GARBAGE = "_inferq.garbage"  # list: raw queue entries that were not messages
WAKE_PREFIX = "_inferq.wake."  # a one-element list per queue that wakes idle consumers


def wake(queue: str) -> str:
    return WAKE_PREFIX + queue
