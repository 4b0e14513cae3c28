from django.apps import AppConfig


class FirmwareConfig(AppConfig):
    name = "firmware"
    verbose_name = "Firmware"

    def ready(self) -> None:
        from django.core import checks

        from firmware import tuf_repo

        checks.register(tuf_repo.check_settings, checks.Tags.compatibility)
        checks.register(tuf_repo.check_repository, checks.Tags.database)
