"""OpenTelemetry tracing (shared/tracing.py) across real processes: a job's submit span
(SDK in this process, or ``inferq api``) -> its ``inferq.job`` span in a real worker ->
the ``inferq.model_call`` span that ran it, linked to the job. The worker and the API
export over OTLP/HTTP to a receiver started here, which decodes the protocol's protobuf;
this process's spans go to an in-memory exporter."""

from __future__ import annotations

import gzip
import http.server
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry import trace  # noqa: E402
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

from shared import tracing  # noqa: E402
from tests.conftest import client_for  # noqa: E402

pytestmark = pytest.mark.integration


class Receiver(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver on loopback: POST /v1/traces, protobuf bodies."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[Any] = []  # opentelemetry.proto Span messages
        self.lock = threading.Condition()  # notified on every export

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def named(self, name: str) -> list[Any]:
        with self.lock:
            return [s for s in self.spans if s.name == name]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        with self.server.lock:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    self.server.spans.extend(scope_spans.spans)
            self.server.lock.notify_all()
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def local_spans() -> Iterator[tuple[InMemorySpanExporter, Any]]:
    """This process's spans, in memory (the global provider is left alone)."""
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    yield exporter, provider
    tracing.use(None)
    provider.shutdown()


def _traced(env: dict[str, str], receiver: Receiver) -> dict[str, str]:
    return {**env, "INFERQ_TRACING": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
            "OTEL_BSP_SCHEDULE_DELAY": "100"}


def _wait_for(receiver: Receiver, name: str, job_ids: set[str], timeout: float = 20
              ) -> dict[str, Any]:
    """The ``name`` spans of ``job_ids``, by job id, once all were exported (woken by each
    export)."""
    def found() -> dict[str, Any]:
        return {_attr(s, "inferq.job_id"): s for s in receiver.named(name)}

    with receiver.lock:
        if not receiver.lock.wait_for(lambda: job_ids <= found().keys(), timeout):
            raise TimeoutError(f"{name} spans of {sorted(job_ids - found().keys())} not "
                               f"exported in {timeout} s")
        return found()


def _attr(span: Any, key: str) -> Any:
    for kv in span.attributes:
        if kv.key == key:
            return getattr(kv.value, kv.value.WhichOneof("value"))
    return None


def _check_chain(receiver: Receiver, submits: dict[str, Any]) -> None:
    """Every submit span (job id -> span) has one job span as its child in the worker,
    and exactly one model call links to that job span."""
    jobs = _wait_for(receiver, tracing.JOB, set(submits))
    calls = receiver.named(tracing.MODEL_CALL)
    for job_id, submit in submits.items():
        job = jobs[job_id]
        assert job.trace_id == submit.trace_id
        assert job.parent_span_id == submit.span_id
        assert job.kind == job.SPAN_KIND_CONSUMER
        assert _attr(job, "inferq.outcome") == "ok"
        linking = [c for c in calls if any(
            link.trace_id == job.trace_id and link.span_id == job.span_id
            for link in c.links)]
        assert len(linking) == 1, f"job {job_id}: {len(linking)} model calls link to it"
        assert _attr(linking[0], "inferq.model_version").startswith("digits@")
        assert _attr(linking[0], "inferq.batch_rows") >= 1


def _local_id(span_id: int) -> bytes:
    return span_id.to_bytes(8, "big")


@pytest.mark.parametrize("coalesce", ["true", "false"])
def test_a_job_is_traced_from_submit_to_the_model_call_that_ran_it(
        redis_env, start_worker, digits, receiver, local_spans, coalesce) -> None:
    """Coalesced submits go as inferq.infer_many (one carrier per job in the message);
    with coalescing off, one inferq.infer message each (W3C traceparent header)."""
    env = {**_traced(redis_env, receiver), "INFERQ_COALESCE": coalesce}
    start_worker(env)
    client = client_for(env)
    exporter, provider = local_spans
    outer = provider.get_tracer("web-app")  # the application's own spans
    with outer.start_as_current_span("handle-request") as request_span:
        job = client.submit("digits", digits["x"][0])
        assert job.result(timeout=30)["label"].tolist() == [digits["label"][0]]

    def one(i: int) -> str:
        with outer.start_as_current_span(f"request-{i}"):
            job = client.submit("digits", digits["x"][i])
            assert job.result(timeout=30)["label"].tolist() == [digits["label"][i]]
            return job.id

    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(one, range(1, 17)))

    finished = exporter.get_finished_spans()
    submits = {s.attributes["inferq.job_id"]: s for s in finished if s.name == tracing.SUBMIT}
    assert set(submits) == {job.id, *concurrent}
    first = submits[job.id]
    assert first.parent is not None
    assert first.parent.span_id == request_span.get_span_context().span_id
    assert first.kind == trace.SpanKind.PRODUCER

    class Exported:  # the local spans in the receiver's terms (bytes ids)
        def __init__(self, span: Any):
            self.trace_id = span.context.trace_id.to_bytes(16, "big")
            self.span_id = _local_id(span.context.span_id)

    _check_chain(receiver, {k: Exported(v) for k, v in submits.items()})


def test_the_api_continues_the_callers_trace(redis_env, start_worker, start_api,
                                              digits, receiver) -> None:
    env = {**_traced(redis_env, receiver), "INFERQ_API_KEYS": "acme:trace-key"}
    start_worker(env)
    api = start_api(env)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    oip = {"parameters": {"async": True},  # the OIP route, not the fast lane
           "inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8],
                       "data": digits["x"][0].ravel().tolist()}]}
    for path, body, status, parent_id in [
            ("/v1/models/digits/jobs?wait=20",
             {"inputs": {"image": digits["x"][:2].tolist()}}, 200, "00f067aa0ba902b7"),
            ("/v2/models/digits/infer", oip, 202, "1111111111111111")]:
        answer = httpx.post(api.url + path, json=body, timeout=30, headers={
            "Authorization": "Bearer trace-key",
            "traceparent": f"00-{trace_id}-{parent_id}-01"})
        assert answer.status_code == status, answer.text
        job_id = answer.json()["id"]
        submit = _wait_for(receiver, tracing.SUBMIT, {job_id})[job_id]
        assert submit.trace_id.hex() == trace_id
        assert submit.parent_span_id.hex() == parent_id
        _check_chain(receiver, {job_id: submit})


def test_garbage_trace_headers_do_not_stop_a_traced_worker(redis_env, start_worker,
                                                            digits, receiver) -> None:
    """Trace headers come from whoever can publish: malformed ones are ignored, the job
    runs (as a new trace)."""
    env = _traced(redis_env, receiver)
    start_worker(env)
    client = client_for(env)
    from shared.celery_app import INFER_MANY_TASK, INFER_TASK
    from shared.queues import model_queue

    queue = model_queue(client.settings, "digits", "normal")
    x = digits["x"][0].tolist()
    client.app.send_task(INFER_TASK, task_id="garbage-trace-1", queue=queue,
                         kwargs={"model": "digits", "inputs": {"image": [x]}},
                         headers={"traceparent": "zz-not-a-trace", "tracestate": 7})
    client.app.send_task(INFER_MANY_TASK, task_id="garbage-trace-many", queue=queue,
                         kwargs={"model": "digits", "jobs": [
                             {"id": "garbage-trace-2", "inputs": {"image": [x]}},
                             {"id": "garbage-trace-3", "inputs": {"image": [x]}}]},
                         headers={tracing.MANY_HEADER: [{"traceparent": 5}, "x"]})
    client.app.send_task(INFER_MANY_TASK, task_id="garbage-trace-many-2", queue=queue,
                         kwargs={"model": "digits", "jobs": [
                             {"id": "garbage-trace-4", "inputs": {"image": [x]}}]},
                         headers={tracing.MANY_HEADER: "not a list"})
    ids = {f"garbage-trace-{i}" for i in range(1, 5)}
    for job_id in ids:
        assert client.wait(job_id, timeout=30).outputs["label"].tolist() == [
            digits["label"][0]]
    jobs = _wait_for(receiver, tracing.JOB, ids)
    assert all(jobs[i].parent_span_id == b"" for i in ids)  # new traces
