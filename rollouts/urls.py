"""Console pages of the rollouts app (server-rendered; the API is under /api/v1/)."""

from django.urls import URLPattern

app_name = "rollouts"

urlpatterns: list[URLPattern] = []
