"""Log lines as one JSON object each (``INFERQ_LOG_FORMAT=json``), for log shippers.

Every line has ``ts`` (ISO 8601, UTC), ``level``, ``logger`` and ``message``, then the
structured fields the call passed with ``extra=`` (``job_id``, ``model``, ``tenant``,
``event``, ...), then ``exc`` for an exception. URL passwords are masked in every string
(``shared.settings.scrub``), as a message may quote a broker or store URL.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from typing import Any

from shared.settings import scrub

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What every LogRecord carries; anything else on a record came through ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName"}
# uvicorn repeats each message with ANSI colours in ``color_message``: not a field.
_SKIP = frozenset({"color_message"})
_MAX_DEPTH = 4


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON can hold it: strings scrubbed, containers walked, the rest str()."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # NaN is not JSON
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if depth < _MAX_DEPTH:
        if isinstance(value, dict):
            return {str(k): _plain(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [_plain(v, depth + 1) for v in value]
    item = getattr(value, "item", None)  # a numpy scalar
    if callable(item) and getattr(value, "shape", None) == ():
        return _plain(item(), depth)
    try:
        return scrub(str(value))
    except Exception as exc:  # noqa: BLE001 - a broken __str__ must not lose the line
        return f"<unprintable {type(value).__name__}: {type(exc).__name__}>"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, dt.UTC)
        line: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in _SKIP and key not in line:
                line[key] = _plain(value)
        if record.exc_info:
            line["exc"] = scrub(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exc"] = scrub(record.exc_text)
        if record.stack_info:
            line["stack"] = scrub(self.formatStack(record.stack_info))
        return json.dumps(line, ensure_ascii=False)


def handler(log_format: str) -> logging.Handler:
    """A stderr handler writing ``log_format`` ("text" or "json") lines."""
    out = logging.StreamHandler()
    out.setFormatter(JsonFormatter() if log_format == "json"
                     else logging.Formatter(TEXT_FORMAT))
    return out


def configure(level: str, log_format: str) -> None:
    """The root logger: stderr, text or one JSON object a line (docs/logs.md)."""
    logging.basicConfig(level=level.upper(), handlers=[handler(log_format)])
    logging.captureWarnings(log_format == "json")  # warnings as JSON lines too
