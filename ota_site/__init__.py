"""Project package: settings, URL routing, ASGI/WSGI entry points and cross-cutting helpers."""

from .celery import app as celery_app

__all__ = ["celery_app"]
