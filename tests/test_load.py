"""A short run of the load test (tests/load/fleet.py): a few hundred virtual devices, some sending
duplicated and reordered reports, through a whole three-stage rollout on the production process
set; nothing lost, no 5xx, and the consistency query finds nothing. `make load` runs it at 5,000
devices for several minutes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.load.fleet import Options, run, summary

pytestmark = pytest.mark.e2e


def test_a_fleet_goes_through_a_rollout_and_nothing_is_lost(tmp_path: Path) -> None:
    result = run(Options(devices=150, poll=1.0, soak=2, deadline=150), tmp_path)
    assert result.ok, summary(result)
    assert result.tally.answers["poll 200"] > 150
    assert result.consistency["sessions"].get("failed", 0) == 3  # the 2% that fail their check
