"""Settings come from INFERQ_* variables; a bad value names the variable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.errors import ConfigError
from shared.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No INFERQ_* variable of the caller's shell leaks into these tests."""
    for var in [v for v in os.environ if v.startswith("INFERQ_")]:
        monkeypatch.delenv(var)


def test_defaults() -> None:
    s = load_settings()
    assert isinstance(s, Settings)
    assert s.broker_url is None and s.result_backend is None
    assert s.embedded
    assert s.home == Path.home() / ".inferq"
    assert s.model_repo == "models"
    assert s.queue_prefix == ""
    assert s.max_batch_rows == 512
    assert s.max_delay_ms == 5.0
    assert s.chunk_rows is None  # per model: producer.bulk.chunks.chunk_rows_for
    assert s.max_in_flight == 64
    assert s.concurrency == 32
    assert s.visibility_timeout == 3600
    assert s.result_expires == 7 * 24 * 3600
    assert s.max_message_bytes == 64 * 2**20
    assert s.task_max_retries == 3
    assert s.fault_injection == ""
    assert s.ort_threads == 0 and s.effective_ort_threads() >= 1


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INFERQ_MAX_BATCH_ROWS", "32")
    monkeypatch.setenv("INFERQ_MAX_DELAY_MS", "2.5")
    monkeypatch.setenv("INFERQ_QUEUE_PREFIX", "t-1.a_b")
    monkeypatch.setenv("INFERQ_HOME", str(tmp_path))
    monkeypatch.setenv("INFERQ_ORT_THREADS", "3")
    s = load_settings()
    assert (s.max_batch_rows, s.max_delay_ms, s.queue_prefix) == (32, 2.5, "t-1.a_b")
    assert s.home == tmp_path
    assert s.effective_ort_threads() == 3


def test_overrides_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERQ_MAX_BATCH_ROWS", "32")
    assert load_settings(max_batch_rows=8).max_batch_rows == 8


def test_non_numeric_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERQ_MAX_BATCH_ROWS", "abc")
    with pytest.raises(ConfigError, match="INFERQ_MAX_BATCH_ROWS"):
        load_settings()


@pytest.mark.parametrize(("var", "value"), [
    ("INFERQ_MAX_BATCH_ROWS", "0"),
    ("INFERQ_MAX_DELAY_MS", "-1"),
    ("INFERQ_CHUNK_ROWS", "2000000"),
    ("INFERQ_RESULT_EXPIRES", "10"),
    ("INFERQ_MAX_MESSAGE_BYTES", "10"),
    ("INFERQ_CONCURRENCY", "many"),
])
def test_out_of_range_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, var: str,
                                               value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=var):
        load_settings()


def test_every_bad_variable_is_named_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERQ_MAX_BATCH_ROWS", "abc")
    monkeypatch.setenv("INFERQ_CONCURRENCY", "0")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "INFERQ_MAX_BATCH_ROWS" in str(info.value)
    assert "INFERQ_CONCURRENCY" in str(info.value)


@pytest.mark.parametrize("prefix", ["a/b", "tenant one", "x:y", "../"])
def test_queue_prefix_with_odd_characters_is_rejected(monkeypatch: pytest.MonkeyPatch,
                                                      prefix: str) -> None:
    monkeypatch.setenv("INFERQ_QUEUE_PREFIX", prefix)
    with pytest.raises(ConfigError, match="INFERQ_QUEUE_PREFIX"):
        load_settings()


def test_amqp_broker_needs_a_result_backend() -> None:
    s = load_settings(broker_url="amqp://guest:guest@localhost:5672//")
    assert not s.embedded
    with pytest.raises(ConfigError, match="INFERQ_RESULT_BACKEND"):
        s.effective_result_backend()


def test_amqp_broker_with_a_result_backend_uses_it() -> None:
    s = load_settings(broker_url="amqp://localhost//", result_backend="redis://r:6379/3")
    assert s.effective_result_backend() == "redis://r:6379/3"


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "rediss://secure:6380/1"])
def test_redis_broker_is_the_default_result_backend(url: str) -> None:
    assert load_settings(broker_url=url).effective_result_backend() == url


def test_explicit_result_backend_wins_over_the_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERQ_BROKER_URL", "redis://a:6379/0")
    monkeypatch.setenv("INFERQ_RESULT_BACKEND", "redis://b:6379/5")
    assert load_settings().effective_result_backend() == "redis://b:6379/5"


def test_embedded_results_live_under_home(tmp_path: Path) -> None:
    s = load_settings(home=tmp_path / "home")
    assert s.embedded
    backend = s.effective_result_backend()
    assert backend == "file://" + str((tmp_path / "home" / "results").resolve())
    assert backend.startswith("file:///")


def test_empty_broker_url_means_embedded(monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    monkeypatch.setenv("INFERQ_BROKER_URL", "")
    s = load_settings(home=tmp_path)
    assert s.embedded
    assert s.effective_result_backend().startswith("file://")
