"""Admin for rollouts (with their stages) and update sessions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import admin, messages
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest

from ota_site.admin import events_table, role_allows, uuid_or_none
from ota_site.errors import ServiceError
from ota_site.models import Event
from ota_site.permissions import Role
from rollouts import lifecycle, services
from rollouts.models import OPEN_STATUSES, Rollout, RolloutStage, UpdateSession


class RolloutStageInline(admin.TabularInline):
    model = RolloutStage
    fields = ("position", "name", "percentage", "min_duration", "start_time", "completion_time")
    readonly_fields = fields
    ordering = ("position",)
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _rollout_action(
    transition: Callable[..., Rollout], description: str
) -> Callable[[Any, HttpRequest, QuerySet[Rollout]], None]:
    """An admin action that runs one lifecycle transition per selected rollout."""

    def action(modeladmin: Any, request: HttpRequest, queryset: QuerySet[Rollout]) -> None:
        done = 0
        for rollout in queryset:
            try:
                transition(rollout, actor=request.user)
                done += 1
            except ServiceError as exc:
                modeladmin.message_user(request, f"{rollout}: {exc.detail}", messages.ERROR)
        if done:
            modeladmin.message_user(request, f"{description}: {done} rollout(s).", messages.SUCCESS)

    action.__name__ = transition.__name__
    return admin.action(description=description, permissions=["control"])(action)


@admin.register(Rollout)
class RolloutAdmin(admin.ModelAdmin):
    """Rollouts are created with the API, the console or `manage.py rollout create`, where the
    definition is checked as a whole; here they are inspected and controlled with actions."""

    inlines = (RolloutStageInline,)
    list_display = (
        "name",
        "firmware",
        "status",
        "current_stage",
        "stage_count",
        "created_by",
        "created_at",
        "started_at",
        "completed_at",
    )
    list_filter = ("status", "device_type")
    list_select_related = ("firmware", "created_by")
    search_fields = ("name", "firmware__version")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    actions = (
        _rollout_action(lifecycle.start_rollout, "Start"),
        _rollout_action(lifecycle.pause_rollout, "Pause"),
        _rollout_action(lifecycle.resume_rollout, "Resume"),
        _rollout_action(lifecycle.advance_rollout, "Advance to the next stage"),
        _rollout_action(lifecycle.cancel_rollout, "Cancel"),
    )
    fields = (
        "name",
        "firmware",
        "device_type",
        "status",
        "status_reason",
        "current_stage",
        "target_groups",
        "from_version_min",
        "from_version_max",
        "metadata_filters",
        "success_threshold",
        "rollback_threshold",
        "min_devices",
        "device_timeout",
        "auto_rollback",
        "start_at",
        "created_by",
        "created_at",
        "started_at",
        "stage_started_at",
        "completed_at",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[Rollout]:
        return super().get_queryset(request).annotate(stage_count=Count("stages"))

    @admin.display(description="Stages", ordering="stage_count")
    def stage_count(self, rollout: Rollout) -> int:
        return rollout.stage_count  # type: ignore[attr-defined]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # history: cancel instead

    def has_control_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("rollouts.change_rollout") and role_allows(
            request, Role.OPERATOR
        )


@admin.register(UpdateSession)
class UpdateSessionAdmin(admin.ModelAdmin):
    """View only: sessions change through the device flow; operators may cancel open ones."""

    list_display = (
        "id",
        "device",
        "firmware",
        "from_version",
        "status",
        "progress",
        "is_rollback",
        "rollout",
        "started_at",
        "completed_at",
        "duration",
    )
    list_filter = (
        "status",
        "is_rollback",
        "firmware__device_type",
        ("started_at", admin.DateFieldListFilter),
    )
    list_select_related = ("device", "firmware", "rollout")
    search_fields = ("device__hardware_id",)
    search_help_text = "Part of a hardware id, a session number, or a session or device id."
    # Newest first by the sequential id, which has an index; started_at alone has none.
    ordering = ("-id",)
    actions = ("cancel_selected",)
    fields = (
        "id",
        "uuid",
        "device",
        "firmware",
        "rollout",
        "from_version",
        "is_rollback",
        "status",
        "progress",
        "error_message",
        "started_at",
        "updated_at",
        "completed_at",
        "duration",
        "session_events",
    )
    readonly_fields = fields
    # Sessions grow with every update of every device: no unfiltered COUNT, no facet counts.
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER

    def get_queryset(self, request: HttpRequest) -> QuerySet[UpdateSession]:
        # The change page shows the same relations as the list.
        return super().get_queryset(request).select_related("device", "firmware", "rollout")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: UpdateSession | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: UpdateSession | None = None) -> bool:
        return False  # history; sessions go only with their device

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("rollouts.change_updatesession") and role_allows(
            request, Role.OPERATOR
        )

    @admin.display(description="Events")
    def session_events(self, session: UpdateSession) -> str:
        return events_table(
            Event.objects.filter(session_id=session.id).order_by("id")[:50],
            filters={"session_id": str(session.id)},
            label="All events of this session",
        )

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[UpdateSession], search_term: str
    ) -> tuple[QuerySet[UpdateSession], bool]:
        term = search_term.strip()
        if term.isdigit() and len(term) <= 18:  # fits a bigint
            return queryset.filter(pk=int(term)), False
        some_id = uuid_or_none(term)
        if some_id is not None:
            return queryset.filter(Q(uuid=some_id) | Q(device_id=some_id)), False
        return super().get_search_results(request, queryset, search_term)

    @admin.action(description="Cancel selected sessions", permissions=["cancel"])
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[UpdateSession]) -> None:
        cancelled = 0
        for session_id in queryset.filter(status__in=OPEN_STATUSES).values_list("id", flat=True):
            if services.cancel_session(
                session_id, reason="Cancelled by an operator.", actor=request.user
            ):
                cancelled += 1
        self.message_user(request, f"Cancelled {cancelled} open session(s).", messages.SUCCESS)
