"""Messages a worker cannot run are dead-lettered: never lost silently, never looped on,
and never able to stop the worker.

Every task message passes :func:`refusal` before Celery's strategy sees it: only inferq's
own tasks (``inferq.*``; no Celery built-ins such as ``celery.accumulate``), Celery's
message protocol 2 with headers of the types Celery reads, an accepted content type, and a
body that decodes to ``(args, kwargs, embed)`` with no callbacks, chords or chains. What
fails is dead-lettered with the reason and rejected; anything Celery's own handler still
raises is caught the same way (an exception there would stop the worker, and the message,
put back, would stop the next one). Celery's own refusals (a body it cannot decode, a task
called with arguments its signature does not take) get an entry too. The dead-letter list
(``inferq dead-letters``) says what arrived and why; the body is not kept (it may be huge
or hostile); a queue entry that was not a message at all is kept raw by the transport
(shared/redis_transport.py).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Collection
from datetime import datetime
from typing import Any

from celery import Celery, signals
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.serialization import prepare_accept_content
from vine import promise

from shared.envelope import REFUSED_HEADER

logger = logging.getLogger(__name__)

OnDead = Callable[[dict[str, Any]], None]
_HANDLER = "inferq_on_dead"  # attribute of the Celery app holding the dead-letter writer


TASK_PREFIX = "inferq."
_TEXT = (str, type(None))
# Headers Celery's request reads, and the types it can read them as.
_HEADER_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,), "task": (str,), "root_id": _TEXT, "parent_id": _TEXT, "group": _TEXT,
    "shadow": _TEXT, "argsrepr": _TEXT, "kwargsrepr": _TEXT, "origin": _TEXT,
    "lang": _TEXT, "expires": _TEXT, "eta": (type(None),), "retries": (int, type(None)),
    "group_index": (int, type(None)), "ignore_result": (bool, type(None)),
    "timelimit": (list, tuple, type(None)), "stamped_headers": (list, type(None)),
    "stamps": (dict, type(None)), "replaced_task_nesting": (int, type(None)),
}
_EMBED_KEYS = ("callbacks", "errbacks", "chain", "chord")


def describe(message: Any, reason: str) -> dict[str, Any]:
    """A dead-letter entry for a raw broker message: its headers' id and task, not its body."""
    headers = getattr(message, "headers", None)
    headers = headers if isinstance(headers, dict) else {}
    body = getattr(message, "body", b"") or b""
    return {"reason": reason, "message_id": _short(headers.get("id")),
            "task": _short(headers.get("task")),
            "content_type": _short(getattr(message, "content_type", None)),
            "body_bytes": len(body) if isinstance(body, bytes | str) else None}


def _short(value: Any) -> Any:
    return value if value is None or (isinstance(value, str) and len(value) <= 200) \
        else repr(value)[:200]


def refusal(message: Any, tasks: Collection[str], accept: Collection[str]) -> str | None:
    """Why a worker must not run this task message, or None when it may."""
    headers = message.headers
    if not isinstance(headers, dict):
        return "the message has no headers mapping (Celery protocol 2 is required)"
    if REFUSED_HEADER in headers:
        return str(headers[REFUSED_HEADER])
    task = headers.get("task")
    if not isinstance(task, str):
        return "headers['task'] is missing or not a string (Celery protocol 2 is required)"
    if task not in tasks:
        return f"no such task: {_short(task)!r} (only {TASK_PREFIX}* tasks run here)"
    problem = _header_problem(headers)
    if problem:
        return problem
    if message.content_type not in accept:
        return f"content type {_short(message.content_type)!r} is not accepted"
    if not message.body:
        return "the message body is empty"
    try:
        payload = message.decode()
    except Exception as exc:
        return f"cannot decode the message: {type(exc).__name__}: {exc}"
    return _body_problem(payload)


def _header_problem(headers: dict[str, Any]) -> str | None:
    if not isinstance(headers.get("id"), str) or not headers["id"]:
        return "headers['id'] is missing or not a string"
    for name, types in _HEADER_TYPES.items():
        value = headers.get(name)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            expected = "absent" if types == (type(None),) else \
                " or ".join(t.__name__ for t in types if t is not type(None))
            return f"headers[{name!r}] must be {expected}, got {type(value).__name__}"
    if headers.get("expires") is not None:
        try:
            datetime.fromisoformat(headers["expires"])
        except ValueError:
            return "headers['expires'] is not an ISO 8601 time"
    limits = headers.get("timelimit")
    if limits is not None and (len(limits) != 2 or not all(
            v is None or (isinstance(v, int | float) and not isinstance(v, bool))
            for v in limits)):
        return "headers['timelimit'] must be [soft, hard] seconds"
    return None


def _body_problem(payload: Any) -> str | None:
    if not (isinstance(payload, list | tuple) and len(payload) == 3
            and isinstance(payload[0], list | tuple) and isinstance(payload[1], dict)
            and isinstance(payload[2], dict | None)):
        return "the body is not Celery's [args, kwargs, embed]"
    if not all(isinstance(k, str) for k in payload[1]):
        return "the task's keyword argument names must be strings"
    embed = payload[2] or {}
    if any(embed.get(key) for key in _EMBED_KEYS):
        return "callbacks, errbacks, chains and chords are not run by inferq workers"
    return None


def _dead(app: Any, entry: dict[str, Any]) -> None:
    on_dead: OnDead | None = getattr(app, _HANDLER, None)
    if on_dead is None:
        return
    try:
        on_dead(entry)
    except Exception:  # the refusal itself must go on (ack/reject), store or not
        logger.exception("could not dead-letter %s", entry)


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer behind a gate: a message is checked before Celery handles it,
    and dead-lettered (then rejected) when it is refused or when Celery's handler raises."""

    def create_task_handler(self, promise: Any = promise) -> Callable[[Any], None]:
        handle = super().create_task_handler(promise)
        tasks = frozenset(name for name in self.strategies if name.startswith(TASK_PREFIX))
        accept = frozenset(prepare_accept_content(self.app.conf.accept_content))

        def on_task_received(message: Any) -> None:
            try:
                reason = refusal(message, tasks, accept)
                if reason is None:
                    handle(message)
                    return
            except Exception as exc:
                logger.exception("could not start a task from a message")
                reason = f"the worker could not start it: {type(exc).__name__}: {exc}"
            self._refuse(message, reason)

        return on_task_received

    def _refuse(self, message: Any, reason: str) -> None:
        logger.error("refused a message: %s", reason)
        _dead(self.app, describe(message, reason))
        if not message.acknowledged:
            message.reject_log_error(logger, self.connection_errors)

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
