"""Messages a worker cannot run are dead-lettered: never lost silently, never looped on.

Celery already refuses them and keeps running: a body it cannot decode (a foreign
serializer such as pickle, a payload over ``INFERQ_MAX_MESSAGE_BYTES``, a corrupt body)
is logged and acked, an unregistered task name or a malformed message is rejected, and
a task called with arguments its signature does not take fails. Here each of those also
gets an entry in the dead-letter list (``inferq dead-letters``) saying what arrived and
why it was refused; the message's body is not kept (it may be huge or hostile).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from celery import Celery, signals
from celery.worker.consumer import Consumer as CeleryConsumer

logger = logging.getLogger(__name__)

OnDead = Callable[[dict[str, Any]], None]
_HANDLER = "inferq_on_dead"  # attribute of the Celery app holding the dead-letter writer


def describe(message: Any, reason: str) -> dict[str, Any]:
    """A dead-letter entry for a raw broker message: its headers' id and task, not its body."""
    headers = getattr(message, "headers", None) or {}
    body = getattr(message, "body", b"") or b""
    return {"reason": reason, "message_id": headers.get("id"), "task": headers.get("task"),
            "content_type": getattr(message, "content_type", None), "body_bytes": len(body)}


def _dead(app: Any, entry: dict[str, Any]) -> None:
    on_dead: OnDead | None = getattr(app, _HANDLER, None)
    if on_dead is None:
        return
    try:
        on_dead(entry)
    except Exception:  # the refusal itself must go on (ack/reject), store or not
        logger.exception("could not dead-letter %s", entry)


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, dead-lettering what it cannot decode before acking it."""

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        _dead(self.app, describe(message, f"cannot decode the message: "
                                          f"{type(exc).__name__}: {exc}"))
        super().on_decode_error(message, exc)


def _on_rejected(sender: Any = None, message: Any = None, exc: Any = None,
                 **_: Any) -> None:
    reason = "not a task message inferq knows" if exc is None else f"invalid task: {exc}"
    _dead(sender.app, describe(message, reason))


def _on_unknown(sender: Any = None, name: str | None = None, message: Any = None,
                **_: Any) -> None:
    _dead(sender.app, describe(message, f"no such task: {name!r}"))


def _on_failure(sender: Any = None, task_id: str | None = None, exception: Any = None,
                args: Any = None, kwargs: Any = None, **_: Any) -> None:
    if not isinstance(exception, TypeError) or _binds(sender.run, args, kwargs):
        return  # a failure of the job itself: its stored error says what happened
    _dead(sender.app, {"reason": f"wrong arguments for {sender.name}: {exception}",
                       "message_id": task_id, "task": sender.name,
                       "arguments": sorted((kwargs or {}).keys())})


def _binds(fn: Callable[..., Any], args: Any, kwargs: Any) -> bool:
    try:
        inspect.signature(fn).bind(*(args or ()), **(kwargs or {}))
    except TypeError:
        return False
    return True


def install(app: Celery, on_dead: OnDead) -> None:
    """Dead-letter what ``app``'s worker refuses, through ``on_dead(entry)``."""
    setattr(app, _HANDLER, on_dead)
    app.conf.worker_consumer = f"{__name__}:Consumer"
    signals.task_rejected.connect(_on_rejected, weak=False, dispatch_uid="inferq-rejected")
    signals.task_unknown.connect(_on_unknown, weak=False, dispatch_uid="inferq-unknown")
    signals.task_failure.connect(_on_failure, weak=False, dispatch_uid="inferq-failure")
