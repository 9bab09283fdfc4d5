"""The admission steps every job goes through before its rows reach the batcher, for
``inferq.infer`` (one job) and ``inferq.infer_many`` (several) alike: claimed (a job
cancelled first is skipped), a redelivered message counted (and dead-lettered when it came
back too often), and, for a redelivered message, its rows run one by one to find the one
that kills workers (workers/deliveries.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from celery import Celery

from shared.claims import Claims, Sent, redis_of
from workers import rejects
from workers.batcher import Outcome
from workers.deliveries import (
    STORE_DOWN,
    Deliveries,
    Delivery,
    dead_letter_message,
    give_back,
    run_suspect,
)
from workers.pool import ModelPool, Served


class Intake:
    """One per worker process: the claims, the redelivery records and the dead letters."""

    def __init__(self, app: Celery, pool: ModelPool):
        settings = pool.settings
        self.app, self.pool = app, pool
        self.claims = Claims(app.backend, settings.result_expires)
        redis = redis_of(app.backend)
        self.deliveries = None if redis is None else Deliveries(
            redis, expires=settings.result_expires, max_deliveries=settings.max_deliveries,
            queue_prefix=settings.queue_prefix)
        if self.deliveries is not None:
            rejects.install(app, self._dead_letter)

    def _dead_letter(self, entry: dict[str, Any]) -> None:
        assert self.deliveries is not None
        self.deliveries.dead_letter(entry)
        self.pool.metrics.dead_lettered(entry.get("model") or "unknown")

    def take(self, request: Any, job_ids: list[str]) -> tuple[list[bool], Delivery | None]:
        """Claim the message's jobs (False: cancelled first) and tell whether the message
        was delivered before; a result store that is down puts the message back."""
        try:
            taken = ([self.claims.take(job_ids[0])] if len(job_ids) == 1
                     else self.claims.take_many(job_ids))
            delivery = None if self.deliveries is None else self.deliveries.redelivery(request)
        except STORE_DOWN as exc:
            raise give_back(exc, request.id) from exc
        return taken, delivery

    def send_claims(self, request: Any, job_ids: list[str]) -> tuple[Sent, Delivery | None]:
        """``take`` whose claims are read later (``taken``): a first delivery's rows run
        while they travel."""
        sent = self.claims.send(job_ids)
        try:
            delivery = None if self.deliveries is None else self.deliveries.redelivery(request)
        except STORE_DOWN as exc:
            sent.discard()
            raise give_back(exc, request.id) from exc
        return sent, delivery

    def taken(self, sent: Sent, request: Any) -> list[bool]:
        """The claims of ``send_claims`` (False: cancelled first)."""
        try:
            return sent.taken()
        except STORE_DOWN as exc:
            raise give_back(exc, request.id) from exc

    def too_often(self, delivery: Delivery | None, task: str, model: str,
                  job_ids: list[str]) -> str | None:
        """A redelivered message is counted; -> the dead-letter reason when it came back
        more often than ``INFERQ_MAX_DELIVERIES`` allows, else None."""
        if delivery is None:
            return None
        assert self.deliveries is not None
        self.pool.metrics.redelivered(model)
        if not self.deliveries.too_many(delivery):
            return None
        return dead_letter_message(self.deliveries, self.pool, delivery, task, model, job_ids)

    def run_suspect(self, served: Served, data: dict[str, np.ndarray], delivery: Delivery,
                    describe: Callable[[int], dict[str, Any]]) -> Outcome:
        """A redelivered message's rows, one model call each (workers/deliveries.py)."""
        assert self.deliveries is not None
        return run_suspect(self.deliveries, self.pool, served, data, delivery, describe)

    def done(self, key: str) -> None:
        """A redelivered message ran to the end: its delivery count is forgotten."""
        if self.deliveries is not None:
            self.deliveries.done(key)
