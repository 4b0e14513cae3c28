"""Console pages of the metrics app (server-rendered; the API is under /api/v1/).

Mounted at the site root, after devices.urls: /devices/<id>/ falls through to here (see
devices/urls.py for why the device page lives in metrics).
"""

from django.urls import URLPattern, path

from metrics import views

app_name = "metrics"

urlpatterns: list[URLPattern] = [
    path("", views.DashboardView.as_view(), name="dashboard"),
    path("devices/<uuid:device_id>/", views.DeviceDetailView.as_view(), name="device"),
]
