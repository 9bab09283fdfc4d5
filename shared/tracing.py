"""OpenTelemetry tracing: one job followed from its submit to the model call that ran it.

Spans (docs/ops.md, "Tracing"):

- ``inferq.submit`` (PRODUCER), in the submitting process (SDK, ``inferq api``), around
  recording and sending one job; a child of the caller's current span, or of the HTTP
  request's ``traceparent``. Its context travels in the message headers, always in the
  W3C format whatever ``OTEL_PROPAGATORS`` says: ``traceparent``/``tracestate`` for a
  one-job message, ``inferq_trace`` (one ``traceparent`` per job) for a message carrying
  several (``producer/coalesce.py``).
- ``inferq.job`` (CONSUMER), in the worker, a child of that submit span: from the task
  taking the job to its result being ready; ``inferq.outcome`` says how it ended.
- ``inferq.model_call`` (INTERNAL), on the batcher thread: one per model call, linked to
  the ``inferq.job`` span of every job whose rows it ran (a batch serves many traces, as
  OpenTelemetry's messaging conventions link a batch to its messages), and a child of the
  first of them, so a sampler keeps it with that job.

Off unless a tracer provider is set, by :func:`setup` (``INFERQ_TRACING=otlp|console``)
or by the application itself; off, each hook is one call that returns ``None`` (~1 us
per job for all of them: ``python -m bench tracing``). The ``opentelemetry`` packages
are an optional extra (``inferq[tracing]``); a tracing setup that cannot load leaves
tracing off, never the worker or client down.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

try:
    from opentelemetry import trace
    from opentelemetry.trace import Link, NoOpTracerProvider, ProxyTracerProvider, SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _W3C = TraceContextTextMapPropagator()  # not the global propagator: one wire format
except Exception as exc:  # noqa: BLE001 - not installed, or broken: every hook is off
    trace = None  # type: ignore[assignment]
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

from shared.errors import ConfigError

logger = logging.getLogger(__name__)

SUBMIT, JOB, MODEL_CALL = "inferq.submit", "inferq.job", "inferq.model_call"
MANY_HEADER = "inferq_trace"  # a message of several jobs: one carrier per job, in order
_FIELDS = ("traceparent", "tracestate")
MAX_LINKS = 1024  # links per model call when inferq sets the provider up (setup())

_cached: tuple[Any, Any] | None = None  # (provider, its tracer)
_own: Any = None  # a provider for inferq's spans only (use()), before the global one
# While no provider is set, the global one is looked up again at most once a second
# (the lookup reads os.environ: ~1 us, against ~0.1 us for this clock).
RECHECK_S = 1.0
_off_until = 0.0
_NULL: AbstractContextManager[None] = nullcontext()


def use(provider: Any) -> None:
    """Trace inferq with ``provider`` instead of the global one (None: the global one
    again): for an application that keeps inferq's spans apart, and for tests."""
    global _own, _off_until
    _own, _off_until = provider, 0.0


def tracer() -> Any:
    """inferq's tracer, or None when tracing is off (no provider set, or no package)."""
    global _cached, _off_until
    if trace is None:
        return None
    provider = _own
    if provider is None:
        now = time.monotonic()
        if now < _off_until:
            return None
        provider = trace.get_tracer_provider()
        if isinstance(provider, ProxyTracerProvider | NoOpTracerProvider):
            _off_until = now + RECHECK_S
            return None
    if _cached is None or _cached[0] is not provider:
        _cached = (provider, provider.get_tracer("inferq"))
    return _cached[1]


def setup(exporter: str, service: str) -> None:
    """Install a tracer provider exporting to ``exporter`` (``INFERQ_TRACING``): ``otlp``
    (OTLP over HTTP, configured by the standard ``OTEL_EXPORTER_OTLP_*`` variables),
    ``console``, or ``off``. One the application set itself is kept."""
    global _off_until
    _off_until = 0.0  # look at the global provider now, not after the recheck pause
    if exporter == "off" or tracer() is not None:
        return
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import SpanLimits, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise ConfigError(f"INFERQ_TRACING={exporter} needs the tracing packages: "
                          "pip install 'inferq[tracing]'") from None
    if trace is None:
        raise ConfigError(f"INFERQ_TRACING={exporter}: opentelemetry failed to load "
                          f"({_IMPORT_ERROR})")
    if exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter,
            )
        except ImportError:
            raise ConfigError("INFERQ_TRACING=otlp needs opentelemetry-exporter-otlp-proto-"
                              "http: pip install 'inferq[tracing]'") from None
        span_exporter: Any = OTLPSpanExporter()
    else:
        span_exporter = ConsoleSpanExporter()
    # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, where set, name the service instead.
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", "")
    # A model call links every job it ran: up to INFERQ_MAX_BATCH_ROWS of them, past the
    # SDK's default of 128 links (OTEL_SPAN_LINK_COUNT_LIMIT, where set, decides).
    limits = SpanLimits(max_links=None if "OTEL_SPAN_LINK_COUNT_LIMIT" in os.environ
                        else MAX_LINKS)
    provider = TracerProvider(resource=Resource.create({} if named else {
        "service.name": service}), span_limits=limits)
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    _off_until = 0.0
    logger.info("tracing on: %s exporter, service %s", exporter, service)


def incoming(headers: Mapping[Any, Any]) -> dict[str, str] | None:
    """The trace context of an HTTP request (its ``traceparent``; ``headers`` keyed by
    str, or by bytes as in an ASGI scope), or None when tracing is off or it has none."""
    if tracer() is None:
        return None

    def get(name: str) -> str | None:
        value = headers.get(name)
        if value is None and isinstance(headers, dict):  # an ASGI scope's, bytes keys
            value = headers.get(name.encode())
        return value.decode("latin-1") if isinstance(value, bytes) else value

    return _clean(get)


def submitting(model: str, job_id: str, parent: Mapping[str, str] | None = None
               ) -> AbstractContextManager[Any]:
    """The ``inferq.submit`` span of one job, current while it is recorded and sent; a
    child of ``parent`` (an HTTP request's carrier) or else of the current span."""
    t = tracer()
    if t is None:
        return _NULL
    context = _W3C.extract(parent) if parent else None
    return t.start_as_current_span(SUBMIT, context=context, kind=SpanKind.PRODUCER,
                                   attributes={"inferq.job_id": job_id,
                                               "inferq.model": model,
                                               "messaging.system": "celery",
                                               "messaging.operation.type": "send"})


def outgoing() -> dict[str, str] | None:
    """The current span's context as message headers (W3C ``traceparent`` and, when not
    empty, ``tracestate``; no baggage), or None (off, or no span)."""
    if tracer() is None:
        return None
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier or None


def many_headers(carriers: Sequence[dict[str, str] | None]) -> dict[str, Any] | None:
    """Headers of a message carrying several jobs: each job's ``traceparent`` only, in
    order (55 bytes a job; a ``tracestate`` of up to 512 would weigh on big messages)."""
    if not any(carriers):
        return None
    return {MANY_HEADER: [{"traceparent": c["traceparent"]} if c and "traceparent" in c
                          else None for c in carriers]}


def carriers_of(request: Any, jobs: int) -> list[dict[str, str] | None]:
    """Each job's carrier from a task's request: ``inferq_trace`` (several jobs) or the
    W3C headers (one job)."""
    many = getattr(request, MANY_HEADER, None)
    if isinstance(many, list) and len(many) == jobs:
        return [_clean(c.get) if isinstance(c, dict) else None for c in many]
    if jobs == 1:
        return [_clean(lambda k: getattr(request, k, None))]
    return [None] * jobs


def _clean(get: Any) -> dict[str, str] | None:
    """The W3C fields that are strings (a message's headers are not trusted)."""
    carrier = {k: v for k in _FIELDS if isinstance(v := get(k), str)}
    return carrier or None


def start_jobs(request: Any, jobs: Sequence[Any], model: str) -> list[Any] | None:
    """One ``inferq.job`` span per job of a task's message (``request``; ``jobs``: job
    ids, or the job dicts of ``inferq.infer_many``), each a child of its submit span when
    the message carried one; ended by :func:`end`. None when tracing is off."""
    t = tracer()
    if t is None:
        return None
    jobs = jobs if isinstance(jobs, list | tuple) else []  # a malformed message: no spans
    spans = []
    for carrier, job in zip(carriers_of(request, len(jobs)), jobs, strict=True):
        job_id = str(job.get("id") if isinstance(job, dict) else job)
        context = _W3C.extract(carrier) if carrier else None
        spans.append(t.start_span(JOB, context=context, kind=SpanKind.CONSUMER,
                                  attributes={"inferq.job_id": job_id, "inferq.model": model,
                                              "messaging.system": "celery",
                                              "messaging.operation.type": "process"}))
    return spans


def links(spans: Sequence[Any] | None, rows: Sequence[int] | None = None
          ) -> tuple[tuple[int, Any], ...]:
    """The batcher's ``links`` for job spans whose rows follow one another in one submit
    (``rows``: each job's row count; unset, one job): (its first row, its context)."""
    if not spans:
        return ()
    firsts, first = [], 0
    for n in rows or [0] * len(spans):
        firsts.append(first)
        first += n
    return tuple(zip(firsts, (s.get_span_context() for s in spans), strict=True))


OUTCOMES = ("ok", "rows_failed", "cancelled", "expired", "invalid", "dead_lettered",
            "requeued", "failed")


def end(spans: Sequence[Any] | None, outcome: str | Sequence[str] = "ok",
        error: BaseException | None = None) -> None:
    """End job spans with their ``outcome`` (one of OUTCOMES; one for all, or one per
    span); ``error``: they failed with it (status ERROR, the exception recorded)."""
    if not spans:
        return
    each = [outcome] * len(spans) if isinstance(outcome, str) else list(outcome)
    for span, how in zip(spans, each, strict=True):
        span.set_attribute("inferq.outcome", how if error is None or how != "ok" else "failed")
        if error is not None:
            span.record_exception(error)
            span.set_status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}")
        span.end()


def model_call(served: str, rows: int, linked: Sequence[Any]
               ) -> AbstractContextManager[Any]:
    """The ``inferq.model_call`` span of one batch of ``served`` (the model version's key,
    such as ``digits@3``): linked to every job span context in ``linked`` (repeats
    dropped), and a child of the first sampled one, so it is kept (and shown) with that
    job's trace. None sampled (or none linked: the jobs were not traced): no span."""
    t = tracer() if linked else None
    if t is None:
        return _NULL
    # A job split over parts of one call is linked once (contexts are not hashable).
    linked = list({(c.trace_id, c.span_id): c for c in linked}.values())
    parent = next((c for c in linked if c.trace_flags.sampled), None)
    if parent is None:
        return _NULL
    return t.start_as_current_span(
        MODEL_CALL, context=trace.set_span_in_context(trace.NonRecordingSpan(parent)),
        links=[Link(c) for c in linked],
        attributes={"inferq.model_version": served, "inferq.batch_rows": rows,
                    "inferq.jobs": len(linked)})
