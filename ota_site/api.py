"""The core's own API: API keys (admin) and the audit log (admin).

Thin views over ``ota_site.apikeys`` and the event table; refusals come from the services as
``ServiceError`` and reach the caller in the JSON error shape.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import django_filters
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import generics, serializers, status
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from ota_site import apikeys
from ota_site.filters import UtcDateTimeFilter
from ota_site.models import ActorKind, ApiKey, Event, EventKind
from ota_site.permissions import IsAdmin, Role

# --- API keys ------------------------------------------------------------------------------------


class ApiKeySerializer(serializers.ModelSerializer):
    created_by = serializers.CharField(source="created_by_actor", read_only=True)
    state = serializers.CharField(read_only=True)

    class Meta:
        model = ApiKey
        fields: tuple[str, ...] = (
            "prefix",
            "name",
            "role",
            "state",
            "created_by",
            "created_at",
            "expires_at",
            "revoked_at",
            "last_used_at",
            "last_used_ip",
        )
        read_only_fields: tuple[str, ...] = fields


class ApiKeyCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    role = serializers.ChoiceField(choices=[role.label for role in Role])
    expires_at = serializers.DateTimeField(required=False, allow_null=True)
    expires_days = serializers.IntegerField(
        required=False, min_value=1, max_value=3650, help_text="Instead of expires_at."
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("expires_at") is not None and attrs.get("expires_days") is not None:
            raise ValidationError({"expires_days": ["Give expires_at or expires_days, not both."]})
        if attrs.get("expires_at") is not None and attrs["expires_at"] <= timezone.now():
            raise ValidationError({"expires_at": ["This lies in the past."]})
        return attrs


class ApiKeyCreatedSerializer(ApiKeySerializer):
    token = serializers.CharField(read_only=True, help_text="Shown only in this answer.")

    class Meta(ApiKeySerializer.Meta):
        fields = (*ApiKeySerializer.Meta.fields, "token")
        read_only_fields = fields


class ApiKeyListView(generics.ListAPIView):
    """GET: every key (never a secret). POST: create one; the answer holds its token, once."""

    permission_classes = [IsAdmin]
    serializer_class = ApiKeySerializer
    queryset = ApiKey.objects.all()

    @extend_schema(request=ApiKeyCreateSerializer, responses={201: ApiKeyCreatedSerializer})
    def post(self, request: Request) -> Response:
        body = ApiKeyCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        expires_at = data.get("expires_at")
        if data.get("expires_days") is not None:
            expires_at = timezone.now() + timedelta(days=data["expires_days"])
        key, token = apikeys.create_api_key(
            name=data["name"],
            role=Role.from_label(data["role"]),
            expires_at=expires_at,
            actor=request.user,
        )
        reply = ApiKeySerializer(key).data
        reply["token"] = token
        return Response(reply, status=status.HTTP_201_CREATED)


class ApiKeyDetailView(APIView):
    """GET: one key. DELETE: revoke it (the row stays, for the audit trail)."""

    permission_classes = [IsAdmin]

    @extend_schema(responses={200: ApiKeySerializer})
    def get(self, request: Request, prefix: str) -> Response:
        return Response(ApiKeySerializer(get_object_or_404(ApiKey, prefix=prefix)).data)

    @extend_schema(responses={204: None})
    def delete(self, request: Request, prefix: str) -> Response:
        apikeys.revoke_api_key(get_object_or_404(ApiKey, prefix=prefix), actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class ApiKeyRevokeView(APIView):
    permission_classes = [IsAdmin]

    @extend_schema(request=None, responses={200: ApiKeySerializer})
    def post(self, request: Request, prefix: str) -> Response:
        key = apikeys.revoke_api_key(get_object_or_404(ApiKey, prefix=prefix), actor=request.user)
        return Response(ApiKeySerializer(key).data)


# --- Audit log ------------------------------------------------------------------------------------


class AuditFilter(django_filters.FilterSet):
    kind = django_filters.MultipleChoiceFilter(choices=EventKind.choices)
    actor = django_filters.CharFilter(method="filter_actor")
    actor_kind = django_filters.ChoiceFilter(choices=ActorKind.choices)
    device_id = django_filters.UUIDFilter()
    firmware_id = django_filters.UUIDFilter()
    rollout_id = django_filters.UUIDFilter()
    session_id = django_filters.NumberFilter()
    request_id = django_filters.CharFilter()
    since = UtcDateTimeFilter(field_name="created_at", lookup_expr="gte")
    until = UtcDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = Event
        fields: list[str] = []

    def filter_actor(self, queryset: QuerySet[Event], name: str, value: str) -> QuerySet[Event]:
        queryset = queryset.filter(actor=value)
        # Say the actor's kind too, so PostgreSQL may use the small partial index of people's
        # and keys' events (event_people_idx) instead of walking the whole log.
        prefix = value.partition(":")[0]
        if prefix == "user":
            return queryset.filter(actor_kind=ActorKind.USER)
        if prefix == "key":
            return queryset.filter(actor_kind=ActorKind.API_KEY)
        return queryset


class AuditPagination(CursorPagination):
    """Newest first by id; a cursor never skips or repeats rows while new events arrive, and
    costs no COUNT over the largest table."""

    ordering = "-id"
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 1000


class AuditEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = Event
        fields = (
            "id",
            "created_at",
            "kind",
            "actor",
            "actor_kind",
            "ip",
            "request_id",
            "device_id",
            "firmware_id",
            "rollout_id",
            "session_id",
            "changes",
            "data",
        )
        read_only_fields = fields


AUDIT_PARAMETERS = {*AuditFilter.base_filters, "cursor", "page_size"}


class AuditListView(generics.ListAPIView):
    """GET /api/v1/audit: the event log, filtered; unknown or malformed filters are 400."""

    permission_classes = [IsAdmin]
    serializer_class = AuditEventSerializer
    filterset_class = AuditFilter
    pagination_class = AuditPagination
    queryset = Event.objects.all()

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        unknown = sorted(set(request.query_params) - AUDIT_PARAMETERS)
        if unknown:
            raise ValidationError({name: ["Unknown filter."] for name in unknown})
        page_size = request.query_params.get("page_size")
        if page_size is not None and not (page_size.isdigit() and int(page_size) > 0):
            raise ValidationError({"page_size": ["A positive whole number."]})
        return super().list(request, *args, **kwargs)
