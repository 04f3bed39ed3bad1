"""One device's session lifecycle (DESIGN §4), run on the device's own thread.

Idle, the device only runs the voice-activity detector and keeps a pre-roll. Speech opens a
session that starts with the pre-roll; audio goes out paced, never faster than real time plus
a small burst. A timer, checked on every wake-up (at least four times a second), terminates the
session once neither the detector nor the transcripts have shown speech for the inactivity
timeout. A connection that fails is reopened with backoff and the audio since the last final
turn is sent again, so no word is lost and none is published twice.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from capture.contract import FRAME_BYTES, AudioFrame, EndOfStream, MalformedEntry
from transcriber.aai.client import StreamingSession
from transcriber.aai.errors import ErrorKind, StreamingError
from transcriber.aai.events import Begin, Event, ServerError, SpeechStarted, Termination, Turn
from transcriber.aai.turns import FinalTurnFilter
from transcriber.audio import HeldFrame, PreRoll, Timeline, Unconfirmed
from transcriber.budget import SessionBudget
from transcriber.config import LifecycleSettings
from transcriber.connection import Connection, ConnectionMessage, Opened, Received
from transcriber.device_io import DeviceIO
from transcriber.device_state import Frames, OpenSession, State, Stop
from transcriber.records import EndReason
from transcriber.retry import RetryPolicy
from transcriber.vad import VoiceActivity

log = logging.getLogger(__name__)

TICK_S = 0.1  # the inactivity timer runs at least this often (DESIGN §4: >= 4 per second)
MAX_MESSAGE_MS = 1000  # AssemblyAI accepts 50..1000 ms of audio per message


class DeviceWorker:
    def __init__(
        self,
        device: str,
        settings: LifecycleSettings,
        *,
        open_session: Callable[[], StreamingSession],
        vad: VoiceActivity,
        vad_window_ms: int,
        budget: SessionBudget | None,
        io: DeviceIO,
        clock: Callable[[], float],
        format_turns: bool,
    ) -> None:
        self.device = device
        self._settings = settings
        self._open_session = open_session
        self._vad = vad
        self._budget = budget
        self._io = io
        self._clock = clock
        self._format_turns = format_turns
        self._inbox: queue.SimpleQueue[Frames | Stop | ConnectionMessage] = queue.SimpleQueue()
        self._preroll = PreRoll(settings.preroll_ms + vad_window_ms + 50)
        self._unconfirmed = Unconfirmed(int(settings.max_unconfirmed_s * 1000))
        self._state = State.IDLE
        self._session: OpenSession | None = None
        self._generation = 0
        self._retry_at = 0.0
        self._retry = RetryPolicy(settings, device)
        self._last_activity = clock()
        self._last_heard = self._last_activity
        self._last_transcript = self._last_activity
        self._noise_hold = False  # ended for noise: no reopen until the detector hears a pause
        self._last_run: str | None = None
        self._last_seq = -1
        self._eos_pending = False
        self._stopping: EndReason | None = None
        self._finished = threading.Event()
        self._thread = threading.Thread(name=f"device-{device}", target=self._run, daemon=True)
        io.set_state(self._state.value)

    # --- called from other threads -------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def post(self, message: Frames | Stop | ConnectionMessage) -> None:
        self._inbox.put(message)

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    @property
    def idle(self) -> bool:
        """No session and nothing waiting for one: the device can move to another worker."""
        return self._state is State.IDLE

    def join(self, timeout: float) -> bool:
        return self._finished.wait(timeout)

    # --- the device thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._done():
                try:
                    message: Frames | Stop | ConnectionMessage | None = self._inbox.get(
                        timeout=TICK_S)
                except queue.Empty:
                    message = None
                while message is not None:
                    self._handle_guarded(message)
                    try:
                        message = self._inbox.get_nowait()
                    except queue.Empty:
                        message = None
                self._tick_guarded()
            self._io.flush_until(self._clock() + 2.0)
        finally:
            self._io.set_state(None)
            self._finished.set()

    def _done(self) -> bool:
        return self._stopping is not None and self._state in (State.IDLE, State.WAITING)

    def _handle_guarded(self, message: Frames | Stop | ConnectionMessage) -> None:
        try:
            self._handle(message)
        except Exception:  # one device's bug must not end the others or this device's thread
            log.exception("device %s: unexpected error handling %s", self.device,
                          type(message).__name__)

    def _tick_guarded(self) -> None:
        try:
            self._tick()
        except Exception:
            log.exception("device %s: unexpected error in the session timer", self.device)

    def _handle(self, message: Frames | Stop | ConnectionMessage) -> None:
        if isinstance(message, Frames):
            self._on_frames(message)
        elif isinstance(message, Stop):
            self._on_stop(message.reason)
        elif self._session is None or message.generation != self._session.connection.generation:
            return  # a connection already given up on
        elif isinstance(message, Opened):
            self._on_opened(message.begin)
        elif isinstance(message, Received):
            self._on_event(message.event)
        else:
            self._on_closed(message.error)

    # --- audio in --------------------------------------------------------------------------

    def _on_frames(self, batch: Frames) -> None:
        now = self._clock()
        for entry_id, item in batch.items:
            if isinstance(item, MalformedEntry):
                self._io.skipped(entry_id, item.kind)
                continue
            if isinstance(item, EndOfStream):
                self._eos_pending = True
                self._io.ack([entry_id])
                continue
            if not self._accept(entry_id, item):
                continue
            result = self._vad.process(item.pcm)
            if result.offset:
                self._noise_hold = False
            speech_ms = result.speech_ms if result.speaking else 0
            if speech_ms:
                self._io.speech(speech_ms / 1000)
                # Heard now, in real time: pacing lag must not extend (and bill) the session.
                self._last_heard = self._last_activity = now
            held = HeldFrame(entry_id, item, speech_ms)
            if self._state is State.IDLE:
                # Speech that goes on after a session ended under it (frames stopped coming
                # mid-utterance, then resumed) has no new onset: it must open a session too.
                resumed = result.speaking and speech_ms > 0 and not self._noise_hold
                if (result.onset or resumed) and self._stopping is None:
                    self._start_from_onset(held, result.onset_offset_ms)
                else:
                    self._io.ack([h.entry_id for h in self._preroll.push(held)])
            else:
                self._hold([held])

    def _accept(self, entry_id: bytes, frame: AudioFrame) -> bool:
        """Dedupe, count gaps and skip what cannot be used; False when the frame is skipped."""
        if len(frame.pcm) != FRAME_BYTES:
            self._io.skipped(entry_id, "bad_size")
            return False
        if frame.run == self._last_run:
            if frame.seq <= self._last_seq:
                self._io.skipped(entry_id, "duplicate")
                return False
            if frame.seq > self._last_seq + 1:
                self._io.missing(frame.seq - self._last_seq - 1)
        else:
            self._eos_pending = False
        self._last_run, self._last_seq = frame.run, frame.seq
        self._io.frame(frame.ts_us)
        if self._state is State.IDLE and self._io.age_s(frame.ts_us) > self._settings.stale_after_s:
            self._io.skipped(entry_id, "stale")
            return False
        return True

    def _start_from_onset(self, held: HeldFrame, onset_offset_ms: int) -> None:
        frames = [*self._preroll.drain(), held]
        keep_ms = onset_offset_ms + self._settings.preroll_ms
        total = sum(h.duration_ms for h in frames)
        while len(frames) > 1 and total - frames[0].duration_ms >= keep_ms:
            total -= frames[0].duration_ms
            self._io.ack([frames.pop(0).entry_id])
        self._hold(frames)
        self._set_state(State.WAITING)
        self._retry_at = self._clock()

    def _hold(self, frames: list[HeldFrame]) -> None:
        overflow = self._unconfirmed.extend(frames)
        for lost in overflow:
            self._io.skipped(lost.entry_id, "resend_overflow")

    # --- the timer -------------------------------------------------------------------------

    def _tick(self) -> None:
        now = self._clock()
        state = self._state
        if state is State.WAITING and now >= self._retry_at and self._stopping is None:
            self._connect(now)
        elif state is State.OPEN:
            self._send_due(now)
            self._check_open_session(now)
        elif (state is State.TERMINATING and self._session is not None
              and now >= self._session.terminate_deadline):
            log.warning("device %s: no Termination within %.1f s; closing", self.device,
                        self._settings.terminate_timeout_s)
            self._finish_session(self._session.end_reason or EndReason.ERROR, clean=False)
        self._io.silence(now - max(self._last_activity, self._last_heard))
        self._io.flush_if_due(now)

    def _check_open_session(self, now: float) -> None:
        session = self._session
        assert session is not None
        if self._stopping is not None:
            self._terminate(self._stopping, now)
        elif self._eos_pending and not self._unconfirmed.has_unsent():
            self._terminate(EndReason.END_OF_STREAM, now)
        elif (now - self._last_activity >= self._settings.inactivity_timeout_s
              and not self._unconfirmed.unsent_speech()):
            self._terminate(EndReason.INACTIVITY, now)
        elif (now - max(self._last_transcript, session.opened_at)
              >= self._settings.no_transcript_timeout_s and not self._unconfirmed.unsent_speech()):
            log.warning("device %s: no transcript for %.0f s although the detector hears speech "
                        "(noise?); ending the session", self.device,
                        self._settings.no_transcript_timeout_s)
            self._noise_hold = True
            self._terminate(EndReason.INACTIVITY, now)
        elif self._rotation_due(session, now):
            self._terminate(EndReason.MAX_DURATION, now)

    def _rotation_due(self, session: OpenSession, now: float) -> bool:
        """Near the 3 h limit: at a pause after rotate_after_s, or regardless just before expiry."""
        long_open = now - session.opened_at >= self._settings.rotate_after_s
        at_pause = long_open and not self._vad.speaking
        expiring = (session.expires_at is not None and self._io.wall()
                    >= session.expires_at - self._settings.rotate_hard_margin_s)
        return at_pause or expiring

    # --- session control -------------------------------------------------------------------

    def _connect(self, now: float) -> None:
        if self._budget is not None and not self._io.budget_allows(self._budget, self.device):
            self._retry_at = now + max(0.25, self._io.budget_retry_after(self._budget))
            return
        self._generation += 1
        connection = Connection(self._generation, self._open_session(), self.post,
                                self._settings.connect_timeout_s, f"aai-{self.device}")
        self._session = OpenSession(connection, Timeline(), FinalTurnFilter(self._format_turns))
        self._unconfirmed.rewind()
        self._set_state(State.CONNECTING)
        connection.start()

    def _on_opened(self, begin: Begin) -> None:
        session = self._session
        assert session is not None
        now = self._clock()
        session.session_id = begin.id
        session.opened_at = now
        session.opened_wall_us = int(self._io.wall() * 1_000_000)
        session.expires_at = float(begin.expires_at) if begin.expires_at else None
        self._last_activity = now
        self._set_state(State.OPEN)
        self._io.session_started()
        log.info("device %s: session %s open", self.device, begin.id)
        self._send_due(now)

    def _send_due(self, now: float) -> None:
        session = self._session
        assert session is not None
        # Never ahead of real time since Begin by more than the burst (AssemblyAI closes 3007).
        elapsed_ms = int((now - session.opened_at) * 1000)
        allowed = elapsed_ms + self._retry.burst_ms - session.audio_sent_ms
        while allowed >= 50 and self._unconfirmed.has_unsent():
            batch = self._unconfirmed.take_unsent(min(MAX_MESSAGE_MS, allowed))
            try:
                session.connection.session.send_audio(b"".join(h.frame.pcm for h in batch))
            except (StreamingError, OSError) as exc:
                log.warning("device %s: sending audio failed: %s", self.device, exc)
                self._finish_session(EndReason.ERROR, clean=False, error=_send_failure(exc))
                return
            for held in batch:
                held.sent_at_ms = session.timeline.append(held.frame.ts_us, held.duration_ms)
                session.audio_sent_ms += held.duration_ms
                allowed -= held.duration_ms

    def _terminate(self, reason: EndReason, now: float) -> None:
        session = self._session
        assert session is not None
        session.end_reason = reason
        session.terminate_deadline = now + self._settings.terminate_timeout_s
        self._set_state(State.TERMINATING)
        log.info("device %s: terminating session %s (%s)", self.device, session.session_id,
                 reason.value)
        try:
            session.connection.session.send_terminate()
        except (StreamingError, OSError) as exc:
            log.warning("device %s: sending Terminate failed: %s", self.device, exc)
            self._finish_session(reason, clean=False, error=_send_failure(exc))

    def _on_event(self, event: Event) -> None:
        session = self._session
        assert session is not None
        if isinstance(event, Turn):
            if event.transcript.strip() or event.words:
                self._transcript_heard(session, event)
            if not event.end_of_turn and self._settings.publish_partials:
                self._io.publish_turn(self.device, session, event, final=False, confirms=[])
            for final in session.finals.feed_all(event):
                self._publish_final(final)
        elif isinstance(event, SpeechStarted):
            self._last_activity = self._clock()
        elif isinstance(event, Termination):
            session.termination = event
        elif isinstance(event, ServerError):
            session.close_code = event.code
            log.warning("device %s: server error %s: %s", self.device, event.code, event.message)

    def _transcript_heard(self, session: OpenSession, turn: Turn) -> None:
        """Words are speech at the time they were spoken, not when their transcript arrived:
        the service's latency must not extend (and bill) the session (reference §6, point 3).
        """
        now = self._clock()
        heard_at = now
        if turn.words:
            end_us = session.timeline.capture_ts(turn.words[-1].end_ms)
            if end_us is not None:
                heard_at = now - min(max(0.0, self._io.age_s(end_us)), now - session.opened_at)
        self._last_transcript = max(self._last_transcript, heard_at)
        self._last_activity = max(self._last_activity, heard_at)

    def _publish_final(self, turn: Turn) -> None:
        session = self._session
        assert session is not None
        confirms = []
        if turn.words:
            confirms = self._unconfirmed.confirm_until(turn.words[-1].end_ms)
        if turn.transcript.strip():
            self._io.publish_turn(self.device, session, turn, final=True,
                                  confirms=[h.entry_id for h in confirms])
            self._retry.succeeded()
        else:
            self._io.ack([h.entry_id for h in confirms])

    def _on_closed(self, error: StreamingError | None) -> None:
        session = self._session
        assert session is not None
        if self._state is State.CONNECTING:
            self._session = None
            self._failed(error or StreamingError(ErrorKind.CLOSED, None, "closed before Begin"))
            return
        if error is not None and error.code is not None:
            session.close_code = error.code
        if self._state is State.TERMINATING:
            reason = session.end_reason or EndReason.ERROR
            self._finish_session(reason, clean=session.termination is not None)
            return
        kind = error.kind if error is not None else ErrorKind.CLOSED
        reason = {ErrorKind.EXPIRED: EndReason.MAX_DURATION,
                  ErrorKind.CLOSED: EndReason.SERVER_CLOSED}.get(kind, EndReason.ERROR)
        self._finish_session(reason, clean=False, error=error)

    def _finish_session(self, reason: EndReason, *, clean: bool,
                        error: StreamingError | None = None) -> None:
        session = self._session
        assert session is not None
        held = session.finals.flush()
        if held is not None:
            self._publish_final(held)
        session.connection.close()
        self._io.session_ended(self.device, session, reason)
        self._session = None
        if clean:
            self._io.ack([h.entry_id for h in self._unconfirmed.confirm_sent()])
            self._retry.succeeded()
        if error is not None:
            self._failed(error)
        elif not self._noise_hold and (self._unconfirmed.unsent_speech()
                                       or (not clean and self._unconfirmed.any_speech())):
            self._set_state(State.WAITING)
            self._retry_at = self._clock()
        else:
            self._go_idle()

    def _failed(self, error: StreamingError) -> None:
        """A connection failed: count it, and come back for the audio if it holds speech."""
        self._io.error(error)
        delay = self._retry.delay_after(error)
        if self._unconfirmed.any_speech() or self._vad.speaking:
            self._set_state(State.WAITING)
            self._retry_at = self._clock() + delay
        else:
            self._go_idle()

    def _go_idle(self) -> None:
        for held in self._unconfirmed.drain():
            if held.sent_at_ms is None and not held.speech_ms:
                self._io.ack([h.entry_id for h in self._preroll.push(held)])
            else:
                self._io.ack([held.entry_id])
        self._set_state(State.IDLE)

    def _on_stop(self, reason: EndReason) -> None:
        self._stopping = reason
        if self._state is State.CONNECTING and self._session is not None:
            self._session.connection.close()
            self._session = None
            self._set_state(State.WAITING)  # unsent audio stays unacknowledged for the next owner
        elif self._state is State.OPEN:
            self._terminate(reason, self._clock())

    def _set_state(self, state: State) -> None:
        self._state = state
        self._io.set_state(state.value)


def _send_failure(exc: BaseException) -> StreamingError:
    if isinstance(exc, StreamingError):
        return exc
    return StreamingError(ErrorKind.NETWORK, None, f"send failed: {type(exc).__name__}")
