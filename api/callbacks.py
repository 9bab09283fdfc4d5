"""Callback delivery: when a job or batch with a ``callback_url`` ends, POST its final
view, signed (``shared.signing``), retried with exponential backoff and jitter.

Pending callbacks are a Redis sorted set scored by when to look next, so they survive an
API restart, and a Lua lease lets several API replicas share the work without double
delivery in the normal case (a replica dying mid-delivery means one more attempt later).
Every attempt is recorded on the job or batch record, where ``GET`` shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import httpx
from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool

from api.auth import Principal
from api.batches import batch_view
from api.context import Api
from api.jobs import job_view
from api.urls import UrlRefused, resolve_public
from shared import signing
from shared.backoff import BELOW, exponential
from shared.schemas import FINAL_STATUSES

logger = logging.getLogger(__name__)

POLL_S = 0.2  # how soon an unfinished job is looked at again (a tenth of its age,
MAX_POLL_S = 5.0  # between these two)
LEASE_S = 60.0  # an attempt in progress is not taken by another replica for this long
TIMEOUT_S = 10.0
MAX_BACKOFF_S = 300.0


def backoff(attempt: int, base: float = 1.0) -> float:
    """Seconds before attempt ``attempt + 1``: base * 2^(attempt-1), capped, with jitter."""
    return exponential(attempt - 1, base, MAX_BACKOFF_S, BELOW)


class Dispatcher:
    def __init__(self, api: Api, base_backoff: float = 1.0):
        self.api = api
        self.base_backoff = base_backoff
        self.http = httpx.AsyncClient(timeout=TIMEOUT_S, follow_redirects=False)
        self._stop = asyncio.Event()

    async def run(self) -> None:
        idle = POLL_S / 2
        failures = 0
        while not self._stop.is_set():
            try:
                busy = await self.tick()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - the store may be down; keep trying
                failures += 1
                if failures == 1 or failures % 20 == 0:  # not a line every 0.1 s
                    logger.warning("callback dispatcher: %s: %s (failure %d)",
                                   type(exc).__name__, exc, failures)
                busy = 0
            if not busy:
                pause = idle if not failures else exponential(min(failures, 6), idle, 5.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), pause)

    async def stop(self) -> None:
        self._stop.set()
        await self.http.aclose()

    async def tick(self) -> int:
        members = await run_in_threadpool(self.api.store.due_callbacks, time.time(), LEASE_S)
        await asyncio.gather(*(self._one(m) for m in members))
        return len(members)

    def _read(self, member: str) -> tuple[dict[str, str], dict[str, Any] | None]:
        """-> (the record, the final view as JSON, or None while unfinished)."""
        kind, _, ident = member.partition(":")
        store = self.api.store
        record = store.job_record(ident) if kind == "job" else store.batch_record(ident)
        if not record:
            return record, None
        who = Principal(record["tenant"], record.get("key_id", ""))
        try:
            if kind == "job":
                view: Any = job_view(self.api, ident, who)
                final = view.status in FINAL_STATUSES  # expired jobs too
            else:
                view = batch_view(self.api, ident, who)
                final = view.status in ("completed", "cancelled")
        except HTTPException:  # expired meanwhile
            return {}, None
        if not final:
            return record, None
        return record, {"event": f"{kind}.finished", kind: view.model_dump(mode="json")}

    async def _one(self, member: str) -> None:
        store = self.api.store
        record, payload = await run_in_threadpool(self._read, member)
        if not record:
            await run_in_threadpool(store.drop_callback, member)
            return
        if payload is None:  # not finished: look again, less often the older it is
            now = time.time()
            since = float(record.get("submitted_at") or record.get("created_at") or now)
            await run_in_threadpool(store.reschedule_callback, member,
                                    now + min(MAX_POLL_S, max(POLL_S, (now - since) / 10)))
            return
        deliveries = json.loads(record.get("deliveries", "[]"))
        attempt = len(deliveries) + 1
        body = json.dumps(payload, separators=(",", ":")).encode()
        secret = self.api.keyring.secret_for(record.get("key_id", "")) \
            or self.api.settings.callback_secret
        headers = {"content-type": "application/json",
                   signing.HEADER: signing.sign(secret, body),
                   "X-Inferq-Event": payload["event"],
                   "X-Inferq-Delivery": f"{member}:{attempt}"}
        code: int | None = None
        error: str | None = None
        try:
            url, extensions = record["callback_url"], {}
            if not self.api.settings.callback_allow_private:  # the name may point inward
                target = await run_in_threadpool(resolve_public, url)  # now: check again,
                url, extensions = target.url, target.extensions  # and connect where checked
                headers.update(target.headers)
            response = await self.http.post(url, content=body, headers=headers,
                                            extensions=extensions)
            code = response.status_code
            if not 200 <= code < 300:
                error = f"HTTP {code}"
        except (httpx.HTTPError, UrlRefused) as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
        deliveries.append({"at": time.time(), "attempt": attempt, "status_code": code,
                           "error": error})
        await run_in_threadpool(self._record, member, deliveries, error, attempt)

    def _record(self, member: str, deliveries: list[dict[str, Any]], error: str | None,
                attempt: int) -> None:
        kind, _, ident = member.partition(":")
        store = self.api.store
        update = store.update_job if kind == "job" else store.update_batch
        outcome = "delivered" if error is None else \
            "failed" if attempt >= self.api.settings.callback_max_attempts else "retry"
        update(ident, deliveries=deliveries,
               callback_state="pending" if outcome == "retry" else outcome)
        self.api.metrics.callbacks.labels(outcome).inc()
        if outcome == "retry":
            store.reschedule_callback(member, time.time() + backoff(attempt,
                                                                    self.base_backoff))
        else:
            store.drop_callback(member)
            log = logger.info if outcome == "delivered" else logger.warning
            log("callback %s %s after %d attempt(s)%s", member, outcome, attempt,
                f": {error}" if error else "")
