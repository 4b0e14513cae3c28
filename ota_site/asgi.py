"""ASGI entry point: daphne serves the WebSocket routes (/api/v1/stream/..., metrics.routing).

HTTP is answered here too, so a single daphne process can serve everything in development, but in
production nginx sends HTTP to gunicorn and only /api/v1/stream/ to daphne (see
docs/deployment.md, docs/console.md "Live streams").
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ota_site.settings")

django_asgi_app = get_asgi_application()

# Imported once Django is set up: the routes load models.
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from metrics.routing import websocket_urlpatterns  # noqa: E402
from ota_site.checks import fail_fast_on_config_errors  # noqa: E402
from ota_site.ws_auth import stream_stack  # noqa: E402

fail_fast_on_config_errors()

application = ProtocolTypeRouter(
    {"http": django_asgi_app, "websocket": stream_stack(URLRouter(websocket_urlpatterns))}
)
