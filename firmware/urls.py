"""Console pages of the firmware app (server-rendered; the API is under /api/v1/)."""

from django.urls import URLPattern

app_name = "firmware"

urlpatterns: list[URLPattern] = []
