"""Console pages of the metrics app (server-rendered; the API is under /api/v1/)."""

from django.urls import URLPattern

app_name = "metrics"

urlpatterns: list[URLPattern] = []
