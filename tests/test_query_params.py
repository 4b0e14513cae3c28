"""Bad query parameters on operator lists are 4xx (or ignored), never a 500."""

import pytest


@pytest.mark.parametrize(
    "q",
    [
        "/api/v1/firmware?published=maybe",
        "/api/v1/devices?page=abc",
        "/api/v1/devices?ordering=secret_hash",
        "/api/v1/sessions?status=x",
        "/api/v1/sessions?device=zz",
        "/api/v1/devices?page_size=-1",
        "/api/v1/groups?page=99",
        "/api/v1/groups",
        "/api/v1/devices?search=" + "a" * 500,
        "/api/v1/devices?last_seen_after=2026-13-45",
    ],
)
def test_bad_query_parameters_never_500(operator_api, q):
    r = operator_api.get(q)

    assert r.status_code < 500
