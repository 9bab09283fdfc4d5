"""shared/tracing.py on its own: off by default (every hook None, no headers), spans and
carriers when a provider is set, and untrusted message headers read safely."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

from shared import tracing  # noqa: E402

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    yield exporter
    tracing.use(None)
    provider.shutdown()


def test_off_by_default_every_hook_is_none() -> None:
    assert tracing.tracer() is None
    assert tracing.outgoing() is None
    assert tracing.incoming({"traceparent": PARENT}) is None
    assert tracing.start_jobs(SimpleNamespace(traceparent=PARENT), ["j"], "digits") is None
    assert tracing.links(None) == ()
    with tracing.submitting("digits", "j"):
        assert tracing.outgoing() is None
    tracing.setup("off", "test")  # installs nothing
    assert tracing.tracer() is None


def test_submit_span_continues_an_http_callers_trace(spans: InMemorySpanExporter) -> None:
    carrier = tracing.incoming({b"traceparent": PARENT.encode(), b"accept": b"*/*"})
    assert carrier == {"traceparent": PARENT}
    with tracing.submitting("digits", "job-1", carrier):
        sent = tracing.outgoing()
    (span,) = spans.get_finished_spans()
    assert span.name == tracing.SUBMIT and span.attributes["inferq.job_id"] == "job-1"
    assert format(span.context.trace_id, "032x") == PARENT.split("-")[1]
    assert span.parent is not None and format(span.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert sent is not None
    assert sent["traceparent"].split("-")[2] == format(span.context.span_id, "016x")


def test_incoming_reads_starlette_and_asgi_headers(spans: InMemorySpanExporter) -> None:
    from starlette.datastructures import Headers

    real = Headers(raw=[(b"traceparent", PARENT.encode()), (b"tracestate", b"k=v")])
    assert tracing.incoming(real) == {"traceparent": PARENT, "tracestate": "k=v"}
    assert tracing.incoming(Headers(raw=[(b"accept", b"*/*")])) is None
    assert tracing.incoming({b"traceparent": PARENT.encode()}) == {"traceparent": PARENT}


def test_message_headers_are_w3c_only_and_lean(spans: InMemorySpanExporter,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever OTEL_PROPAGATORS the process has, the wire format is W3C; a message of
    several jobs carries each job's traceparent alone."""
    from opentelemetry import baggage, context

    token = context.attach(baggage.set_baggage("user", "secret"))
    try:
        with tracing.submitting("digits", "a", {"traceparent": PARENT,
                                                "tracestate": "vendor=" + "x" * 200}):
            sent = tracing.outgoing()
    finally:
        context.detach(token)
    assert sent is not None and set(sent) == {"traceparent", "tracestate"}  # no baggage
    many = tracing.many_headers([sent, None])
    assert many == {tracing.MANY_HEADER: [{"traceparent": sent["traceparent"]}, None]}


def test_job_spans_are_children_of_their_carriers_and_linked_by_the_model_call(
        spans: InMemorySpanExporter) -> None:
    with tracing.submitting("digits", "a"):
        a = tracing.outgoing()
    request = SimpleNamespace(**tracing.many_headers([a, None]))  # type: ignore[arg-type]
    jobs = tracing.start_jobs(request, [{"id": "a"}, {"id": "b"}], "digits")
    assert jobs is not None
    assert [first for first, _ in tracing.links(jobs, [3, 2])] == [0, 3]
    with tracing.model_call("digits@1", 5, [c for _, c in tracing.links(jobs, [3, 2])]):
        pass
    tracing.end(jobs[:1])
    tracing.end(jobs[1:], error=ValueError("bad row"))
    by_name: dict[str, list[Any]] = {}
    for span in spans.get_finished_spans():
        by_name.setdefault(span.name, []).append(span)
    (submit,) = by_name[tracing.SUBMIT]
    job_a, job_b = sorted(by_name[tracing.JOB], key=lambda s: s.attributes["inferq.job_id"])
    assert job_a.parent.span_id == submit.context.span_id
    assert job_b.parent is None and job_b.attributes["inferq.outcome"] == "failed"
    (call,) = by_name[tracing.MODEL_CALL]
    assert call.parent.span_id == job_a.context.span_id  # in the first job's trace
    assert {link.context.span_id for link in call.links} == {
        job_a.context.span_id, job_b.context.span_id}
    assert call.attributes["inferq.jobs"] == 2


def test_no_sampled_job_no_model_call_span(spans: InMemorySpanExporter) -> None:
    from opentelemetry.trace import SpanContext, TraceFlags

    unsampled = SpanContext(1, 2, is_remote=True, trace_flags=TraceFlags(0))
    for linked in ((), (unsampled,)):
        with tracing.model_call("digits@1", 4, linked):
            pass
    assert spans.get_finished_spans() == ()


@pytest.mark.parametrize("headers", [
    {"traceparent": 5, "tracestate": ["x"]},
    {tracing.MANY_HEADER: "not a list"},
    {tracing.MANY_HEADER: [1, {"traceparent": b"bytes"}]},
    {tracing.MANY_HEADER: [{"traceparent": "zz"}, None, None]},  # wrong length
    {},
])
def test_malformed_headers_give_jobs_without_a_parent(spans: InMemorySpanExporter,
                                                      headers: dict[str, Any]) -> None:
    request = SimpleNamespace(**headers)
    for jobs in (["one"], [{"id": "a"}, {"id": "b"}], "not a list", [7, None]):
        got = tracing.start_jobs(request, jobs, "digits")  # type: ignore[arg-type]
        assert got is not None
        tracing.end(got)
    assert all(s.parent is None for s in spans.get_finished_spans())
