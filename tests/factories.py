"""Object graphs for tests. Firmware factories write real bytes to the configured storage."""

from __future__ import annotations

import hashlib
from typing import Any

import factory
from django.core.files.base import ContentFile
from django.utils import timezone

from devices.models import Device, DeviceGroup
from devices.services import hash_secret
from firmware.models import Firmware
from ota_site.versions import version_key
from rollouts.models import UpdateSession


class DeviceGroupFactory(factory.django.DjangoModelFactory[DeviceGroup]):
    class Meta:
        model = DeviceGroup

    name = factory.Sequence(lambda n: f"group-{n}")


class DeviceFactory(factory.django.DjangoModelFactory[Device]):
    class Meta:
        model = Device

    hardware_id = factory.Sequence(lambda n: f"hw-{n:06d}")
    device_type = "board-a"
    current_version = "1.0.0"
    current_version_key = factory.LazyAttribute(lambda d: version_key(d.current_version))
    secret_hash = factory.LazyFunction(lambda: hash_secret("unused"))
    last_seen = factory.LazyFunction(timezone.now)


def firmware_bytes(version: str, size: int = 64 * 1024) -> bytes:
    seed = hashlib.sha256(version.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


class FirmwareFactory(factory.django.DjangoModelFactory[Firmware]):
    """A draft firmware with real stored bytes; pass ``content=`` to choose them."""

    class Meta:
        model = Firmware

    version = factory.Sequence(lambda n: f"2.{n}.0")
    version_key = factory.LazyAttribute(lambda f: version_key(f.version))
    device_type = "board-a"
    filename = "image.bin"
    metadata = factory.LazyFunction(
        lambda: {"release_notes": "", "min_version": None, "dependencies": []}
    )

    @classmethod
    def _create(cls, model_class: type[Firmware], *args: Any, **kwargs: Any) -> Firmware:
        content: bytes = kwargs.pop("content", None) or firmware_bytes(kwargs["version"])
        kwargs.update(
            file_size=len(content),
            checksum=hashlib.sha256(content).hexdigest(),
            sha1=hashlib.sha1(content).hexdigest(),
            md5=hashlib.md5(content).hexdigest(),
        )
        firmware = model_class(**kwargs)
        firmware.file.save(
            f"firmware/{firmware.device_type}/{firmware.id}/image.bin",
            ContentFile(content),
            save=False,
        )
        firmware.save()
        return firmware


class UpdateSessionFactory(factory.django.DjangoModelFactory[UpdateSession]):
    class Meta:
        model = UpdateSession

    device = factory.SubFactory(DeviceFactory)
    firmware = factory.SubFactory(FirmwareFactory)
