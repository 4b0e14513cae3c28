"""Console pages of the devices app (server-rendered; the API is under /api/v1/).

The device page, /devices/<id>/, is not here: it shows update sessions (rollouts, above devices),
so metrics.urls serves it; Django reaches it when no pattern below matches.
"""

from django.urls import URLPattern, path

from devices import views

app_name = "devices"

urlpatterns: list[URLPattern] = [
    path("", views.DeviceListView.as_view(), name="list"),
    path("<uuid:device_id>/retry/", views.RetryView.as_view(), name="retry"),
    path("<uuid:device_id>/edit/", views.EditView.as_view(), name="edit"),
    path("<uuid:device_id>/revoke/", views.RevokeView.as_view(), name="revoke"),
    path("<uuid:device_id>/delete/", views.DeleteView.as_view(), name="delete"),
    # hawkBit DDI devices and their target tokens
    path("ddi/", views.AddDdiDeviceView.as_view(), name="ddi-add"),
    path("<uuid:device_id>/ddi/token/", views.TargetTokenView.as_view(), name="ddi-token"),
    path(
        "<uuid:device_id>/ddi/token/revoke/",
        views.RevokeTargetTokenView.as_view(),
        name="ddi-token-revoke",
    ),
    path(
        "<uuid:device_id>/ddi/attributes/",
        views.RequestAttributesView.as_view(),
        name="ddi-attributes",
    ),
]
