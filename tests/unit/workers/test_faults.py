"""Fault injection: parsed strictly, installed only when asked for."""

from __future__ import annotations

import numpy as np
import pytest

from workers import faults


def model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"y": inputs["x"].reshape(len(inputs["x"]), -1).sum(axis=1)}


@pytest.mark.parametrize(("spec", "want"), [
    ("", {}),
    (" , ,", {}),
    ("delay_ms=20", {"delay_ms": 20.0}),
    ("raise_on=-7", {"raise_on": -7.0}),
    ("delay_ms=0.5, raise_on=-7,exit_on=-9", {"delay_ms": 0.5, "raise_on": -7.0,
                                              "exit_on": -9.0}),
    ("raise_on=1,raise_on=2", {"raise_on": 2.0}),
])
def test_parse_good_specs(spec: str, want: dict[str, float]) -> None:
    assert faults.parse(spec) == want


@pytest.mark.parametrize("spec", ["delay_ms", "crash=1", "Delay_ms=1", "=5", "delay_ms:20"])
def test_parse_rejects_unknown_or_malformed_items(spec: str) -> None:
    with pytest.raises(ValueError, match="INFERQ_FAULT_INJECTION"):
        faults.parse(spec)


@pytest.mark.parametrize("spec", ["delay_ms=abc", "raise_on=", "delay_ms=1,exit_on=x"])
def test_parse_rejects_non_numeric_values(spec: str) -> None:
    with pytest.raises(ValueError):
        faults.parse(spec)


@pytest.mark.parametrize("spec", ["", " ", ",,"])
def test_empty_spec_returns_the_same_function(spec: str) -> None:
    assert faults.wrap(model, spec) is model


def test_raise_on_fires_only_when_a_row_starts_with_the_value() -> None:
    run = faults.wrap(model, "raise_on=-7")
    assert run is not model

    clean = {"x": np.array([[1.0, -7.0], [2.0, 3.0]], np.float32)}  # -7 but not first
    np.testing.assert_array_equal(run(clean)["y"], [-6.0, 5.0])

    poisoned = {"x": np.array([[1.0, 2.0], [-7.0, 3.0]], np.float32)}
    with pytest.raises(ValueError, match="injected fault"):
        run(poisoned)


def test_raise_on_looks_at_the_first_value_of_multi_dim_rows() -> None:
    run = faults.wrap(model, "raise_on=-7")
    x = np.zeros((3, 1, 8, 8), np.float32)
    x[1, 0, 0, 1] = -7  # second value of row 1: not a poison row
    assert run({"x": x})["y"].shape == (3,)
    x[2, 0, 0, 0] = -7
    with pytest.raises(ValueError):
        run({"x": x})


def test_exit_on_does_nothing_to_rows_that_do_not_match() -> None:
    run = faults.wrap(model, "exit_on=-9,delay_ms=0")
    out = run({"x": np.array([[1.0, -9.0]], np.float32)})
    np.testing.assert_array_equal(out["y"], [-8.0])


def test_the_fault_log_records_each_call_that_returned(tmp_path) -> None:
    import os

    log = tmp_path / "calls.log"
    run = faults.wrap(model, "raise_on=-7", log_path=str(log))
    run({"x": np.ones((3, 2), np.float32)})
    run({"x": np.ones((1, 2), np.float32)})
    with pytest.raises(ValueError):
        run({"x": np.full((2, 2), -7.0, np.float32)})  # raised: not logged
    assert log.read_text().splitlines() == [f"{os.getpid()} 3", f"{os.getpid()} 1"]


def test_row_delay_grows_with_the_rows_of_a_call(monkeypatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    run = faults.wrap(model, "row_delay_ms=2,delay_ms=1")
    run({"x": np.ones((5, 2), np.float32)})
    assert slept == [pytest.approx(0.011)]
