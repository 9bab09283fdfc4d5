"""What a kombu message envelope must look like to reach Celery, and the stand-in a
transport hands over instead of one that does not: a message with the
``inferq_refused`` header, which the worker dead-letters and acks (workers/rejects.py).
Used by both of inferq's transports (shared/redis_transport.py, shared/sqs_transport.py):
nothing a producer puts on a queue can stop a worker."""

from __future__ import annotations

from typing import Any

REFUSED_HEADER = "inferq_refused"  # on a stand-in message for an entry that was garbage
REFUSED_CONTENT_TYPE = "application/x-inferq-refused"


def is_message(payload: Any) -> bool:
    """The envelope kombu's virtual Message reads, and restores by (its body is checked
    when decoded): headers a mapping, a whole-number priority or none."""
    if not isinstance(payload, dict):
        return False
    props = payload.get("properties")
    priority = props.get("priority") if isinstance(props, dict) else None
    return (isinstance(props, dict) and isinstance(props.get("delivery_info"), dict)
            and isinstance(payload.get("headers", {}), dict)
            and isinstance(payload.get("body", ""), str | None)
            and (priority is None or (type(priority) is int and 0 <= priority <= 255)))


def stand_in(reason: str, raw_bytes: int, properties: dict[str, Any],
             **headers: Any) -> dict[str, Any]:
    """The envelope of a refused entry: no body, the reason in a header."""
    return {
        "body": "", "content-type": REFUSED_CONTENT_TYPE, "content-encoding": "binary",
        "headers": {REFUSED_HEADER: reason, "inferq_raw_bytes": raw_bytes, **headers},
        "properties": {"body_encoding": None, **properties},
    }
