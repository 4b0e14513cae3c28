"""Celery tasks: take ids, use JSON, return quietly when the object is gone (STYLE.md §6)."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task, signals
from django.conf import settings

from rollouts import answer_cache, archive, evaluation

logger = logging.getLogger(__name__)


@shared_task(ignore_result=True)
def evaluate_active_rollouts() -> None:
    """Run by beat every ROLLOUT_EVALUATION_INTERVAL seconds: judge every running rollout.

    Each rollout is judged in its own transaction with its row locked (skipped if another worker
    holds it), so two workers at once never advance a rollout twice, and one broken rollout does
    not stop the others.
    """
    for rollout_id in evaluation.due_rollout_ids():
        evaluate_rollout(str(rollout_id))


def evaluate_rollout(rollout_id: Any) -> str:
    try:
        action = evaluation.evaluate_rollout(rollout_id)
    except Exception:
        logger.exception("evaluating rollout %s failed", rollout_id)
        return "error"
    if action:
        logger.info("rollout %s: %s", rollout_id, action)
    return action


@shared_task(ignore_result=True)
def archive_old_sessions() -> None:
    """Run by beat once a day: archive sessions that finished more than SESSION_ARCHIVE_DAYS
    days ago (rollouts.archive); 0 or less turns it off. Each batch commits on its own, so a run
    cut short (a worker restart) loses nothing and the next one continues; a second run at the
    same time takes other rows."""
    days = settings.SESSION_ARCHIVE_DAYS
    if days <= 0:
        return
    result = archive.archive_sessions(older_than_days=days, actor="celery:archive_old_sessions")
    if result.sessions:
        logger.info(
            "archived %d sessions finished before %s into %d files",
            result.sessions,
            result.before.isoformat(),
            len(result.files),
        )


# Celery beat runs once per installation: it runs the poll answer cache's listener too
# (rollouts.answer_cache), standalone (`celery beat`) or embedded in a worker (`celery worker -B`).
signals.beat_init.connect(answer_cache.start_in_background, weak=False)
signals.beat_embedded_init.connect(answer_cache.start_in_background, weak=False)
