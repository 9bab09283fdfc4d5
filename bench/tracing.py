"""``python -m bench tracing``: CPU per job of the tracing hooks (``shared/tracing.py``),
off and on, in one process: the producer's submit span and headers, the worker's job
span, and the model call span, as one job takes them.

Off is what every deployment pays by default; on, spans go through the SDK's batch
processor to an exporter that encodes them as OTLP/protobuf (what the OTLP exporter
sends) and drops the bytes, so the figure includes the export CPU but no network.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from shared import tracing


def _one_job() -> None:
    with tracing.submitting("digits", "job"):
        headers = tracing.outgoing()
    spans = tracing.start_jobs(SimpleNamespace(**(headers or {})), ["job"], "digits")
    with tracing.model_call("digits@1", 1, [c for _, c in tracing.links(spans)]):
        pass
    tracing.end(spans)


def _per_job_us(jobs: int) -> float:
    started = time.process_time()
    for _ in range(jobs):
        _one_job()
    return (time.process_time() - started) / jobs * 1e6


def _provider(ratio: float | None) -> Any:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    class Encoding(SpanExporter):  # the OTLP exporter's CPU, without the network
        def export(self, spans: Any) -> SpanExportResult:
            encode_spans(spans).SerializeToString()
            return SpanExportResult.SUCCESS

    sampler = None if ratio is None else ParentBasedTraceIdRatio(ratio)
    provider = TracerProvider(sampler=sampler) if sampler else TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Encoding()))
    return provider


def tracing_cost(jobs: int = 20_000) -> int:
    rows = [("off (default)", _per_job_us(jobs * 5))]
    for name, ratio in (("on, every job sampled", None), ("on, 1% sampled", 0.01)):
        provider = _provider(ratio)
        tracing.use(provider)
        try:
            started = time.process_time()
            for done in range(1, jobs + 1):
                _one_job()
                if done % 500 == 0:  # below the processor's queue (2,048 spans): none dropped
                    provider.force_flush()
            provider.force_flush()  # the export thread's encoding, counted too
            rows.append((name, (time.process_time() - started) / jobs * 1e6))
        finally:
            tracing.use(None)
            provider.shutdown()
    print("tracing hooks, CPU per job (submit + job + model call spans, this process):")
    for name, us in rows:
        print(f"  {name:24} {us:8.2f} us")
    return 0
