"""DDI routes: ``/{tenant}/controller/v1/{controllerId}/...``, at the server's root, because
clients are configured with the server's base URL and build these paths themselves."""

from django.urls import URLPattern, path, register_converter

from rollouts.ddi import views

app_name = "ddi"


class SegmentConverter:
    """One path segment of up to 256 characters (hawkBit's limit for controller ids)."""

    regex = r"[^/]{1,256}"

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value


register_converter(SegmentConverter, "segment")

base = "<segment:tenant>/controller/v1/<segment:controller_id>"

urlpatterns: list[URLPattern] = [
    path(base, views.poll_view, name="poll"),
    path(f"{base}/deploymentBase/<int:action_id>", views.deployment_base, name="deployment"),
    path(
        f"{base}/deploymentBase/<int:action_id>/feedback",
        views.deployment_feedback,
        name="deployment-feedback",
    ),
    path(f"{base}/installedBase/<int:action_id>", views.installed_base, name="installed"),
    path(f"{base}/cancelAction/<int:action_id>", views.cancel_action, name="cancel"),
    path(
        f"{base}/cancelAction/<int:action_id>/feedback",
        views.cancel_feedback,
        name="cancel-feedback",
    ),
    path(f"{base}/configData", views.config_data, name="config-data"),
    path(
        f"{base}/softwaremodules/<uuid:firmware_id>/artifacts/<segment:filename>",
        views.artifact,
        name="artifact",
    ),
]
