"""The poison-row search's bookkeeping on a real Redis: a cursor left by a dead worker
becomes blame, and a row blamed once runs first in the next delivery (so a second kill
from outside, at about the same moment after a worker starts, lands on another row)."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import numpy as np
import pytest
import redis

from tests.conftest import need
from workers.batcher import Batcher
from workers.deliveries import Deliveries, run_suspect

pytestmark = pytest.mark.integration


@pytest.fixture
def deliveries():
    need(6379, "redis")
    client = redis.Redis()
    made = Deliveries(client, expires=60, max_deliveries=5, queue_prefix=f"t-{uuid.uuid4().hex}")
    yield made
    client.delete(made.dead_key)


def test_a_row_blamed_once_runs_first_in_the_next_delivery(deliveries) -> None:
    message = f"t-{uuid.uuid4().hex}"
    try:
        first = deliveries.record(message, "w1")
        assert first.blamed == {} and first.once_blamed() == []
        killed = deliveries.running(first, 3)  # its worker is killed inside row 3's call:
        killed.__enter__()                     # the context is never left
        second = deliveries.record(message, "w2")
        assert second.blamed == {3: 1} and second.count == 3
        assert second.once_blamed() == [3] and second.dead_rows() == set()

        order: list[int] = []
        batcher = Batcher(lambda x: order.append(int(x["x"][0, 0])) or {"y": x["x"]},
                          name="toy@1", max_batch_rows=8, max_delay_ms=0)
        batcher.start()
        try:
            served = SimpleNamespace(batcher=batcher,
                                     version=SimpleNamespace(key="toy@1",
                                                             manifest=SimpleNamespace(name="toy")))
            pool = SimpleNamespace(settings=SimpleNamespace(visibility_timeout=10),
                                   metrics=SimpleNamespace(dead_lettered=lambda name: None))
            x = np.arange(6, dtype=np.float32).reshape(6, 1)
            out = run_suspect(deliveries, pool, served, {"x": x}, second,  # type: ignore[arg-type]
                              lambda i: {"row": i})
        finally:
            batcher.stop()
        assert order == [3, 0, 1, 2, 4, 5]
        assert out.errors == {}
        np.testing.assert_array_equal(out.outputs["y"], x)  # type: ignore[index]
    finally:
        deliveries.done(message)
