"""WSGI entry point: gunicorn serves the HTTP API, console and admin with sync workers."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ota_site.settings")

application = get_wsgi_application()

from ota_site.checks import fail_fast_on_config_errors  # noqa: E402

fail_fast_on_config_errors()
