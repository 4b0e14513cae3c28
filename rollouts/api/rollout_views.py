"""Rollout API for operators: create, read, change, start/pause/resume/cancel/advance, metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import django_filters
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import generics, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from ota_site.permissions import IsOperator, RoleByMethod
from rollouts import evaluation, lifecycle
from rollouts.api.rollout_serializers import ActionSerializer, RolloutSerializer
from rollouts.models import Rollout, RolloutStatus


class RolloutFilter(django_filters.FilterSet):
    status = django_filters.ChoiceFilter(choices=RolloutStatus.choices)
    device_type = django_filters.CharFilter()
    firmware = django_filters.UUIDFilter(field_name="firmware_id")

    class Meta:
        model = Rollout
        fields: list[str] = []


def _rollouts() -> QuerySet[Rollout]:
    return Rollout.objects.select_related("firmware").prefetch_related("stages", "target_groups")


class RolloutListView(generics.ListCreateAPIView):
    permission_classes = [RoleByMethod]
    serializer_class = RolloutSerializer
    filterset_class = RolloutFilter

    def get_queryset(self) -> QuerySet[Rollout]:
        return _rollouts()

    def perform_create(self, serializer: Any) -> None:
        rollout = lifecycle.create_rollout(serializer.to_definition(), actor=self.request.user)
        serializer.instance = _rollouts().get(pk=rollout.pk)


class RolloutDetailView(generics.RetrieveUpdateAPIView):
    permission_classes = [RoleByMethod]
    serializer_class = RolloutSerializer
    lookup_url_kwarg = "rollout_id"

    def get_queryset(self) -> QuerySet[Rollout]:
        return _rollouts()

    def perform_update(self, serializer: Any) -> None:
        lifecycle.update_rollout(serializer.instance, serializer.changes(), actor=self.request.user)
        serializer.instance = _rollouts().get(pk=serializer.instance.pk)


def _action(transition: Callable[..., Rollout], *, takes_reason: bool) -> type[APIView]:
    class RolloutActionView(APIView):
        permission_classes = [IsOperator]

        @extend_schema(request=ActionSerializer, responses={200: RolloutSerializer})
        def post(self, request: Request, rollout_id: Any) -> Response:
            rollout = get_object_or_404(Rollout, pk=rollout_id)
            body = ActionSerializer(data=request.data or {})
            body.is_valid(raise_exception=True)
            extra = {"reason": body.validated_data.get("reason", "")} if takes_reason else {}
            transition(rollout, actor=request.user, **extra)
            return Response(RolloutSerializer(_rollouts().get(pk=rollout.pk)).data)

    RolloutActionView.__name__ = f"Rollout{transition.__name__.title().replace('_', '')}View"
    RolloutActionView.__doc__ = transition.__doc__
    return RolloutActionView


StartView = _action(lifecycle.start_rollout, takes_reason=False)
PauseView = _action(lifecycle.pause_rollout, takes_reason=True)
ResumeView = _action(lifecycle.resume_rollout, takes_reason=False)
CancelView = _action(lifecycle.cancel_rollout, takes_reason=True)
AdvanceView = _action(lifecycle.advance_rollout, takes_reason=True)


class RolloutMetricsView(APIView):
    """Per-stage device counts, session counts by status, success and failure rates."""

    permission_classes = [RoleByMethod]

    @extend_schema(responses={200: OpenApiTypes.OBJECT})
    def get(self, request: Request, rollout_id: Any) -> Response:
        rollout = get_object_or_404(Rollout.objects.select_related("firmware"), pk=rollout_id)
        return Response(evaluation.rollout_metrics(rollout), status=status.HTTP_200_OK)
