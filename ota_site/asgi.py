"""ASGI entry point: daphne serves the WebSocket routes (/api/v1/stream/...).

HTTP is answered here too, so a single daphne process can serve everything in development, but in
production nginx sends HTTP to gunicorn (see docs/deployment.md).
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ota_site.settings")

django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from ota_site.checks import fail_fast_on_config_errors  # noqa: E402

fail_fast_on_config_errors()

# The WebSocket consumers arrive with the live console (issue 6); until then no route matches.
websocket_urlpatterns: list = []

application = ProtocolTypeRouter(
    {"http": django_asgi_app, "websocket": URLRouter(websocket_urlpatterns)}
)
