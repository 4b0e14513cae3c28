"""The update state machine.

One ``Agent`` drives one device. Its state (``ota_client.state.State``) is written atomically to
``state_dir/state.json`` after every step, and every step decides what to do from that state and
from the facts of the device (the slot it booted from, the bootloader environment), never from
memory. So starting the process, rebooting, or resuming after a power cut is the same thing:
call ``step()`` until it stops making progress.

Phases (persisted)          What the next step does, also after a restart in that phase
-------------------------   ------------------------------------------------------------------
``idle``                    send queued reports, heartbeat if the running version changed,
                            renew the device certificate when it is due (a failure is only
                            logged), ask the server for an update; verify the offer
                            (signature, manifest, device type, version rules, min_version,
                            release counter, TUF metadata and target) before any download.
                            A bad offer is reported ``failed`` with the reason; a good one
                            starts ``downloading``.
``downloading``             download (resuming download.part), check size + sha256 against the
                            signed manifest and the TUF target, rename it to download.img ->
                            ``downloaded``. A
                            corrupt image is thrown away and downloaded afresh, at most
                            ``download.attempts`` times in all; then the session is reported
                            ``failed``. Offline: stay here and try again later.
``downloaded``              report ``installing`` -> ``installing``.
``installing``              write the INACTIVE slot from download.img (the running slot is never
                            written), read it back and compare its sha256 -> ``installed``. A cut
                            in the middle writes the slot again from the start.
``installed``               read the slot back again, arm ONE trial of it for ``trial_boots``
                            boots, report ``validating`` -> ``armed``.
``armed``                   reboot. After the reboot: booted the new slot -> ``validating``;
                            still the old slot with the trial armed -> reboot (the cut came
                            before the reboot); old slot and trial gone -> the bootloader gave up
                            on the new image: report a failed validation and go ``idle``.
``validating``              running the new slot on trial: run the health check. Healthy ->
                            commit (the new slot becomes the one that boots) -> ``committed``.
                            Unhealthy -> cancel the trial, report a failed validation with the
                            reason -> ``rolling_back``. (Booted the old slot: as in ``armed``.)
``committed``               report a successful validation with the running version, clean up
                            -> ``idle``.
``rolling_back``            still on the new slot: cancel the trial and reboot; back on the old
                            slot: clean up -> ``idle``.

Power cuts: the boot environment is only changed by single atomic writes, the running slot and
the committed slot are never written, and a trial is cancelled before its slot is rewritten, so
at every instant the next boot starts a complete image: the committed one, or the new one on
trial, which the bootloader abandons after ``trial_boots`` boots without a commit.

Reports go out through ``ota_client.link``, offers are checked by ``ota_client.offers``.

Threads: an Agent holds no global state. ``ota-client simulate`` can run many in one process, each
with its own Config, state_dir, FileSystemInterface, health check and reboot function.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable

from ota_client import faults, tuf_client
from ota_client.api import Offline, Refused, ServerClient
from ota_client.config import Config, make_system
from ota_client.downloader import Downloader, DownloadRejected, ResumePoint
from ota_client.health import HealthCheck, command_health_check
from ota_client.link import ServerLink
from ota_client.offers import OfferGate
from ota_client.outbox import Outbox
from ota_client.outcome import DeviceLog, Outcome, StepResult
from ota_client.state import (
    ARMED,
    COMMITTED,
    DOWNLOADED,
    DOWNLOADING,
    IDLE,
    INSTALLED,
    INSTALLING,
    ROLLING_BACK,
    VALIDATING,
    State,
)
from ota_client.system import SystemInterface, fsync_dir
from ota_client.verifier import (
    Offer,
    VerificationError,
    verify_image,
)

logger = logging.getLogger(__name__)

__all__ = ["Agent", "Outcome", "StepResult"]

# A slot that does not read back what was written is rewritten this many times in all.
INSTALL_ATTEMPTS = 2
# One run_once() never takes more steps than this: a whole update is about a dozen.
MAX_STEPS = 100

RebootHook = Callable[[], bool]


class _SessionClosed(Exception):
    """The server finished the session (cancelled it) while we were downloading."""


class Agent:
    def __init__(
        self,
        config: Config,
        system: SystemInterface | None = None,
        *,
        server: ServerClient | None = None,
        health_check: HealthCheck | None = None,
        reboot: RebootHook | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        """``reboot`` restarts the device and returns True when the device has restarted by the
        time it returns (a simulation), False when the process should stop and wait to be
        killed. By default: ``system.reboot()`` and ``system.reboot_returns``."""
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.system = system or make_system(config)
        self.state_path = config.state_dir / "state.json"
        self.part_path = config.state_dir / "download.part"
        self.image_path = config.state_dir / "download.img"
        self.state = State.load(
            self.state_path,
            booted_slot=self.system.booted_slot(),
            factory_version=config.current_version,
        )
        self.server = server or ServerClient(config, running_version=self.running_version)
        self.outbox = Outbox(config.state_dir / "outbox.json")
        self.health_check = health_check or command_health_check(
            config.health_check, config.health_check_timeout
        )
        self._reboot_hook = reboot
        self.sleep = sleep
        self.rng = rng or random.Random()  # noqa: S311 (jitter, not cryptography)
        self.poll_interval = config.poll_interval
        self.log = DeviceLog(logger, {"device": config.hardware_id})
        self.link = ServerLink(config, self.server, self.outbox, self.log)
        self.offers = OfferGate(config, self.server, self.link, self.log)

    # --- Public API -----------------------------------------------------------------------------

    @property
    def phase(self) -> str:
        return self.state.phase

    def running_version(self) -> str:
        version = self.state.slots.get(self.system.booted_slot())
        return version or self.config.current_version

    def step(self) -> StepResult:
        """Take one step of the state machine (see the module docstring)."""
        handler = {
            IDLE: self._step_idle,
            DOWNLOADING: self._step_downloading,
            DOWNLOADED: self._step_downloaded,
            INSTALLING: self._step_installing,
            INSTALLED: self._step_installed,
            ARMED: self._step_armed,
            VALIDATING: self._step_validating,
            COMMITTED: self._step_committed,
            ROLLING_BACK: self._step_rolling_back,
        }[self.state.phase]
        return handler()

    def run_once(self) -> StepResult:
        """Step until the agent is idle, offline, or waiting for a real reboot."""
        self.link.new_cycle()
        for _ in range(MAX_STEPS):
            result = self.step()
            if result.outcome is not Outcome.PROGRESS:
                return result
        return StepResult(Outcome.ERROR, f"no rest after {MAX_STEPS} steps")

    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Poll with jitter; back off exponentially while the server is unreachable."""
        stop = stop or threading.Event()
        failures = 0
        while not stop.is_set():
            try:
                result = self.run_once()
            except Exception as exc:  # a bug or a broken device must not end the agent
                self.log.exception("update cycle failed")
                result = StepResult(Outcome.ERROR, f"{type(exc).__name__}: {exc}")
            if result.outcome in (Outcome.OFFLINE, Outcome.ERROR):
                failures += 1
                delay = self.backoff(failures, result.retry_after)
                self.log.info(
                    "%s: %s; next try in %.0f s", result.outcome.value, result.detail, delay
                )
            elif result.outcome is Outcome.REBOOTING:
                delay = 60.0  # the reboot ends us; if it did not, try again in a minute
            else:
                failures = 0
                delay = self.jittered(self.poll_interval)
            stop.wait(delay)

    def backoff(self, failures: int, retry_after: float | None = None) -> float:
        """Exponential backoff with jitter, at least the server's Retry-After."""
        ceiling = min(self.config.max_backoff, self.config.min_backoff * 2 ** (failures - 1))
        delay = self.rng.uniform(ceiling / 2, ceiling)
        return max(delay, retry_after or 0.0)

    def jittered(self, interval: float) -> float:
        spread = interval * self.config.poll_jitter
        return max(1.0, interval + self.rng.uniform(-spread, spread))

    # --- Steps ----------------------------------------------------------------------------------

    def _step_idle(self) -> StepResult:
        env = self.system.read_env()
        booted = self.system.booted_slot()
        if env.trial and booted == env.active:
            # No update is in progress, so nobody armed this on purpose (or its state was
            # lost): the next boot must not start a slot we know nothing about.
            self.log.warning("cancelling a stray trial of slot %s", env.trial)
            self.system.cancel_trial()
        try:
            self.server.ensure_enrolled()
            if self.server.enrolled_now and self.config.trust_on_first_use:
                self.link.trusted_keys()
            self._flush()
            self._heartbeat()
            self.link.renew_certificate_if_due()
            body = self.server.check()
        except Offline as exc:
            return StepResult(Outcome.OFFLINE, str(exc), exc.retry_after)
        except Refused as exc:
            return StepResult(Outcome.ERROR, str(exc))
        interval = body.get("poll_interval")
        if isinstance(interval, int | float) and interval > 0:
            self.poll_interval = float(interval)
        if not body.get("update_available"):
            return StepResult(Outcome.IDLE, str(body.get("reason", "")))
        session_id = str(body.get("session_id") or "")
        if not session_id:
            return StepResult(Outcome.IDLE, "an offer without a session")
        if session_id in self.state.finished_sessions:
            return StepResult(Outcome.IDLE, f"session {session_id} is finished here")
        if booted != env.active:
            return StepResult(Outcome.IDLE, f"running uncommitted slot {booted}; not installing")
        try:
            offer, tuf_target = self.offers.accept(
                body,
                installed_version=self.running_version(),
                release_counter=self.state.release_counter,
            )
        except VerificationError as exc:
            self.log.warning("refusing the update of session %s: %s", session_id, exc)
            self.outbox.add_status(session_id, "failed", error_message=f"rejected: {exc}")
            self._remember(session_id, str(body.get("version", "")), "failed", str(exc))
            self._flush_best_effort()
            return StepResult(Outcome.PROGRESS)
        except Offline as exc:  # fetching the keys on first use, or the TUF metadata
            return StepResult(Outcome.OFFLINE, str(exc), exc.retry_after)
        except Refused as exc:
            return StepResult(Outcome.ERROR, str(exc))

        self.log.info(
            "update %s -> %s offered (session %s); slot %s will be written",
            self.running_version(),
            offer.version,
            offer.session_id,
            self.system.inactive_slot(),
        )
        self._discard_download()
        self.state.offer = offer.to_dict()
        self.state.tuf_target = tuf_target
        self.state.target_slot = self.system.inactive_slot()
        self.state.from_slot = booted
        self.state.from_version = self.running_version()
        self.state.download_attempts = 1
        self.state.install_attempts = 0
        self.state.failure = None
        self.link.session_closed = None
        self._enter(DOWNLOADING)
        self.outbox.add_status(offer.session_id, "downloading", progress=0)
        self._flush_best_effort()
        return StepResult(Outcome.PROGRESS)

    def _step_downloading(self) -> StepResult:
        offer = self._offer()
        downloader = Downloader(
            self.server,
            self.part_path,
            bandwidth_limit=self.config.bandwidth_limit,
            progress_interval=self.config.progress_interval,
            deadline=self.config.download_deadline,
            on_progress=lambda done: self._download_progress(offer, done),
            on_sync=self._save_resume_point,
            sleep=self.sleep,
        )
        resume = ResumePoint(etag=self.state.resume_etag, synced=self.state.resume_synced)
        try:
            digest = downloader.download(offer.url, offer.size, resume)
            verify_image(offer, sha256=digest, size=self.part_path.stat().st_size)
            if self.state.tuf_target is not None:
                tuf_client.verify_file(self.state.tuf_target, self.part_path)
        except Offline as exc:
            return StepResult(Outcome.OFFLINE, f"download: {exc}", exc.retry_after)
        except _SessionClosed as exc:
            return self._abandon(str(exc))
        except Refused as exc:
            return self._fail(f"the download was refused: {exc}")
        except OSError as exc:  # network errors are Offline; this is the device's own storage
            return self._fail(f"cannot store the download: {exc}")
        except (VerificationError, DownloadRejected) as exc:
            self._discard_download()
            attempts = self.state.download_attempts
            if attempts >= self.config.download_attempts:
                return self._fail(f"the image failed verification {attempts} times: {exc}")
            self.log.warning("download %s of %s rejected: %s", attempts, offer.version, exc)
            self.state.download_attempts = attempts + 1
            self._save()
            return StepResult(Outcome.PROGRESS)
        os.replace(self.part_path, self.image_path)
        fsync_dir(self.image_path.parent)
        self.log.info("downloaded and verified %s (%s bytes)", offer.version, offer.size)
        self._enter(DOWNLOADED)
        return StepResult(Outcome.PROGRESS)

    def _step_downloaded(self) -> StepResult:
        offer = self._offer()
        self._flush_best_effort()
        if self.link.session_closed:
            return self._abandon(self.link.session_closed)
        problem = self._target_problem()
        if problem:
            return self._fail(problem)
        self.outbox.add_status(offer.session_id, "installing", progress=0)
        self.state.slots[self._target()] = None  # its old content is about to go
        self._enter(INSTALLING)
        self._flush_best_effort()
        return StepResult(Outcome.PROGRESS)

    def _step_installing(self) -> StepResult:
        offer = self._offer()
        target = self._target()
        problem = self._target_problem()
        if problem:
            return self._fail(problem)
        if not self.image_path.exists():
            self.log.warning("download.img is gone; downloading again")
            self._enter(DOWNLOADING)
            return StepResult(Outcome.PROGRESS)
        self.state.install_attempts += 1
        self._save()
        self.log.info("writing %s into slot %s", offer.version, target)
        try:
            written = self.system.write_slot(
                target, self.image_path, lambda _n: faults.checkpoint("mid-slot-write")
            )
            readback = self.system.slot_sha256(target, offer.size)
        except OSError as exc:
            return self._fail(f"writing slot {target} failed: {exc}")
        if written != offer.sha256:
            # download.img changed on disk since it was verified: fetch it again, within the
            # same bound as a corrupt download (storage that keeps corrupting must not loop).
            self._discard_download()
            if self.state.download_attempts >= self.config.download_attempts:
                return self._fail("download.img keeps changing on disk after its verification")
            self.log.warning("download.img no longer matches its sha256; downloading again")
            self.state.download_attempts += 1
            self._enter(DOWNLOADING)
            return StepResult(Outcome.PROGRESS)
        if readback != offer.sha256:
            if self.state.install_attempts >= INSTALL_ATTEMPTS:
                return self._fail(f"slot {target} does not read back the image that was written")
            return StepResult(Outcome.PROGRESS)  # write it again
        self.state.slots[target] = offer.version
        self._enter(INSTALLED)
        faults.checkpoint("after-slot-write")
        return StepResult(Outcome.PROGRESS)

    def _step_installed(self) -> StepResult:
        offer = self._offer()
        target = self._target()
        if self.system.booted_slot() == target:
            # The trial was armed just before a cut and the bootloader already started it.
            self._enter(VALIDATING)
            return StepResult(Outcome.PROGRESS)
        if self.system.slot_sha256(target, offer.size) != offer.sha256:
            self.log.warning("slot %s changed after it was written; writing it again", target)
            if self.state.install_attempts >= INSTALL_ATTEMPTS:
                return self._fail(f"slot {target} does not keep the image that was written")
            self._enter(INSTALLING)
            return StepResult(Outcome.PROGRESS)
        self.system.arm_trial(target, self.config.trial_boots)
        self._enter(ARMED)
        self.outbox.add_status(offer.session_id, "validating")
        self._flush_best_effort()
        faults.checkpoint("after-arm")
        return StepResult(Outcome.PROGRESS)

    def _step_armed(self) -> StepResult:
        target = self._target()
        env = self.system.read_env()
        if self.system.booted_slot() == target:
            self._enter(VALIDATING)
            return StepResult(Outcome.PROGRESS)
        if env.trial == target and env.trial_left > 0:
            return self._reboot(f"rebooting into slot {target} for a trial")
        return self._bootloader_gave_up()

    def _step_validating(self) -> StepResult:
        offer = self._offer()
        target = self._target()
        if self.system.booted_slot() != target:
            return self._bootloader_gave_up()
        faults.checkpoint("before-validation")
        if self.system.read_env().active != target:
            result = self.health_check()
            if not result.healthy:
                reason = (
                    f"health check failed on {offer.version} in slot {target}: {result.reason}; "
                    f"returning to slot {self.state.from_slot}"
                )
                self.log.warning("%s", reason)
                # Saved before the trial is cancelled: a cut in between finds rolling_back,
                # which cancels the trial (again) and keeps this reason.
                self.state.failure = reason
                self._enter(ROLLING_BACK)
                self.system.cancel_trial()
                self._queue_failed_validation(reason)
                return StepResult(Outcome.PROGRESS)
            self.system.commit(target)
            self.log.info("slot %s with %s is healthy and committed", target, offer.version)
        self._enter(COMMITTED)
        return StepResult(Outcome.PROGRESS)

    def _step_committed(self) -> StepResult:
        offer = self._offer()
        self.outbox.add_validation(offer.session_id, success=True, version=self.running_version())
        # Only a committed image raises the counter (saved with the outcome by _finish): an
        # update that failed its trial leaves the device able to return to what it ran.
        self.state.release_counter = max(self.state.release_counter, offer.release_counter)
        self._finish("success", "")
        return StepResult(Outcome.PROGRESS)

    def _step_rolling_back(self) -> StepResult:
        target = self._target()
        reason = self.state.failure or "the update was abandoned"
        self._queue_failed_validation(reason)  # again, in case a cut came before it was queued
        if self.system.booted_slot() == target:
            if self.system.read_env().trial:
                self.system.cancel_trial()
            return self._reboot(f"rebooting back to slot {self.state.from_slot}")
        self._finish("failed", reason)
        return StepResult(Outcome.PROGRESS)

    # --- Transitions and helpers ---------------------------------------------------------------

    def _bootloader_gave_up(self) -> StepResult:
        booted = self.system.booted_slot()
        reason = f"trial boot failed; device returned to slot {booted}"
        if self.state.offer:
            reason += f" ({self.running_version()}, not {self._offer().version})"
        self.log.warning("%s", reason)
        self.state.failure = reason
        self._queue_failed_validation(reason)
        self._finish("failed", reason)
        return StepResult(Outcome.PROGRESS)

    def _queue_failed_validation(self, reason: str) -> None:
        # The version the device runs after going back: the one it ran before the update.
        version = self.state.from_version or self.running_version()
        self.outbox.add_validation(
            self._offer().session_id, success=False, version=version, error_message=reason
        )
        self._flush_best_effort()

    def _fail(self, reason: str) -> StepResult:
        """Give up before the new slot was ever booted: report the session failed."""
        offer = self._offer()
        self.log.warning("update to %s failed: %s", offer.version, reason)
        env = self.system.read_env()
        if env.trial and env.trial == self.state.target_slot:
            self.system.cancel_trial()
        self.outbox.add_status(offer.session_id, "failed", error_message=reason)
        self._finish("failed", reason)
        return StepResult(Outcome.PROGRESS)

    def _abandon(self, reason: str) -> StepResult:
        """The server closed the session before we installed anything: stop quietly."""
        self.log.info("abandoning the update: %s", reason)
        self._finish("cancelled", reason)
        return StepResult(Outcome.PROGRESS)

    def _finish(self, outcome: str, reason: str) -> None:
        offer = self._offer()
        self._remember(offer.session_id, offer.version, outcome, reason)
        self._discard_download()
        self.state.phase = IDLE
        self.state.offer = None
        self.state.target_slot = None
        self.state.from_slot = None
        self.state.from_version = None
        self.state.failure = None
        self.state.tuf_target = None
        self.state.download_attempts = 0
        self.state.install_attempts = 0
        self._save()
        self._flush_best_effort()

    def _remember(self, session_id: str, version: str, outcome: str, reason: str) -> None:
        self.state.remember_finished(session_id)
        self.state.last_result = {
            "session_id": session_id,
            "version": version,
            "outcome": outcome,
            "reason": reason,
            "finished_at": time.time(),
        }
        self._save()

    def _reboot(self, why: str) -> StepResult:
        self.log.info("%s", why)
        if self._reboot_hook is not None:
            returned = self._reboot_hook()
        else:
            self.system.reboot()
            returned = self.system.reboot_returns
        if not returned:
            return StepResult(Outcome.REBOOTING, why)
        # A simulated device is now the freshly booted system: a new process would know
        # nothing of this one's connection troubles.
        self.link.unreachable = False
        self.link.heartbeat_done = False
        return StepResult(Outcome.PROGRESS)

    def _target_problem(self) -> str | None:
        """Why the target slot must not be written now, if it must not."""
        target = self._target()
        env = self.system.read_env()
        if target == self.system.booted_slot():
            return f"slot {target} is the running slot"
        if target == env.active:
            return f"slot {target} is the committed slot"
        if env.trial == target:
            # Never leave a trial pointing at a slot while it is rewritten.
            self.system.cancel_trial()
        return None

    def _offer(self) -> Offer:
        if self.state.offer is None:
            raise RuntimeError(f"phase {self.state.phase} without an offer in {self.state_path}")
        return Offer.from_dict(self.state.offer)

    def _target(self) -> str:
        if self.state.target_slot is None:
            raise RuntimeError(f"phase {self.state.phase} without a target slot")
        return self.state.target_slot

    def _enter(self, phase: str) -> None:
        self.state.phase = phase
        self._save()

    def _save(self) -> None:
        self.state.save(self.state_path)

    def _save_resume_point(self, point: ResumePoint) -> None:
        if (point.etag, point.synced) != (self.state.resume_etag, self.state.resume_synced):
            self.state.resume_etag = point.etag
            self.state.resume_synced = point.synced
            self._save()

    def _discard_download(self) -> None:
        self.part_path.unlink(missing_ok=True)
        self.image_path.unlink(missing_ok=True)
        self.state.resume_etag = None
        self.state.resume_synced = 0

    def _download_progress(self, offer: Offer, done: int) -> None:
        self.outbox.add_status(offer.session_id, "downloading", progress=done * 100 // offer.size)
        self._flush_best_effort()
        if self.link.session_closed:
            raise _SessionClosed(self.link.session_closed)

    def _heartbeat(self) -> None:
        version = self.running_version()
        sent = self.link.heartbeat(version, self.system.booted_slot(), self.state.reported_version)
        if sent and self.state.reported_version != version:
            self.state.reported_version = version
            self._save()

    def _flush(self) -> None:
        """Send the queued reports; raises Offline when the server cannot take them now."""
        self.link.flush(*self._report_context())

    def _flush_best_effort(self) -> None:
        self.link.flush_best_effort(*self._report_context())

    def _report_context(self) -> tuple[str | None, bool]:
        current = self.state.offer.get("session_id") if self.state.offer else None
        return current, self.state.phase in (DOWNLOADING, DOWNLOADED)
