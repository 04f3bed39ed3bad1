"""A device's window on the world: records out, acknowledgements, metrics, clocks, the budget.

Keeping these here leaves ``device.py`` a pure state machine over events and time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from capture.common.logs import OncePerKind
from capture.common.redisconn import REDIS_ERRORS
from transcriber.aai.errors import ErrorKind, StreamingError
from transcriber.aai.events import Turn
from transcriber.budget import SessionBudget
from transcriber.metrics import TranscriberMetrics
from transcriber.publisher import Publisher
from transcriber.records import EndReason, SessionRecord, TurnRecord, WordRecord

if TYPE_CHECKING:
    from transcriber.device_state import OpenSession

log = logging.getLogger(__name__)

STATES = ("idle", "waiting", "connecting", "open", "terminating")


class DeviceIO:
    def __init__(self, device: str, publisher: Publisher, metrics: TranscriberMetrics, *,
                 clock: Callable[[], float], wall: Callable[[], float] = time.time,
                 problems: OncePerKind | None = None) -> None:
        self._device = device
        self._publisher = publisher
        self._metrics = metrics
        self._clock = clock
        self._wall = wall
        self._problems = problems or OncePerKind(log)
        self._state: str | None = None
        self._zero_series()

    def _zero_series(self) -> None:
        """Create the device's series at 0, so increase() sees its first event."""
        m, device = self._metrics, self._device
        for counter in (m.sessions_started, m.billed_seconds, m.speech_seconds, m.frames,
                        m.frames_gap, m.budget_denied):
            counter.labels(device)
        for reason in EndReason:
            m.sessions_ended.labels(device, reason.value)
        for final in ("0", "1"):
            m.turns.labels(device, final)
        m.session_open.labels(device).set(0)
        m.session_duration.labels(device)

    def wall(self) -> float:
        return self._wall()

    def age_s(self, ts_us: int) -> float:
        return self._wall() - ts_us / 1_000_000

    # --- stream bookkeeping ----------------------------------------------------------------

    def ack(self, entry_ids: Sequence[bytes]) -> None:
        self._publisher.ack(entry_ids)

    def skipped(self, entry_id: bytes, reason: str) -> None:
        self._publisher.ack([entry_id])
        self._metrics.frames_skipped.labels(self._device, reason).inc()
        self._problems.warning(reason, "device %s: skipping a frame (%s)", self._device, reason)

    def missing(self, count: int) -> None:
        self._metrics.frames_gap.labels(self._device).inc(count)

    def frame(self, ts_us: int) -> None:
        self._metrics.frames.labels(self._device).inc()
        self._metrics.stream_lag.labels(self._device).set(max(0.0, self.age_s(ts_us)))

    def speech(self, seconds: float) -> None:
        self._metrics.speech_seconds.labels(self._device).inc(seconds)

    def silence(self, seconds: float) -> None:
        self._metrics.silence_seconds.labels(self._device).set(seconds)

    def flush_if_due(self, now: float) -> None:
        if self._publisher.due(now):
            self._publisher.flush()

    def flush_until(self, deadline: float) -> bool:
        """Publish what is waiting, retrying until ``deadline`` (used once, at the end)."""
        waiter = threading.Event()
        while not self._publisher.flush():
            if self._clock() >= deadline:
                log.error("device %s: %d records could not be published before shutdown",
                          self._device, self._publisher.backlog)
                return False
            waiter.wait(0.2)
        return True

    # --- the new-session budget ------------------------------------------------------------

    def budget_allows(self, budget: SessionBudget, device: str) -> bool:
        try:
            allowed = budget.try_acquire(device)
        except REDIS_ERRORS as exc:
            # Without Redis no audio flows either; a session already wanted may go ahead.
            self._problems.warning("budget_unavailable", "device %s: session budget unavailable "
                                   "(%s); opening anyway", device, type(exc).__name__)
            return True
        if not allowed:
            self._metrics.budget_denied.labels(device).inc()
            self._problems.warning("budget", "device %s: new-session budget used up; waiting",
                                   device)
        return allowed

    def budget_retry_after(self, budget: SessionBudget) -> float:
        try:
            return budget.retry_after()
        except REDIS_ERRORS:
            return 1.0

    # --- sessions and turns ----------------------------------------------------------------

    def session_started(self) -> None:
        self._metrics.sessions_started.labels(self._device).inc()
        self._metrics.session_open.labels(self._device).set(1)

    def session_ended(self, device: str, session: OpenSession, reason: EndReason) -> None:
        open_s = max(0.0, self._clock() - session.opened_at)
        billed = open_s
        termination = session.termination
        if termination is not None and termination.session_duration_seconds is not None:
            billed = float(termination.session_duration_seconds)
        closed_us = int(self._wall() * 1_000_000)
        self._publisher.session(SessionRecord(
            device=device, session=session.session_id, opened=session.opened_wall_us,
            closed=closed_us, reason=reason, billed_s=billed,
            audio_s=session.audio_sent_ms / 1000, close_code=session.close_code,
        ))
        m = self._metrics
        m.sessions_ended.labels(device, reason.value).inc()
        m.session_open.labels(device).set(0)
        m.session_duration.labels(device).observe(open_s)
        m.billed_seconds.labels(device).inc(billed)
        log.info("device %s: session %s ended (%s) after %.1f s, %.1f s audio, billed %.1f s",
                 device, session.session_id, reason.value, open_s,
                 session.audio_sent_ms / 1000, billed)

    def publish_turn(self, device: str, session: OpenSession, turn: Turn, *, final: bool,
                     confirms: Sequence[bytes]) -> None:
        timeline = session.timeline
        words = tuple(WordRecord(w.text, w.start_ms, w.end_ms, w.confidence) for w in turn.words)
        if words:
            start_ts = timeline.capture_ts(words[0].start)
            end_ts = timeline.capture_ts(words[-1].end)
        else:
            start_ts = end_ts = timeline.capture_ts(timeline.duration_ms)
        record = TurnRecord(
            device=device, session=session.session_id, turn=turn.turn_order, final=final,
            text=turn.transcript, words=words, start_ts=start_ts or 0, end_ts=end_ts or 0,
            eot_confidence=turn.end_of_turn_confidence,
        )
        self._publisher.turn(record, confirms)
        self._metrics.turns.labels(device, "1" if final else "0").inc()

    def error(self, error: StreamingError) -> None:
        code = str(error.code) if error.code is not None else error.kind.name.lower()
        self._metrics.errors.labels(self._device, code).inc()
        if error.kind is ErrorKind.AUTH:
            self._metrics.auth_failures.inc()

    def set_state(self, state: str | None) -> None:
        """The device's lifecycle state for the dashboard; None when the device is let go."""
        if state == self._state:
            return
        self._state = state
        for name in STATES:
            self._metrics.device_state.labels(self._device, name).set(1 if name == state else 0)
        self._metrics.device_owned.labels(self._device).set(0 if state is None else 1)
