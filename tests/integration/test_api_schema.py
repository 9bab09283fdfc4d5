"""Schemathesis against the API's own ``/openapi.json``: generated requests, each with a
valid key, to every operation of an app on real Redis (no worker); no answer is a 5xx, and
every answer matches the document (status code, content type, headers, body schema).

``@schema.parametrize()`` needs the schema at collection, before any fixture exists, so it
is read from an app built only for its document (no I/O, no callback dispatcher). The
requests go to the test's own app, built by a fixture from the Redis environment; the test
first checks that both serve the same document.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python import asgi

from api.app import create_app
from shared.settings import load_settings
from tests.integration.test_api import A, settings_for

pytestmark = [
    pytest.mark.integration,
    # Schemathesis's negative-data strategies use `random`; Hypothesis warns about it
    # only on some draws, which the project's warnings-as-errors turns into a flaky failure.
    pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies"
                               ":hypothesis.errors.HypothesisDeprecationWarning"),
]

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, ignored_auth]

# An NDJSON body is documented as a string: sent as text, as text/plain is.
schemathesis.serializer.alias("application/x-ndjson", "text/plain")
# msgpack and .npy job bodies are documented as binary: sent as raw bytes (mostly garbage
# to both decoders, which must answer 422, never 500).
schemathesis.serializer.alias(["application/msgpack", "application/x-npy"],
                              "application/octet-stream")

# Constructing the app connects to nothing; it only serves /openapi.json here.
DOCUMENT_APP = create_app(load_settings(broker_url="redis://127.0.0.1:6379/0",
                                        result_backend=None, api_keys="doc:only",
                                        api_keys_file=None), callbacks=False)
schema = schemathesis.openapi.from_asgi("/openapi.json", DOCUMENT_APP)


@pytest.fixture
def app(redis_env: dict[str, str]) -> Iterator[FastAPI]:
    """The app under test; short long-polls, so a job that stays queued answers quickly."""
    app = create_app(settings_for(redis_env, api_rate_per_s=0, api_wait_max_s=0.2,
                                  api_max_body_bytes=64 * 1024))
    assert app.openapi() == schema.raw_schema
    yield app
    asgi.shutdown_lifespans()  # schemathesis ran the app's lifespan; stop it before cleanup


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_every_answer_matches_the_document(case: Any, app: FastAPI) -> None:
    case.call_and_validate(app=app, headers=A, checks=CHECKS)
