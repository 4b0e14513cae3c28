from django.apps import AppConfig


class OtaSiteConfig(AppConfig):
    name = "ota_site"
    verbose_name = "OTA core"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        from ota_site import checks, schema  # noqa: F401  register the checks and schema extensions
        from ota_site.roles import ensure_role_groups
        from ota_site.telemetry import setup as setup_telemetry

        # After every app's permissions exist (their own post_migrate handlers run first).
        post_migrate.connect(ensure_role_groups, dispatch_uid="ota_site.ensure_role_groups")
        # OpenTelemetry (OTEL_ENABLED) before Django builds its middleware chain.
        setup_telemetry()
