"""The agent's persistent state: ``state_dir/state.json``, rewritten atomically after every step.

The phases and what each one means after a restart are described in ``ota_client.agent``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ota_client.system import atomic_write_json

IDLE = "idle"
DOWNLOADING = "downloading"
DOWNLOADED = "downloaded"
INSTALLING = "installing"
INSTALLED = "installed"
ARMED = "armed"
VALIDATING = "validating"
COMMITTED = "committed"
ROLLING_BACK = "rolling_back"
PHASES = (
    IDLE,
    DOWNLOADING,
    DOWNLOADED,
    INSTALLING,
    INSTALLED,
    ARMED,
    VALIDATING,
    COMMITTED,
    ROLLING_BACK,
)
# Sessions this device finished, newest last: an offer of one of them is never started again
# (the server has not received our final report yet, or refused it).
FINISHED_MEMORY = 20


@dataclass
class State:
    phase: str = IDLE
    #: The offer being installed (verifier.Offer as a dict), None when idle.
    offer: dict[str, Any] | None = None
    target_slot: str | None = None
    from_slot: str | None = None
    from_version: str | None = None
    #: downloader.ResumePoint of download.part.
    resume_etag: str | None = None
    resume_synced: int = 0
    download_attempts: int = 0
    install_attempts: int = 0
    #: Why the update is being abandoned (rolling_back).
    failure: str | None = None
    #: The version each slot holds, as far as the client knows (it wrote them).
    slots: dict[str, str | None] = field(default_factory=dict)
    finished_sessions: list[str] = field(default_factory=list)
    #: The version last sent in a heartbeat.
    reported_version: str | None = None
    #: The outcome of the last update: session_id, version, outcome, reason, finished_at.
    last_result: dict[str, Any] | None = None
    #: The highest release counter of a committed install: offers below it are refused.
    release_counter: int = 0
    #: The TUF TargetFile of the offer being installed (tuf_client.check_offer), to check the
    #: download against.
    tuf_target: dict[str, Any] | None = None
    updated_at: float = 0.0

    @classmethod
    def load(cls, path: Path, *, booted_slot: str, factory_version: str) -> State:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            # First start: the running image is the factory image.
            return cls(slots={booted_slot: factory_version})
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in known})
        if state.phase not in PHASES:
            raise ValueError(f"{path}: unknown phase {state.phase!r}")
        return state

    def save(self, path: Path) -> None:
        self.updated_at = time.time()
        atomic_write_json(path, asdict(self))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def remember_finished(self, session_id: str) -> None:
        if session_id in self.finished_sessions:
            return
        self.finished_sessions = [*self.finished_sessions, session_id][-FINISHED_MEMORY:]
