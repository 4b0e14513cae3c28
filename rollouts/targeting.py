"""Which devices a rollout targets, in SQL (fleet counts) and in Python (the device poll).

The poll must stay within two queries, so it matches the device against a cached, compact
description of every live rollout (``RolloutSpec``) instead of asking the database.
"""

from __future__ import annotations

import uuid
from typing import Any, TypedDict

from django.conf import settings
from django.db.models import Q, QuerySet

from devices.models import Device
from firmware import services as firmware_services
from firmware.services import PublishedFirmware
from ota_site import cache
from ota_site.versions import version_key
from rollouts.buckets import Bucket, bucket, bucket_limit
from rollouts.models import Rollout, RolloutStatus

LIVE_SPECS_KEY = "rollouts:live-specs:v1"


class RolloutSpec(TypedDict):
    id: str
    status: str
    device_type: str
    group_ids: list[str]
    min_key: str
    max_key: str
    metadata_filters: dict[str, Any]
    stage: int | None
    percentage: int
    firmware: PublishedFirmware


def targeting_q(rollout: Rollout, group_ids: list[Any] | None = None) -> Q:
    """The devices a rollout targets, before stage membership."""
    q = Q(device_type=rollout.device_type)
    groups = (
        group_ids
        if group_ids is not None
        else list(rollout.target_groups.values_list("id", flat=True))
    )
    if groups:
        q &= Q(group_id__in=groups)
    if rollout.from_version_min:
        q &= Q(current_version_key__gte=version_key(rollout.from_version_min))
    if rollout.from_version_max:
        q &= Q(current_version_key__lte=version_key(rollout.from_version_max))
    for key, value in rollout.metadata_filters.items():
        # "__exact" makes the key a key transform even when it is named like a lookup
        # ("contains", "has_key").
        q &= Q(**{f"metadata__{key}__exact": value})
    return q


def targeted_devices(rollout: Rollout) -> QuerySet[Device]:
    return Device.objects.filter(targeting_q(rollout))


def with_bucket(queryset: QuerySet[Device], rollout: Rollout) -> QuerySet[Device]:
    return queryset.annotate(ota_bucket=Bucket("id", rollout.id))


def in_stage(queryset: QuerySet[Device], rollout: Rollout, percentage: int) -> QuerySet[Device]:
    limit = bucket_limit(percentage)
    return with_bucket(queryset, rollout).filter(ota_bucket__lt=limit)  # type: ignore[misc]


# --- The poll's view -------------------------------------------------------------------------


def live_specs() -> list[RolloutSpec]:
    """Active and paused rollouts, oldest start first (the oldest wins a device), cached briefly.

    Every rollout transition clears the cache (other processes' copies within
    CACHE_LOCAL_SECONDS); the timeout only bounds how long a change made by hand in the database
    takes to reach devices.
    """
    cached = cache.get(LIVE_SPECS_KEY, local=True)
    if cached is not cache.MISSING:
        return cached
    specs: dict[str, RolloutSpec] = {}
    rows = (
        Rollout.objects.filter(
            status__in=[RolloutStatus.ACTIVE, RolloutStatus.PAUSED],
            # Firmware whose stored bytes failed verification is withdrawn from offers.
            firmware__quarantined_at__isnull=True,
        )
        .order_by("started_at", "id")
        .values(
            "id",
            "status",
            "device_type",
            "from_version_min",
            "from_version_max",
            "metadata_filters",
            "current_stage",
            "target_groups",
            "firmware__id",
            "firmware__version",
            "firmware__device_type",
            "firmware__file_size",
            "firmware__checksum",
            "firmware__signature",
            "firmware__signing_key_id",
            "firmware__manifest",
            "firmware__metadata",
            "firmware__release_counter",
            "firmware__file",
            "stages__position",
            "stages__percentage",
        )
    )
    # One query: a row per (target group x stage) of each rollout, folded here. Rollouts have a
    # handful of stages and groups, and this runs only when the cache is cold.
    for row in rows:
        rollout_id = str(row["id"])
        spec = specs.get(rollout_id)
        if spec is None:
            stage = row["current_stage"]
            metadata = row["firmware__metadata"] or {}
            spec = RolloutSpec(
                id=rollout_id,
                status=row["status"],
                device_type=row["device_type"],
                group_ids=[],
                min_key=version_key(row["from_version_min"]) if row["from_version_min"] else "",
                max_key=version_key(row["from_version_max"]) if row["from_version_max"] else "",
                metadata_filters=row["metadata_filters"] or {},
                stage=stage,
                percentage=0,
                firmware=PublishedFirmware(
                    id=str(row["firmware__id"]),
                    version=row["firmware__version"],
                    device_type=row["firmware__device_type"],
                    size=row["firmware__file_size"],
                    sha256=row["firmware__checksum"],
                    signature=row["firmware__signature"],
                    key_id=row["firmware__signing_key_id"] or "",
                    manifest=row["firmware__manifest"],
                    min_version=metadata.get("min_version") or None,
                    release_counter=row["firmware__release_counter"],
                    tuf_target=firmware_services.tuf_target_path(
                        row["firmware__device_type"],
                        row["firmware__version"],
                        row["firmware__file"] or "",
                    ),
                ),
            )
            specs[rollout_id] = spec
        group = row["target_groups"]
        if group is not None and str(group) not in spec["group_ids"]:
            spec["group_ids"].append(str(group))
        if row["stages__position"] is not None and row["stages__position"] == spec["stage"]:
            spec["percentage"] = row["stages__percentage"]
    result = list(specs.values())
    cache.set(LIVE_SPECS_KEY, result, settings.ROLLOUT_CACHE_TIMEOUT, local=True)
    for spec in result:  # polls of devices in these rollouts look their firmware up by id
        firmware_services.remember_published(spec["firmware"])
    return result


def forget_live_specs() -> None:
    cache.delete(LIVE_SPECS_KEY)


def spec_matches(spec: RolloutSpec, device: Device) -> bool:
    """Targeting in Python: the same rules as targeting_q, for one device already read."""
    if device.device_type != spec["device_type"]:
        return False
    if spec["group_ids"] and str(device.group_id) not in spec["group_ids"]:
        return False
    if spec["min_key"] and device.current_version_key < spec["min_key"]:
        return False
    if spec["max_key"] and device.current_version_key > spec["max_key"]:
        return False
    return all(
        json_equal(device.metadata.get(key, _ABSENT), value)
        for key, value in spec["metadata_filters"].items()
    )


_ABSENT = object()


def json_equal(actual: Any, wanted: Any) -> bool:
    """Equality as the database compares JSON values: a string only equals a string, a boolean
    only a boolean, and numbers by value (1 == 1.0), so the poll and the SQL counts agree."""
    if isinstance(wanted, bool) or isinstance(actual, bool):
        return isinstance(actual, bool) and isinstance(wanted, bool) and actual is wanted
    if isinstance(wanted, int | float):
        return isinstance(actual, int | float) and actual == wanted
    return isinstance(actual, str) and isinstance(wanted, str) and actual == wanted


def spec_includes(spec: RolloutSpec, device_id: uuid.UUID) -> bool:
    """Stage membership of a targeted device."""
    return bucket(device_id, spec["id"]) < bucket_limit(spec["percentage"])
