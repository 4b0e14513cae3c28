"""URL routing. The device API is versioned in the path (/api/v1/): devices stay in the field for
years, so v1 responses never change incompatibly."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from devices.api import views as devices
from firmware.api import tuf_views
from firmware.api import views as firmware
from metrics import health, prometheus
from ota_site import api as core
from rollouts.api import rollout_views
from rollouts.api import views as rollouts
from rollouts.ddi import schema as ddi_schema

router = SimpleRouter(trailing_slash=False)
router.register("groups", devices.DeviceGroupViewSet, basename="group")

api_v1 = [
    # Devices
    path("devices", devices.DeviceListView.as_view(), name="device-list"),
    path("devices/register", devices.RegisterView.as_view(), name="device-register"),
    path("devices/token", devices.TokenView.as_view(), name="device-token"),
    path("devices/enroll", devices.EnrollView.as_view(), name="device-enroll"),
    path("devices/<uuid:device_id>", devices.DeviceDetailView.as_view(), name="device-detail"),
    path(
        "devices/<uuid:device_id>/heartbeat",
        devices.HeartbeatView.as_view(),
        name="device-heartbeat",
    ),
    path("devices/<uuid:device_id>/retry", devices.RetryView.as_view(), name="device-retry"),
    path(
        "devices/<uuid:device_id>/certificate",
        devices.CertificateView.as_view(),
        name="device-certificate",
    ),
    path("devices/<uuid:device_id>/revoke", devices.RevokeView.as_view(), name="device-revoke"),
    # hawkBit DDI devices and their target tokens (the protocol itself is at /{tenant}/...)
    path("devices/ddi", devices.DdiDeviceCreateView.as_view(), name="device-ddi-create"),
    path(
        "devices/<uuid:device_id>/target-token",
        devices.TargetTokenView.as_view(),
        name="device-target-token",
    ),
    path(
        "devices/<uuid:device_id>/ddi-attributes",
        devices.DdiAttributesView.as_view(),
        name="device-ddi-attributes",
    ),
    # The update flow
    path(
        "devices/<uuid:device_id>/updates",
        rollouts.UpdateCheckView.as_view(),
        name="device-updates",
    ),
    path("devices/<uuid:device_id>/status", rollouts.StatusView.as_view(), name="device-status"),
    path("updates/check", rollouts.UpdateCheckView.as_view(), name="updates-check"),
    path("status", rollouts.StatusView.as_view(), name="status"),
    path("validation", rollouts.ValidationView.as_view(), name="validation"),
    path("sessions", rollouts.SessionListView.as_view(), name="session-list"),
    path("sessions/<uuid:session_id>", rollouts.SessionDetailView.as_view(), name="session-detail"),
    # Rollouts
    path("rollouts", rollout_views.RolloutListView.as_view(), name="rollout-list"),
    path(
        "rollouts/<uuid:rollout_id>",
        rollout_views.RolloutDetailView.as_view(),
        name="rollout-detail",
    ),
    path(
        "rollouts/<uuid:rollout_id>/start", rollout_views.StartView.as_view(), name="rollout-start"
    ),
    path(
        "rollouts/<uuid:rollout_id>/pause", rollout_views.PauseView.as_view(), name="rollout-pause"
    ),
    path(
        "rollouts/<uuid:rollout_id>/resume",
        rollout_views.ResumeView.as_view(),
        name="rollout-resume",
    ),
    path(
        "rollouts/<uuid:rollout_id>/cancel",
        rollout_views.CancelView.as_view(),
        name="rollout-cancel",
    ),
    path(
        "rollouts/<uuid:rollout_id>/advance",
        rollout_views.AdvanceView.as_view(),
        name="rollout-advance",
    ),
    path(
        "rollouts/<uuid:rollout_id>/metrics",
        rollout_views.RolloutMetricsView.as_view(),
        name="rollout-metrics",
    ),
    # Firmware
    path("firmware", firmware.FirmwareListView.as_view(), name="firmware-list"),
    path("firmware/keys", firmware.SigningKeyListView.as_view(), name="firmware-keys"),
    path(
        "firmware/keys/rotate", firmware.SigningKeyRotateView.as_view(), name="firmware-key-rotate"
    ),
    path(
        "firmware/keys/<str:key_id>/retire",
        firmware.SigningKeyRetireView.as_view(),
        name="firmware-key-retire",
    ),
    path(
        "firmware/<uuid:firmware_id>", firmware.FirmwareDetailView.as_view(), name="firmware-detail"
    ),
    path(
        "firmware/<uuid:firmware_id>/publish",
        firmware.PublishView.as_view(),
        name="firmware-publish",
    ),
    path(
        "firmware/<uuid:firmware_id>/download",
        firmware.DownloadView.as_view(),
        name="firmware-download",
    ),
    # API keys and the audit log (admin)
    path("api-keys", core.ApiKeyListView.as_view(), name="apikey-list"),
    path("api-keys/<str:prefix>", core.ApiKeyDetailView.as_view(), name="apikey-detail"),
    path("api-keys/<str:prefix>/revoke", core.ApiKeyRevokeView.as_view(), name="apikey-revoke"),
    path("audit", core.AuditListView.as_view(), name="audit-list"),
    *router.urls,
]

urlpatterns = [
    path("api/v1/", include(api_v1)),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("api/ddi/schema/", ddi_schema.schema_view, name="ddi-schema"),
    path("health", health.health, name="health"),
    path("health/ready", health.ready, name="health-ready"),
    path("metrics", prometheus.metrics_view, name="prometheus-metrics"),
    # TUF metadata with consistent snapshots (firmware/api/tuf_views.py).
    path("tuf/metadata/timestamp.json", tuf_views.TimestampView.as_view(), name="tuf-timestamp"),
    re_path(
        r"^tuf/metadata/(?P<version>[0-9]+)\.(?P<role>root|snapshot|targets)\.json$",
        tuf_views.VersionedMetadataView.as_view(),
        name="tuf-metadata",
    ),
    re_path(r"^tuf/(?P<path>.*)$", tuf_views.not_found),
    path("admin/", admin.site.urls),
    # The console: server-rendered pages of each app, behind the console login.
    path(
        "login/",
        auth_views.LoginView.as_view(template_name="console/login.html"),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("devices/", include("devices.urls")),
    path("firmware/", include("firmware.urls")),
    path("rollouts/", include("rollouts.urls")),
    # hawkBit DDI devices: /{tenant}/controller/v1/{controllerId}/... (docs/ddi.md).
    path("", include("rollouts.ddi.urls")),
    path("", include("metrics.urls")),
]

handler404 = "ota_site.errors.not_found"
handler500 = "ota_site.errors.server_error"
