"""Celery tasks of the firmware app: take ids, use JSON, return quietly (STYLE.md §6)."""

from __future__ import annotations

import logging

from celery import shared_task

from firmware import services, tuf_repo

logger = logging.getLogger(__name__)


@shared_task(ignore_result=True)
def refresh_tuf_metadata() -> list[str]:
    """Run by beat every TUF_REFRESH_INTERVAL: re-sign TUF metadata past half its lifetime.

    Idempotent and safe with two workers: the writes happen under the row lock of the newest
    root, so the second worker finds nothing left to do. An uninitialised repository is skipped.
    """
    result = tuf_repo.update_repository()
    return result.written


@shared_task(ignore_result=True)
def verify_firmware_storage() -> int:
    """Run by beat daily (FIRMWARE_VERIFY_INTERVAL): re-read every published firmware and
    quarantine those whose stored bytes are missing or changed. Returns how many failed.

    Safe with two workers: quarantining is a compare-and-set, so the event is written once.
    """
    results = services.verify_all_storage(actor="task:verify_firmware_storage")
    failed = [r for r in results if not r["ok"]]
    for result in failed:
        logger.error(
            "firmware %s %s failed storage verification: %s",
            result["device_type"],
            result["version"],
            result["detail"],
        )
    return len(failed)
