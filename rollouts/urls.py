"""Console pages of the rollouts app (server-rendered; the API is under /api/v1/)."""

from django.urls import URLPattern, path

from rollouts import views

app_name = "rollouts"

urlpatterns: list[URLPattern] = [
    path("", views.rollout_list, name="list"),
    path("new/", views.create, name="create"),
    path("new/preview", views.preview, name="preview"),
    path("<uuid:rollout_id>/", views.rollout_detail, name="detail"),
    *(
        path(
            f"<uuid:rollout_id>/{action}/",
            views.rollout_action,
            {"action": action},
            name=action,
        )
        for action in views.ACTIONS
    ),
]
