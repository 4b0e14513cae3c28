"""Celery tasks of the core: the worker heartbeat that /health/ready and the alerts read."""

from __future__ import annotations

from celery import shared_task

from ota_site.observability import record_worker_heartbeat


@shared_task(ignore_result=True)
def worker_heartbeat() -> None:
    """Run by beat every WORKER_HEARTBEAT_INTERVAL seconds. It only lands when beat, the broker
    and a worker all work, which is what the rollout engine needs too."""
    record_worker_heartbeat()
