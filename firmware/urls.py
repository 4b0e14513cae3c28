"""Console pages of the firmware app (server-rendered; the API is under /api/v1/)."""

from django.urls import URLPattern, path

from firmware import views

app_name = "firmware"

urlpatterns: list[URLPattern] = [
    path("", views.firmware_list, name="list"),
    path("upload/", views.upload, name="upload"),
    path("<uuid:firmware_id>/", views.firmware_detail, name="detail"),
    path("<uuid:firmware_id>/publish/", views.publish, name="publish"),
    path("<uuid:firmware_id>/delete/", views.delete, name="delete"),
]
