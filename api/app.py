"""The results API: ``create_app`` builds the FastAPI app; ``inferq api`` serves it.

Routes live in ``jobs.py`` and ``batches.py``; this module wires them, maps errors to
answers (422 naming row and field, 404, 503 for an outage, never a traceback), and serves
health, readiness, metrics and the model list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import redis
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from kombu.exceptions import OperationalError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api import batches, jobs, oip
from api.auth import Keyring
from api.callbacks import Dispatcher
from api.context import (
    Api,
    Who,
    api_of,
    check_rate,
    identify,
    rate_of,
    ready_checks,
)
from api.fastlane import FastLane
from api.limits import BodyLimit, QueueDepth
from api.schemas import ModelView, Problem
from api.store import ApiStore
from producer.client import Client
from shared import tracing
from shared.errors import (
    ConfigError,
    InputError,
    InvalidModelName,
    JobNotFound,
    ModelNotFound,
    Unavailable,
)
from shared.objectstore import is_remote
from shared.repository import ModelVersion
from shared.settings import Settings, load_settings, scrub

logger = logging.getLogger(__name__)
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "description": text} for code, text in (
        (400, "a body that cannot be parsed (e.g. not UTF-8)"),
        (401, "no or unknown API key"), (404, "not found, or not this tenant's"),
        (413, "body or rows over the limit"), (422, "invalid input, naming row and field"),
        (429, "rate limit or queue backpressure; see Retry-After"),
        (503, "broker or result store unavailable"))}
def create_app(settings: Settings | None = None, *, keyring: Keyring | None = None,
               callbacks: bool = True, callback_backoff_s: float = 1.0) -> FastAPI:
    settings = settings or load_settings()
    if settings.embedded:
        from shared.errors import ConfigError

        raise ConfigError("INFERQ_BROKER_URL: the API publishes to a broker that workers "
                          "consume; set it (redis://… or amqp://…)")
    tracing.setup(settings.tracing, "inferq-api")
    client = Client(settings)
    api = Api(settings, client, ApiStore(settings, client.app),
              keyring or Keyring.from_settings(settings), QueueDepth(settings, client.app))
    if not len(api.keyring):
        logger.warning("no API keys configured (INFERQ_API_KEYS or INFERQ_API_KEYS_FILE): "
                       "every request will get 401")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        dispatcher = Dispatcher(api, callback_backoff_s) if callbacks else None
        task = asyncio.create_task(dispatcher.run()) if dispatcher else None
        try:
            yield
        finally:
            if dispatcher and task:
                await dispatcher.stop()
                await task
            await api.notifier.close()
            await api.store.close_async()
            api.depth.close()

    app = FastAPI(title="inferq", version="1", lifespan=lifespan, responses=ERRORS,
                  description="Enqueue inference jobs and batches, poll or stream results. "
                  "Authenticate with `Authorization: Bearer <key>`.")
    app.state.api = api
    app.include_router(jobs.router)
    app.include_router(batches.router)
    app.include_router(oip.router)
    _errors(app)
    _routes(app)
    app.add_middleware(FastLane, api=api, fastapi=app)  # type: ignore[arg-type]
    app.add_middleware(Measure, api=api)  # type: ignore[arg-type]
    app.add_middleware(BodyLimit, limit=settings.api_max_body_bytes)  # type: ignore[arg-type]
    app.add_middleware(Gate, api=api)  # type: ignore[arg-type]  # outermost: before any body
    return app


class Gate:
    """ASGI middleware: every ``/v1/`` request is authenticated and rate-limited before
    its body is read, so a request without a valid key costs no parsing (it used to get
    a 422 for a malformed body, or spend seconds parsing 60 MB, before its 401)."""

    def __init__(self, app: Any, api: Api):
        self.app = app
        self.api = api

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not guarded(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        client = scope["client"][0] if scope.get("client") else None
        try:
            who = identify(self.api, authorization, client, scope["method"], scope["path"])
            rate = rate_of(self.api, who)
            if rate:  # on the event loop: no thread for a counter
                check_rate(who, rate, await self.api.store.hit_async(who.tenant, time.time()))
        except HTTPException as exc:
            await _problem(exc.status_code, str(exc.detail), exc.headers,
                           scope["path"])(scope, receive, send)
            return
        except redis.RedisError as exc:  # the rate limit's counter lives in the store
            await _store_down(scope["path"], exc)(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = who
        await self.app(scope, receive, send)


def _store_down(path: str, exc: Exception) -> JSONResponse:
    logger.warning("result store error on %s: %s", path, scrub(str(exc)))
    return _problem(503, "the result store is unavailable "
                    f"({type(exc).__name__}); retry later", {"Retry-After": "5"}, path)


def _problem(status: int, detail: str, headers: Mapping[str, str] | None = None,
             path: str = "", **extra: Any) -> JSONResponse:
    """An error answer: ``Problem`` on inferq's routes, ``{"error": ...}`` (the Open
    Inference Protocol's shape) on ``/v2/``."""
    body = ({"error": detail} if path.startswith("/v2/")
            else Problem(detail=detail, **extra).model_dump(exclude_none=True))
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def public_text(settings: Settings, text: str) -> str:
    """``text`` without this server's paths: an uploaded file becomes "the uploaded file",
    the model repository "the model repository" (clients see neither)."""
    uploads = settings.home / "api-uploads"
    for folder in {str(uploads), str(uploads.resolve())}:
        text = re.sub(re.escape(folder) + r"/[\w.-]+", "the uploaded file", text)
    # The absolute path only: a relative one ("models") is also an ordinary word.
    repo = settings.model_repo
    shown = repo if is_remote(repo) else str(Path(repo.removeprefix("file://")).resolve())
    text = text.replace(shown.rstrip("/"), "the model repository")
    text = text.replace(str(settings.effective_model_cache().resolve()), "the model cache")
    with contextlib.suppress(ConfigError):  # the catalog's messages name the result store
        text = text.replace(scrub(settings.effective_result_backend()), "the result store")
    return text


def _errors(app: FastAPI) -> None:
    def public(request: Request, text: str) -> str:
        return public_text(api_of(request).settings, text)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _problem(exc.status_code, str(exc.detail), exc.headers, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
            where = "body"
        return _problem(422, f"{where}: {first.get('msg', 'invalid')}",
                        path=request.url.path, field=where)

    @app.exception_handler(InputError)
    async def bad_input(request: Request, exc: InputError) -> JSONResponse:
        return _problem(422, public(request, str(exc)), path=request.url.path, row=exc.row,
                        field=exc.field)

    @app.exception_handler(ModelNotFound)
    async def no_model(request: Request, exc: ModelNotFound) -> JSONResponse:
        return _problem(404, public(request, str(exc)), path=request.url.path,
                        field="model")

    @app.exception_handler(InvalidModelName)
    async def bad_model(request: Request, exc: InvalidModelName) -> JSONResponse:
        return _problem(422, str(exc), path=request.url.path, field="model")

    @app.exception_handler(JobNotFound)
    async def no_job(request: Request, exc: JobNotFound) -> JSONResponse:
        return _problem(404, str(exc), path=request.url.path)

    @app.exception_handler(redis.RedisError)
    async def store_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        return _store_down(request.url.path, exc)

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        # The SDK's message names hosts and ports: logged here, not told to API clients.
        logger.warning("unavailable on %s: %s", request.url.path, scrub(str(exc)))
        what = "the broker" if "broker" in str(exc) else "the result store"
        return _problem(503, f"{what} is unavailable; nothing was enqueued, retry later",
                        {"Retry-After": "5"}, request.url.path)

    @app.exception_handler(OperationalError)
    async def broker_down(request: Request, exc: OperationalError) -> JSONResponse:
        logger.warning("broker error on %s: %s", request.url.path, scrub(str(exc)))
        return _problem(503, "the broker is unavailable; nothing was enqueued, retry later",
                        {"Retry-After": "5"}, request.url.path)


def _model_view(version: ModelVersion, variants: list[str]) -> ModelView:
    m = version.manifest
    return ModelView(name=m.name, version=m.version, variant=m.variant, task=m.task,
                     runtime=m.runtime, inputs=[s.model_dump() for s in m.inputs],
                     outputs=[s.model_dump() for s in m.outputs], quality=m.quality,
                     variants=variants)


def _models(api: Api, name: str | None = None) -> list[ModelView]:
    repo = api.client.repo
    views = []
    for model in [name] if name else repo.names():
        version, _ = api.model(model)
        variants = sorted({v.manifest.variant for v in repo.all(version.manifest.name)})
        views.append(_model_view(version, variants))
    return views


def _routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["ops"], summary="The process is up")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="Broker and result store reachable (else 503)")
    def readyz(request: Request) -> JSONResponse:
        checks = ready_checks(api_of(request))
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", **checks},
                            status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics",
             response_class=Response)
    def metrics(request: Request) -> Response:
        return Response(generate_latest(api_of(request).metrics.scraped()),
                        media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", tags=["models"], response_model=list[ModelView],
             summary="Models in the repository, each at the version it serves now")
    def list_models(request: Request, who: Who) -> list[ModelView]:
        return _models(api_of(request))

    @app.get("/v1/models/{name}", tags=["models"], response_model=ModelView,
             summary="One model's manifest: inputs, outputs, variants, quality")
    def get_model(name: str, request: Request, who: Who) -> ModelView:
        return _models(api_of(request), name)[0]


def guarded(path: str) -> bool:
    """Routes behind the key and the rate limit: all of /v1/, and /v2/ but its health."""
    return path.startswith("/v1/") or (path.startswith("/v2/")
                                       and not path.startswith("/v2/health/"))


# Label values come from fixed sets only: anyone, key or not, can send any method.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Measure:
    """ASGI middleware: each request counted by method, route and status, and timed."""

    def __init__(self, app: Any, api: Api):
        self.app = app
        self.api = api

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.api.metrics.requests.labels(method, path, str(status)).inc()
            self.api.metrics.request_seconds.labels(method, path).observe(
                time.perf_counter() - started)
