"""What every route needs: settings, the SDK client, the API store, keys, limits, metrics;
plus the dependencies that authenticate a request and apply its tenant's rate limit."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.auth import Keyring, Principal
from api.limits import QueueDepth
from api.metrics import ApiMetrics
from api.store import Admission, ApiStore
from api.submitter import LoopSubmitter, Quota
from api.urls import UrlRefused, check_callback_url
from producer.client import Client
from producer.coalesce import Coalescer
from producer.notify import Notifier
from shared import keys
from shared.repository import ModelRef, ModelVersion
from shared.settings import Settings

AUDIT = logging.getLogger("inferq.audit")
_AUDIT_NAMES = {"job_id": "job", "batch_id": "batch", "key_id": "key"}  # in the text line

# Publishing from a request fails fast: a broker outage answers 503, not a hung request.
FAST_PUBLISH = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2,
                "interval_max": 0.5}


@dataclass
class Api:
    settings: Settings
    client: Client
    store: ApiStore
    keyring: Keyring
    depth: QueueDepth
    metrics: ApiMetrics = field(init=False)
    coalescer: Coalescer = field(init=False)
    notifier: Notifier = field(init=False)
    submitter: LoopSubmitter | None = field(init=False)  # None: jobs go by the coalescer
    in_flight: int = 0  # job requests in progress on the event loop (api/jobs.py)
    enqueue_healthy: bool = True  # the last enqueue did not fail for an outage

    def __post_init__(self) -> None:
        replies = keys.new_reply_channel("api")
        self.notifier = Notifier(self.settings.effective_result_backend(), replies)
        self.metrics = ApiMetrics(self.depths)
        # Concurrent requests share broker messages; the API records jobs itself; workers
        # publish each message's results on this process's reply channel (producer/notify.py).
        self.coalescer = Coalescer(self.client, FAST_PUBLISH, mark=False, reply_to=replies)
        publisher = self.client.direct
        self.submitter = LoopSubmitter(self.store, self.client, publisher, replies,
                                       FAST_PUBLISH) \
            if publisher is not None and LoopSubmitter.usable(self.client) else None

    def depths(self) -> dict[str, int]:
        return {name: self.depth.depth(name) for name in self.client.repo.names()}

    def model(self, ref: str) -> tuple[ModelVersion, ModelRef]:
        return self.client.model(ref)

    def admission(self, who: Principal, model: str) -> Admission | None:
        """Fair admission (docs/api.md): work enters when the tenant's own open work
        stays within its share of the model's queue limit, or when the model's queue has
        room for it all; None: the model has no limit."""
        quota = self.quota(who, model)
        return None if quota is None else Admission(
            model, quota.tenant, quota.share, self.depth.estimate(model), quota.limit)

    def quota(self, who: Principal, model: str) -> Quota | None:
        """``admission`` but for the queue's depth; None: the model has no limit."""
        limit = self.depth.limit(model)
        if not limit:
            return None
        fraction = self.settings.api_tenant_queue_share if who.queue_share is None \
            else who.queue_share
        return Quota(who.tenant, max(1, math.ceil(limit * fraction)), limit)

    def admit_work(self, who: Principal, model: str, ids: list[str]) -> None:
        """``ids`` (jobs, or a batch's chunks) admitted (``admission``); else 429 with
        Retry-After."""
        admission = self.admission(who, model)
        if admission is not None:
            self.admitted(admission, len(ids), *self.store.admit(admission, ids))

    def create_job(self, who: Principal, job_id: str, record: dict[str, Any],
                   callback: bool) -> dict[str, str]:
        """One job admitted and recorded as queued, in one round trip."""
        admission = self.admission(who, record["model"])
        flat, held = self.store.create_job(job_id, record, callback=callback,
                                           admission=admission)
        if admission is not None:
            self.admitted(admission, 1, held is None, held or 0)
        return flat

    def admitted(self, a: Admission, count: int, ok: bool, held: int) -> None:
        """Count ``count`` admitted ids in the depth estimate, or answer 429."""
        if ok:
            self.depth.added(a.model, count)
            return
        raise self.refusal(a, count, held)

    def refusal(self, a: Admission, count: int, held: int) -> HTTPException:
        """The 429 of ``count`` ids refused: the depth, the limit, the tenant's share."""
        return HTTPException(
            429, f"model {a.model!r} has {a.depth} messages waiting (limit {a.limit}) and "
            f"tenant {a.tenant!r} has {held} jobs or chunks waiting (its share: "
            f"{a.share}); retry later", headers={
                "Retry-After": str(self.depth.retry_after(a.model, a.depth + count))})

    def callback_secret(self, who: Principal) -> str:
        return who.callback_secret or self.settings.callback_secret

    def check_callback(self, who: Principal, url: Any) -> str | None:
        if url is None:
            return None
        if not self.callback_secret(who):
            raise HTTPException(422, "callback_url: the server has no signing secret for "
                                "this tenant (INFERQ_CALLBACK_SECRET or the key's "
                                "callback_secret); callbacks are always signed")
        try:
            return check_callback_url(str(url), self.settings.callback_allow_private)
        except UrlRefused as exc:
            raise HTTPException(422, str(exc)) from None


def api_of(request: Request) -> Api:
    return request.app.state.api  # type: ignore[no-any-return]


# Declares the scheme in /openapi.json; the check (and the 401) stays in `authenticate`.
BEARER = HTTPBearer(auto_error=False, scheme_name="apiKey",
                    description="an API key: `Authorization: Bearer <key>`")


def identify(api: Api, authorization: str | None, client: str | None, method: str,
             path: str) -> Principal:
    """Bearer key -> tenant (401 without one); no I/O."""
    scheme, _, key = (authorization or "").partition(" ")
    has_key = scheme.lower() == "bearer" and bool(key.strip())
    who = api.keyring.authenticate(key.strip()) if has_key else None
    if who is None:
        audit("auth_refused", None, client=client, method=method, path=path,
              reason="unknown_key" if has_key else "no_key")
        raise HTTPException(401, "missing or unknown API key: send 'Authorization: Bearer "
                            "<key>'", headers={"WWW-Authenticate": "Bearer"})
    return dataclasses.replace(who, client=client)


def rate_of(api: Api, who: Principal) -> int:
    """The tenant's requests per second (0: unlimited)."""
    return api.settings.api_rate_per_s if who.rate_per_s is None else who.rate_per_s


def check_rate(who: Principal, rate: int, hits: int) -> None:
    if hits > rate:
        raise HTTPException(429, f"tenant {who.tenant!r} is over its rate limit of {rate} "
                            "requests/s", headers={"Retry-After": "1"})


def admit(api: Api, authorization: str | None, client: str | None, method: str,
          path: str) -> Principal:
    """``identify``, then the tenant's rate limit (429); blocking (see ``app.Gate``)."""
    who = identify(api, authorization, client, method, path)
    rate = rate_of(api, who)
    if rate:
        check_rate(who, rate, api.store.hit(who.tenant, time.time()))
    return who


def authenticate(request: Request, credentials: Annotated[
        HTTPAuthorizationCredentials | None, Security(BEARER)] = None) -> Principal:
    """The principal the gate (``app.Gate``) admitted before the body was read; a request
    that did not pass it (an app built without the gate) is admitted here."""
    who = getattr(request.state, "principal", None)
    if who is None:
        who = admit(api_of(request), request.headers.get("authorization"),
                    request.client.host if request.client else None, request.method,
                    request.url.path)
        request.state.principal = who
    return who  # type: ignore[no-any-return]


Who = Annotated[Principal, Depends(authenticate)]


def audit(event: str, who: Principal | None, **fields: Any) -> None:
    """One INFO line on ``inferq.audit``: what was done (``event``), to what (``job_id``,
    ``batch_id``, ``model``, ``rows``), by whom (tenant, key id, never the key; address).
    The text line reads ``submit job=… tenant=… key=… model=… rows=… client=…``; the
    same fields go to JSON logs as they are."""
    ids: dict[str, Any] = {k: fields.pop(k) for k in ("job_id", "batch_id") if k in fields}
    if who is not None:
        ids.update(tenant=who.tenant, key_id=who.key_id)
        fields.setdefault("client", who.client)
    line = {**ids, **fields}
    AUDIT.info(event + "".join(f" {_AUDIT_NAMES.get(k, k)}=%s" for k in line),
               *line.values(), extra={"event": event, **line})


def not_found(kind: str, ident: str) -> HTTPException:
    """The same answer for another tenant's id as for a missing one."""
    return HTTPException(404, f"no {kind} {ident!r} (never submitted, expired, or not yours)")


def ready_checks(api: Api) -> dict[str, str]:
    return {"result_store": _check(api.store.ping), "broker": _check(api.client.check_broker)}


def _check(probe: Any) -> str:
    try:
        probe()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return f"unavailable ({type(exc).__name__})"
