"""Optional OpenTelemetry traces for HTTP requests and Celery tasks (``OTEL_ENABLED``, off by
default; needs the ``otel`` extra: ``pip install -e ".[otel]"``).

When on, every process that loads Django (gunicorn workers, daphne, the Celery worker) gets a
tracer provider that batches spans to the OTLP/HTTP exporter. The exporter reads the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` (``http://collector:4318``; spans go to ``/v1/traces``),
``OTEL_EXPORTER_OTLP_HEADERS`` and the other ``OTEL_*`` variables itself. Django requests and
Celery tasks (and their publication, so a task's trace continues the request that queued it) are
instrumented by the opentelemetry-instrumentation packages. Each request span carries the request
id (``ota.request_id``), the same as the ``X-Request-ID`` header and the JSON log lines.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from django.conf import settings

logger = logging.getLogger(__name__)
_configured = False


def setup() -> bool:
    """Configure tracing in this process once, if OTEL_ENABLED; True when tracing is on.

    Called from ``OtaSiteConfig.ready()``, which runs before Django builds its middleware chain
    (the Django instrumentation adds its own middleware in front of ours)."""
    global _configured
    if not settings.OTEL_ENABLED:
        return False
    if _configured:
        return True
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.django import DjangoInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", "ota-server")})
    provider = TracerProvider(resource=resource)
    # Batched in a background thread; the SDK restarts that thread in forked children (the
    # Celery prefork pool) and flushes at exit.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    DjangoInstrumentor().instrument(tracer_provider=provider, response_hook=_response_hook)
    CeleryInstrumentor().instrument(tracer_provider=provider)
    _configured = True
    logger.info("OpenTelemetry tracing on, exporting over OTLP/HTTP")
    return True


def _response_hook(span: Any, request: Any, response: Any) -> None:
    request_id = response.get("X-Request-ID") if response is not None else None
    if request_id and span.is_recording():
        span.set_attribute("ota.request_id", request_id)
