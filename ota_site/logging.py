"""Log lines as JSON objects, with the request id (or the Celery task) they belong to.

``LOG_FORMAT=json`` (settings.LOGGING) puts ``JsonFormatter`` and ``ContextFilter`` on the root
handler: each line is one object with ``time`` (ISO 8601, UTC), ``level``, ``logger``,
``message``, ``request_id`` inside a request (the id of ``ota_site.context``, also sent back as
``X-Request-ID``), ``task_id`` and ``task_name`` inside a Celery task, any ``extra`` fields the
call passed, and ``exception`` with the traceback. python-json-logger does the encoding.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from celery._state import get_current_task  # what Celery's own TaskFormatter reads
from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

from ota_site.context import current


class JsonFormatter(_JsonFormatter):
    """One JSON object per line: time, level, logger, message, then the context and extras."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={
                "asctime": "time",
                "levelname": "level",
                "name": "logger",
                "exc_info": "exception",
            },
            **kwargs,
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class ContextFilter(logging.Filter):
    """Adds ``request_id`` inside a request, ``task_id`` and ``task_name`` inside a Celery task.

    On the handler rather than a logger, so it sees the records of every logger that propagates
    to the root."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = current()
        if context is not None:
            record.request_id = context.request_id
            return True
        task = get_current_task()
        if task is not None and getattr(task.request, "id", None):
            record.task_id = task.request.id
            record.task_name = task.name
        return True
