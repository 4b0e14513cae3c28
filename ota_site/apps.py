from django.apps import AppConfig


class OtaSiteConfig(AppConfig):
    name = "ota_site"
    verbose_name = "OTA core"

    def ready(self) -> None:
        from ota_site import checks, schema  # noqa: F401  register the checks and schema extensions
