from __future__ import annotations

from datetime import timedelta

import django_filters
from django.conf import settings
from django.db.models import Q, QuerySet
from django.utils import timezone

from devices.models import Device, DeviceGroup, DeviceStatus
from ota_site.filters import UtcDateTimeFilter


class DeviceFilter(django_filters.FilterSet):
    device_type = django_filters.CharFilter()
    status = django_filters.ChoiceFilter(choices=DeviceStatus.choices)
    group = django_filters.ModelChoiceFilter(queryset=DeviceGroup.objects.all())
    version = django_filters.CharFilter(field_name="current_version")
    target_version = django_filters.CharFilter()
    last_seen_after = UtcDateTimeFilter(field_name="last_seen", lookup_expr="gte")
    last_seen_before = UtcDateTimeFilter(field_name="last_seen", lookup_expr="lt")
    online = django_filters.BooleanFilter(method="filter_online")
    search = django_filters.CharFilter(method="filter_search", max_length=128)
    ordering = django_filters.OrderingFilter(
        fields=(
            ("hardware_id", "hardware_id"),
            ("last_seen", "last_seen"),
            ("current_version_key", "version"),
            ("created_at", "created_at"),
            ("status", "status"),
            ("device_type", "device_type"),
        )
    )

    class Meta:
        model = Device
        fields: list[str] = []

    def filter_online(self, queryset: QuerySet[Device], name: str, value: bool) -> QuerySet[Device]:
        since = timezone.now() - timedelta(seconds=settings.DEVICE_ONLINE_WINDOW)
        if value:
            return queryset.filter(last_seen__gte=since)
        return queryset.filter(Q(last_seen__lt=since) | Q(last_seen__isnull=True))

    def filter_search(self, queryset: QuerySet[Device], name: str, value: str) -> QuerySet[Device]:
        # Hardware ids are the thing operators paste; a prefix match uses the unique index.
        return queryset.filter(hardware_id__startswith=value) if value else queryset
