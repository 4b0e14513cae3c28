"""WebSocket routes (served by daphne; nginx sends /api/v1/stream/ there). Any other path gets
a 4404 close rather than the router's exception."""

from __future__ import annotations

from django.urls import path, re_path

from metrics import consumers

websocket_urlpatterns = [
    path("api/v1/stream/fleet", consumers.FleetStream.as_asgi()),
    path("api/v1/stream/devices/<uuid:device_id>", consumers.DeviceStream.as_asgi()),
    path("api/v1/stream/rollouts/<uuid:rollout_id>", consumers.RolloutStream.as_asgi()),
    re_path(r"", consumers.UnknownStream.as_asgi()),
]
