"""Console pages of the devices app (server-rendered; the API is under /api/v1/)."""

from django.urls import URLPattern

app_name = "devices"

urlpatterns: list[URLPattern] = []
