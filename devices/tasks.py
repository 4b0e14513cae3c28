"""Celery tasks of the devices app: take ids, use JSON, return quietly (STYLE.md §6)."""

from __future__ import annotations

from celery import shared_task

from devices import services


@shared_task(ignore_result=True)
def flush_last_seen() -> int:
    """Run by beat every DEVICE_LAST_SEEN_FLUSH_INTERVAL: write the sightings buffered in Redis
    to the devices' last_seen (ota_site.presence). Returns how many devices it wrote."""
    return services.flush_last_seen()
