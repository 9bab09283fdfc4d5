"""Claims sent ahead (``Claims.send``) on a real Redis: read later, they say what a plain
claim says, and a connection lost in between is claimed again, not a job lost or run
against a cancel."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest
import redis

from shared import keys
from shared.claims import CANCELLED, RUN, Claims
from tests.conftest import need

pytestmark = pytest.mark.integration


@pytest.fixture
def claims():
    need(6379, "redis")
    client = redis.Redis()
    made = Claims(SimpleNamespace(client=client), expires=60)
    ids = [f"t-claims-{uuid.uuid4().hex}" for _ in range(3)]
    yield made, ids
    client.delete(*[keys.claim(j) for j in ids])


def test_sent_claims_read_later_say_what_a_claim_says(claims) -> None:
    made, ids = claims
    assert made.cancel([ids[1]]) == [True]
    sent = made.send(ids)
    assert sent.taken() == [True, False, True]
    assert sent.taken() == [True, False, True]  # read once, remembered
    assert made.states(ids) == [RUN, CANCELLED, RUN]
    assert made.cancel(ids) == [False, True, False]  # a run claim refuses the cancel


def test_a_connection_lost_before_the_read_is_claimed_again(claims) -> None:
    made, ids = claims
    sent = made.send(ids)
    connection = sent._connection
    assert connection is not None
    connection.disconnect()  # the replies are gone with it
    assert sent.taken() == [True, True, True]  # its own claims again: SET NX GET
    assert made.states(ids) == [RUN, RUN, RUN]
    pool = made.redis.connection_pool
    assert connection not in pool._in_use_connections  # given back, not leaked


def test_a_server_that_cannot_be_reached_fails_the_read_as_the_store_does(claims) -> None:
    made, ids = claims
    made.redis = redis.Redis(port=1, socket_connect_timeout=0.2,
                             retry=None)  # nothing listens on port 1
    sent = made.send(ids)
    with pytest.raises(redis.ConnectionError):
        sent.taken()


def test_discarded_claims_give_their_connection_back(claims) -> None:
    made, ids = claims
    sent = made.send(ids)
    connection = sent._connection
    sent.discard()
    assert connection not in made.redis.connection_pool._in_use_connections
