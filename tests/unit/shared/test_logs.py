"""The JSON log formatter (shared/logs.py) and the CLI's choice of it (INFERQ_LOG_FORMAT)."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared.logs import TEXT_FORMAT, JsonFormatter, handler

PASSWORD = "s3cr3t-pw"


@pytest.fixture
def log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger of its own writing JSON lines to a buffer."""
    out = io.StringIO()
    sink = logging.StreamHandler(out)
    sink.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.unit.logs")
    logger.addHandler(sink)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, out
    logger.removeHandler(sink)


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    text = out.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]  # one object per line


def test_a_line_has_the_base_fields_and_the_extras(log) -> None:
    logger, out = log
    logger.info("job %s model %s: %d of %d rows failed", "j1", "digits", 2, 5,
                extra={"event": "rows_failed", "job_id": "j1", "model": "digits",
                       "version": 3, "worker": "w@h", "duration_s": 0.25, "ok": True,
                       "nothing": None})
    [line] = lines(out)
    assert list(line)[:4] == ["ts", "level", "logger", "message"]
    assert line["level"] == "INFO" and line["logger"] == "tests.unit.logs"
    assert line["message"] == "job j1 model digits: 2 of 5 rows failed"  # args applied
    ts = dt.datetime.fromisoformat(line["ts"].replace("Z", "+00:00"))
    assert line["ts"].endswith("Z") and ts.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.UTC) - ts).total_seconds()) < 60
    assert {k: line[k] for k in ("event", "job_id", "model", "version", "worker",
                                 "duration_s", "ok", "nothing")} == {
        "event": "rows_failed", "job_id": "j1", "model": "digits", "version": 3,
        "worker": "w@h", "duration_s": 0.25, "ok": True, "nothing": None}
    # Only the fields given: none of LogRecord's own attributes leak in.
    assert not {"args", "msg", "pathname", "lineno", "thread", "process"} & set(line)
    assert "exc" not in line


def test_an_extra_never_replaces_a_base_field(log) -> None:
    logger, out = log
    logger.warning("real", extra={"level": "forged", "ts": "then", "logger": "other"})
    [line] = lines(out)
    assert (line["level"], line["logger"]) == ("WARNING", "tests.unit.logs")
    assert line["ts"] != "then"


def test_exceptions_go_to_exc_with_their_traceback(log) -> None:
    logger, out = log
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("message m1: %d jobs failed", 3, extra={"job_ids": ["a", "b"]})
    logger.error("stack", stack_info=True)
    failed, stacked = lines(out)
    assert failed["level"] == "ERROR" and failed["message"] == "message m1: 3 jobs failed"
    assert failed["exc"].startswith("Traceback (most recent call last)")
    assert "ValueError: boom" in failed["exc"] and failed["job_ids"] == ["a", "b"]
    assert "test_exceptions_go_to_exc" in stacked["stack"]


def test_passwords_are_masked_everywhere(log) -> None:
    logger, out = log
    url = f"redis://:{PASSWORD}@store:6379/0"
    try:
        raise ConnectionError(f"cannot reach {url}")
    except ConnectionError:
        logger.exception("storing failed (%s)", f"amqp://user:{PASSWORD}@mq//",
                         extra={"broker": url, "nested": {"urls": [url, f"x?password={PASSWORD}"]},
                                "error": ConnectionError(url)})
    text = out.getvalue()
    assert PASSWORD not in text
    [line] = lines(out)
    assert line["message"] == "storing failed (amqp://user:***@mq//)"
    assert line["broker"] == "redis://:***@store:6379/0"
    assert line["nested"] == {"urls": ["redis://:***@store:6379/0", "x?password=***"]}
    assert line["error"] == "redis://:***@store:6379/0" and "***" in line["exc"]


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


def test_extras_json_cannot_hold_still_make_a_line(log) -> None:
    logger, out = log
    loop: dict[str, Any] = {}
    loop["self"] = loop
    logger.info("odd", extra={
        "array": np.arange(3), "scalar": np.float32(1.5), "count": np.int64(7),
        "path": Path("/tmp/x"), "when": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        "ids": {"b"}, "pair": (1, 2), "nan": math.nan, "inf": math.inf, "raw": b"\xff",
        "thing": object(), "bad": Unprintable(), "loop": loop, "keys": {1: "one"}})
    [line] = lines(out)
    assert line["array"] == "[0 1 2]"
    assert line["scalar"] == 1.5 and line["count"] == 7
    assert line["path"] == "/tmp/x" and line["when"] == "2024-01-02T03:04:05+00:00"
    assert line["ids"] == ["b"] and line["pair"] == [1, 2]
    assert line["nan"] == "nan" and line["inf"] == "inf"  # bare NaN is not JSON
    assert line["raw"] == "b'\\xff'" and line["thing"].startswith("<object object")
    assert line["bad"] == "<unprintable Unprintable: RuntimeError>"
    assert line["keys"] == {"1": "one"}
    assert isinstance(line["loop"]["self"], dict)  # cut at a depth, not a RecursionError


def test_uvicorns_coloured_copy_of_the_message_is_dropped(log) -> None:
    logger, out = log
    logger.info("Started server process [%d]", 1,
                extra={"color_message": "Started server process [\x1b[36m%d\x1b[0m]"})
    [line] = lines(out)
    assert "color_message" not in line and line["message"] == "Started server process [1]"


def test_handler_picks_the_format() -> None:
    assert isinstance(handler("json").formatter, JsonFormatter)
    text = handler("text").formatter
    assert text is not None and not isinstance(text, JsonFormatter)
    assert text._fmt == TEXT_FORMAT


@contextlib.contextmanager
def bare_root() -> Iterator[logging.Logger]:
    """The root logger without handlers, as in a fresh CLI process; restored after.
    (pytest puts its capture handlers on it around each test phase.)"""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers.clear()
    try:
        yield root
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:] = saved
        root.setLevel(level)
        logging.captureWarnings(False)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_the_cli_logs_in_the_configured_format(fmt, monkeypatch) -> None:
    from cli.main import _setup_logging

    monkeypatch.setenv("INFERQ_LOG_FORMAT", fmt)
    with bare_root() as root:
        assert _setup_logging("debug") is (fmt == "json")
        [only] = root.handlers
        assert isinstance(only.formatter, JsonFormatter) is (fmt == "json")
        assert root.level == logging.DEBUG


def test_an_unknown_log_format_names_the_variable(monkeypatch) -> None:
    from shared.errors import ConfigError
    from shared.settings import load_settings

    monkeypatch.setenv("INFERQ_LOG_FORMAT", "xml")
    with pytest.raises(ConfigError, match="INFERQ_LOG_FORMAT"):
        load_settings()
