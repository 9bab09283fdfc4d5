"""The hot route without the framework's per-request machinery.

``POST /v1/models/{model}/jobs`` with a JSON body is most of an online backend's traffic.
Through FastAPI it paid for routing, dependency solving and four wrappers around every
send: about half of the API's CPU per request (py-spy, bench/http.py). This ASGI
middleware (inside the gate, the body cap and the metrics) answers that one route itself,
with the same functions as the route (``jobs.submit``) and the same error handlers, so
the answer is the same byte for byte in status and body. A JSON request it does not
recognise (an unknown query parameter, a body that does not validate) it hands to
FastAPI with the body replayed, before anything was enqueued: FastAPI then answers
exactly as it always did. msgpack and ``.npy`` bodies (``bodies.py``) are answered here
only, malformed ones included.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import ValidationError

from api import jobs
from api.bodies import BODY_TYPES, JSON, decode_job, media_type, wants_msgpack
from api.context import Api
from api.jobs import parse_wait, submit
from api.schemas import JobRequest
from shared import tracing
from shared.errors import InputError

PATH = re.compile(r"^/v1/models/([^/]+)/jobs$")


class FastLane:
    def __init__(self, app: Any, api: Api, fastapi: FastAPI):
        self.app = app
        self.api = api
        self.fastapi = fastapi
        self.route = next(r for r in jobs.router.routes
                          if getattr(r, "path", None) == "/v1/models/{model}/jobs")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        found = PATH.match(scope["path"]) if scope["type"] == "http" \
            and scope["method"] == "POST" else None
        who = scope.get("state", {}).get("principal")
        headers = _headers(scope)
        kind = media_type(headers.get(b"content-type"))
        query = _query(scope, kind)
        if found is None or who is None or query is None or kind not in BODY_TYPES:
            await self.app(scope, receive, send)
            return
        body = await _read(receive)
        replay = _replay(body, receive)
        if kind == JSON:
            try:
                job = JobRequest.model_validate_json(body)
                seconds = parse_wait(query.get("wait"), self.api.settings.api_wait_max_s)
            except (ValidationError, InputError):  # nothing enqueued: FastAPI says why
                await self.app(scope, replay, send)
                return
        scope["route"] = self.route  # the metrics' route label, as FastAPI sets it
        try:
            if kind != JSON:
                seconds = parse_wait(query.pop("wait", None),
                                     self.api.settings.api_wait_max_s)
                job = decode_job(kind, body, query)
            status, content, extra, media = await submit(
                self.api, who, found.group(1), job, seconds,
                wants_msgpack(headers.get(b"accept")), tracing.incoming(headers))
            response = Response(content, status, extra, media_type=media)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise  # the server error middleware answers 500, as for any route
            response = await handler(Request(scope, replay), exc)
        await response(scope, receive, send)

    def _handler(self, exc: Exception) -> Any:
        handlers = self.fastapi.exception_handlers
        return next((handlers[cls] for cls in type(exc).__mro__ if cls in handlers), None)


_KEPT = (b"content-type", b"accept", b"traceparent", b"tracestate")


def _headers(scope: dict) -> dict[bytes, bytes]:
    return {name: value for name, value in scope.get("headers") or ()
            if name in _KEPT}


def _query(scope: dict, kind: str) -> dict[str, str] | None:
    """The query as a dict; None (FastAPI answers) when a JSON request's query holds more
    than one ``wait``."""
    pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                      keep_blank_values=True)
    if kind == JSON and (len(pairs) > 1 or any(k != "wait" for k, _ in pairs)):
        return None
    return dict(pairs)


async def _read(receive: Any) -> bytes:
    parts = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(parts)


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that gives ``body`` once, then what the connection says."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # type: ignore[no-any-return]

    return replay
