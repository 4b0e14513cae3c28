"""The Celery application. Tasks take ids and JSON only; the beat schedule is data (settings)."""

import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ota_site.settings")

app = Celery("ota_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.import_modules.connect
def _observe(**kwargs: object) -> None:
    # Once Django's settings can be read: task outcome counters, the worker's first heartbeat,
    # its metrics port and JSON logs (ota_site.observability).
    from ota_site.observability import connect_celery

    connect_celery(app)
