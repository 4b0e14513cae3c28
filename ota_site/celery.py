"""The Celery application. Tasks take ids and JSON only; the beat schedule is data (settings)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ota_site.settings")

app = Celery("ota_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
