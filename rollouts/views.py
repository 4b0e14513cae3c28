"""Console pages for rollouts: the list, the create form with its live preview, a rollout's page
with per-stage progress, and the operator's start/pause/resume/cancel/advance.

Thin views: creation goes through the API's RolloutSerializer (rollouts.forms) and
lifecycle.create_rollout, transitions through rollouts.lifecycle; a ServiceError becomes a
message on the page. Live progress comes from the rollout stream (static/console/rollout.js).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from django.contrib import messages
from django.core.paginator import Paginator
from django.db.models import Count, F, Q
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from devices.models import Device, DeviceGroup
from firmware.models import Firmware
from ota_site.console import console_page, need
from ota_site.errors import ServiceError
from ota_site.models import Event
from ota_site.permissions import Role, has_role
from ota_site.versions import version_key
from rollouts import evaluation, lifecycle, targeting
from rollouts.forms import (
    DEFAULT_STAGES,
    RolloutForm,
    StageFormSet,
    TargetingForm,
    validated_serializer,
)
from rollouts.models import (
    LIVE_ROLLOUT_STATUSES,
    OPEN_STATUSES,
    Rollout,
    RolloutStatus,
    SessionStatus,
    UpdateSession,
)

PAGE_SIZE = 25
RECENT_EVENTS = 25


# --- List ---------------------------------------------------------------------------------------


@require_GET
@console_page
def rollout_list(request: HttpRequest) -> HttpResponse:
    rollouts = Rollout.objects.select_related("firmware").prefetch_related("stages")
    status = request.GET.get("status", "")
    if status == "live":
        rollouts = rollouts.filter(status__in=LIVE_ROLLOUT_STATUSES)
    elif status in RolloutStatus.values:
        rollouts = rollouts.filter(status=status)
    else:
        status = ""  # unknown values show everything rather than an error page
    page = Paginator(rollouts, PAGE_SIZE).get_page(request.GET.get("page"))
    items = list(page.object_list)
    # Session counts of the page's rollouts in one GROUP BY (rollout, status index).
    counts: dict[Any, dict[str, int]] = {}
    for rollout_id, session_status, n in (
        UpdateSession.objects.filter(rollout__in=items, is_rollback=False)
        .order_by()
        .values_list("rollout_id", "status")
        .annotate(n=Count("id"))
    ):
        counts.setdefault(rollout_id, {})[session_status] = n
    rows = []
    for rollout in items:
        stages = list(rollout.stages.all())
        by_status = counts.get(rollout.id, {})
        current = stages[rollout.current_stage] if rollout.current_stage is not None else None
        if rollout.status == RolloutStatus.COMPLETED:
            reach = 100
        else:
            reach = current.percentage if current is not None else 0
        rows.append(
            {
                "rollout": rollout,
                "stage_number": (rollout.current_stage or 0) + 1,
                "stage_count": len(stages),
                "stage": current,
                "reach": reach,
                "success": by_status.get(SessionStatus.SUCCESS, 0),
                "failed": by_status.get(SessionStatus.FAILED, 0),
                "open": sum(by_status.get(s, 0) for s in OPEN_STATUSES),
            }
        )
    return render(
        request,
        "rollouts/list.html",
        {
            "section": "rollouts",
            "page": page,
            "rows": rows,
            "status": status,
            "statuses": RolloutStatus.values,
        },
    )


# --- Create ---------------------------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
@console_page
def create(request: HttpRequest) -> HttpResponse:
    need(request, Role.OPERATOR)
    if request.method == "POST":
        form = RolloutForm(request.POST)
        formset = StageFormSet(request.POST, prefix="stages")
        if form.is_valid() and formset.is_valid():
            serializer = validated_serializer(form, formset)
            if serializer is not None:
                preview_id = form.cleaned_data["preview_id"]
                if Rollout.objects.filter(pk=preview_id).exists():  # the form sent twice
                    return redirect("rollouts:detail", rollout_id=preview_id)
                # Created with the id the preview used, so its stage counts are exact.
                definition = replace(serializer.to_definition(), id=preview_id)
                try:
                    rollout = lifecycle.create_rollout(definition, actor=request.user)
                except ServiceError as exc:
                    form.add_error(None, exc.detail)
                else:
                    messages.success(
                        request,
                        f"Created rollout {rollout.name!r}. "
                        + (
                            "It starts at its start time."
                            if rollout.start_at
                            else "Start it when you are ready."
                        ),
                    )
                    return redirect("rollouts:detail", rollout_id=rollout.pk)
        status = 400
    else:
        initial: dict[str, Any] = {"preview_id": uuid.uuid4()}
        firmware_id = request.GET.get("firmware", "")
        if firmware_id:
            initial["firmware"] = firmware_id
        form = RolloutForm(initial=initial)
        formset = StageFormSet(prefix="stages", initial=DEFAULT_STAGES)
        status = 200
    return render(
        request,
        "rollouts/create.html",
        {
            "section": "rollouts",
            "form": form,
            "formset": formset,
            "stage_errors": getattr(formset, "stage_errors", []),
            "has_groups": DeviceGroup.objects.exists(),
        },
        status=status,
    )


def _json_error(status: int, code: str, detail: str, errors: Any = None) -> JsonResponse:
    body: dict[str, Any] = {"code": code, "detail": detail}
    if errors is not None:
        body["errors"] = errors
    return JsonResponse(body, status=status)


@require_GET
def preview(request: HttpRequest) -> JsonResponse:
    """How many devices each stage of the rollout being drafted will reach (JSON, for the form).

    Reads the create form's own fields (GET, no side effects). Refusals are JSON in the API's
    error shape, not redirects: the caller is the form's script.
    """
    if not request.user.is_authenticated:
        return _json_error(401, "not_authenticated", "Sign in first.")
    if not has_role(request.user, Role.OPERATOR):
        return _json_error(403, "forbidden", "This needs the operator role.")
    form = TargetingForm(request.GET)
    formset = StageFormSet(request.GET, prefix="stages")
    try:
        formset_valid = formset.is_valid()
    except Exception:  # a missing or forged management form
        return _json_error(400, "invalid", "The stages are missing.", {"stages": ["Missing."]})
    if not form.is_valid() or not formset_valid:
        errors: dict[str, Any] = {k: [str(m) for m in v] for k, v in form.errors.items()}
        stage_errors = [str(m) for m in formset.non_form_errors()]
        for index, stage_form in enumerate(formset.forms):
            for field, texts in stage_form.errors.items():
                stage_errors += [f"Stage {index + 1}, {field}: {m}" for m in texts]
        if stage_errors:
            errors["stages"] = stage_errors
        return _json_error(400, "invalid", "The request is not valid.", errors)
    data = form.cleaned_data
    return JsonResponse(
        preview_counts(
            firmware=data["firmware"],
            group_ids=[group.pk for group in data["target_groups"]],
            from_version_min=data["from_version_min"],
            from_version_max=data["from_version_max"],
            metadata_filters=data["metadata_filters"],
            percentages=[stage["percentage"] for stage in formset.stages()],
            rollout_id=data["preview_id"],
        )
    )


def preview_counts(
    *,
    firmware: Firmware,
    group_ids: list[Any],
    from_version_min: str,
    from_version_max: str,
    metadata_filters: dict[str, Any],
    percentages: list[int],
    rollout_id: uuid.UUID,
) -> dict[str, Any]:
    """Targeted devices, and per stage how many it reaches (cumulative), in one query.

    The same targeting and buckets as a saved rollout (rollouts.targeting, rollouts.buckets),
    grouped by percent slot (bucket // 100, at most 100 rows): each device is hashed once however
    many stages there are, and every stage count is a sum of slots. "Eligible" devices are those
    the rollout would actually offer the firmware to (below its version, not below its
    min_version); the others are targeted but already up to date.
    """
    probe = Rollout(
        id=rollout_id,
        device_type=firmware.device_type,
        from_version_min=from_version_min,
        from_version_max=from_version_max,
        metadata_filters=metadata_filters,
    )
    eligible = Q(current_version_key__lt=firmware.version_key)
    if firmware.min_version:
        eligible &= Q(current_version_key__gte=version_key(firmware.min_version))
    devices = Device.objects.filter(targeting.targeting_q(probe, group_ids))
    slots = (
        targeting.with_bucket(devices, probe)
        .annotate(slot=F("ota_bucket") / 100)
        .order_by()
        .values_list("slot")
        .annotate(n=Count("id"), e=Count("id", filter=eligible))
    )
    per_slot = {slot: (n, e) for slot, n, e in slots}
    targeted = sum(n for n, _ in per_slot.values())
    stages = []
    for position, percentage in enumerate(percentages):
        reached = [per_slot.get(slot, (0, 0)) for slot in range(percentage)]
        stages.append(
            {
                "position": position,
                "percentage": percentage,
                "devices": sum(n for n, _ in reached),
                "eligible": sum(e for _, e in reached),
            }
        )
    return {
        "device_type": firmware.device_type,
        "targeted": targeted,
        "eligible": sum(e for _, e in per_slot.values()),
        "stages": stages,
        "preview_id": str(rollout_id),
    }


# --- A rollout ------------------------------------------------------------------------------------


# Which transitions each status allows (the same rules lifecycle enforces).
ACTIONS: dict[str, tuple[Callable[..., Rollout], tuple[str, ...], bool]] = {
    "start": (lifecycle.start_rollout, (RolloutStatus.SCHEDULED,), False),
    "pause": (lifecycle.pause_rollout, (RolloutStatus.ACTIVE,), True),
    "resume": (lifecycle.resume_rollout, (RolloutStatus.PAUSED,), False),
    "cancel": (lifecycle.cancel_rollout, tuple(LIVE_ROLLOUT_STATUSES), True),
    "advance": (lifecycle.advance_rollout, (RolloutStatus.ACTIVE, RolloutStatus.PAUSED), True),
}

CONFIRMATIONS = {
    "start": "Start offering the firmware to the first stage now?",
    "pause": "Pause? Devices stop getting new offers; those already updating finish.",
    "resume": "Resume offering the firmware to the current stage?",
    "cancel": "Cancel for good? Open sessions are cancelled; devices keep what they run.",
    "advance": "Advance to the next stage now, whatever the thresholds say?",
}


@require_GET
@console_page
def rollout_detail(request: HttpRequest, rollout_id: Any) -> HttpResponse:
    rollout = get_object_or_404(
        Rollout.objects.select_related("firmware", "created_by").prefetch_related("target_groups"),
        pk=rollout_id,
    )
    metrics = evaluation.rollout_metrics(rollout)
    stages = []
    for stage in metrics["stages"]:
        sessions = stage["sessions"]
        open_count = sum(sessions.get(s, 0) for s in OPEN_STATUSES)
        success, failed = sessions.get(SessionStatus.SUCCESS, 0), sessions.get("failed", 0)
        # The bar's whole: the stage's devices, or its sessions if more (devices that joined
        # and then moved out of the targeting still count).
        whole = max(stage["devices"], success + failed + open_count, 1)
        stages.append(
            {
                **stage,
                "open": open_count,
                "success": success,
                "failed": failed,
                "success_pct": round(100 * success / whole, 1),
                "failed_pct": round(100 * failed / whole, 1),
                "open_pct": round(100 * open_count / whole, 1),
                "success_rate_pct": _pct(stage["success_rate"]),
                "failure_rate_pct": _pct(stage["failure_rate"]),
                "below_success": stage["success_rate"] is not None
                and stage["success_rate"] < rollout.success_threshold,
                "above_rollback": stage["failure_rate"] is not None
                and stage["failure_rate"] > rollout.rollback_threshold,
            }
        )
    events = Event.objects.filter(rollout_id=rollout.id).order_by("-id")[:RECENT_EVENTS]
    controls = [
        {
            "action": action,
            "allowed_in": " ".join(allowed),
            "available": rollout.status in allowed,
            "takes_reason": takes_reason,
            "confirm": CONFIRMATIONS[action],
        }
        for action, (_, allowed, takes_reason) in ACTIONS.items()
    ]
    return render(
        request,
        "rollouts/detail.html",
        {
            "section": "rollouts",
            "rollout": rollout,
            "metrics": metrics,
            "stages": stages,
            "events": list(events),
            "controls": controls,
            "success_threshold_pct": _pct(rollout.success_threshold),
            "rollback_threshold_pct": _pct(rollout.rollback_threshold),
        },
    )


def _pct(value: float | None) -> float | None:
    return None if value is None else round(value * 100, 1)


@require_POST
@console_page
def rollout_action(request: HttpRequest, rollout_id: Any, action: str) -> HttpResponse:
    need(request, Role.OPERATOR)
    rollout = get_object_or_404(Rollout, pk=rollout_id)
    transition, _, takes_reason = ACTIONS[action]
    reason = request.POST.get("reason", "").strip()[:500]
    extra = {"reason": reason} if takes_reason else {}
    try:
        rollout = transition(rollout, actor=request.user, **extra)
    except ServiceError as exc:
        messages.error(request, f"Could not {action} the rollout: {exc.detail}")
    else:
        messages.success(request, f"Rollout {rollout.name!r} is now {rollout.status}.")
    return redirect("rollouts:detail", rollout_id=rollout_id)
