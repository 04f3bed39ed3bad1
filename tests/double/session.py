"""One accepted connection of the double: Begin, audio checks, turns, control messages, faults.

Runs on the server's event loop. Decoding runs in the server's thread pool; an emitter task
sends the results in plan order, so messages keep the order the audio implies.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from tests.double import protocol
from tests.double.config import UNIVERSAL, DoubleConfig
from tests.double.protocol import ProtocolViolation, SessionParams
from tests.double.recognizer import DigitRecogniser, RecognisedWord
from tests.double.records import LiveRecord
from tests.double.turns import Final, Onset, Partial, Plan, TrackerSettings, TurnTracker

RECOGNISER_RATE = 16000


class Core(Protocol):
    """What a session needs from the server (records under a lock, shared resources)."""

    @property
    def config(self) -> DoubleConfig: ...
    @property
    def executor(self) -> Executor: ...
    @property
    def recogniser(self) -> DigitRecogniser: ...

    def update(self, record: LiveRecord, change: Callable[[LiveRecord], None]) -> None: ...
    def ignore_terminate(self) -> bool: ...


@dataclass
class _Turn:
    """Emitter state of the open turn."""

    order: int
    sent_any: bool = False
    finalized: tuple[RecognisedWord, ...] = ()


class DoubleSession:
    def __init__(self, ws: ServerConnection, core: Core, record: LiveRecord,
                 params: SessionParams, behaviour: str) -> None:
        self.ws = ws
        self.core = core
        self.record = record
        self.params = params
        self.universal = behaviour == UNIVERSAL
        config = core.config
        self.tracker = TurnTracker(TrackerSettings(
            rate=params.sample_rate, universal=self.universal,
            threshold_rms=config.speech_threshold_rms,
            partial_silence_ms=params.min_turn_silence_ms or config.partial_silence_ms,
            end_of_turn_silence_ms=params.max_turn_silence_ms or config.end_of_turn_silence_ms,
            early_partial_ms=config.early_partial_ms,
            interval_ms=config.universal_partial_interval_ms,
            min_speech_ms=config.min_speech_ms, padding_ms=config.turn_padding_ms,
        ))
        self.format_turns = params.format_turns
        self.samples = 0
        self.audio = bytearray()      # int16 audio from sample ``audio_base`` on, for decoding
        self.audio_base = 0
        self.begin_at = 0.0
        self.last_activity = 0.0
        self.queue: asyncio.Queue[Callable[[], Awaitable[None]]] = asyncio.Queue()
        self.turn = _Turn(order=0)
        self.finished = False
        self.terminating = False
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self, session_id: str) -> None:
        config = self.core.config
        loop = asyncio.get_running_loop()
        self.begin_at = self.last_activity = time.monotonic()
        expires_in = config.max_session_s
        await self.send(protocol.begin(session_id, int(time.time() + expires_in)))
        self.core.update(self.record, lambda r: setattr(r, "begin_at", self.begin_at))
        self._tasks.append(loop.create_task(self._emit()))
        self._tasks.append(loop.create_task(self._later(expires_in, self.expire)))
        if config.error_after_s is not None:
            self._tasks.append(loop.create_task(self._later(config.error_after_s, self.cancel)))
        if config.drop_after_s is not None:
            self._tasks.append(loop.create_task(self._later(config.drop_after_s, self.drop)))
        if self.params.inactivity_timeout_s is not None:
            self._tasks.append(loop.create_task(self._watch_inactivity()))
        try:
            # Keep reading after the end too: the client's close reply sits behind its audio.
            async for message in self.ws:
                if self.finished:
                    continue
                self.last_activity = time.monotonic()
                try:
                    if isinstance(message, bytes):
                        self._on_audio(message)
                    else:
                        await self._on_text(message)
                except ProtocolViolation as violation:
                    await self.fail(violation.code, violation.message)
        except ConnectionClosed:
            pass
        finally:
            for task in self._tasks:
                task.cancel()
            self._record_close()

    async def _later(self, delay: float, action: Callable[[], Awaitable[None]]) -> None:
        await asyncio.sleep(delay)
        await action()

    async def _watch_inactivity(self) -> None:
        limit = float(self.params.inactivity_timeout_s or 0)
        while not self.finished:
            idle = time.monotonic() - self.last_activity
            if idle >= limit:
                # Undocumented what the service sends here; this double ends the session cleanly.
                await self._end_with_termination()
                return
            await asyncio.sleep(min(limit - idle, 0.25) + 0.01)

    def _record_close(self) -> None:
        code = self.ws.close_code          # 1006 when TCP went away without a close frame
        reason = self.ws.close_reason or ""

        def change(r: LiveRecord) -> None:
            if r.closed_by is None:
                r.closed_by, r.close_code, r.close_reason = "client", code, reason
            r.closed_at = time.monotonic()
        self.core.update(self.record, change)

    # -- client messages ------------------------------------------------------------------

    def _on_audio(self, data: bytes) -> None:
        params = self.params
        width = params.bytes_per_sample
        ms = len(data) / width * 1000 / params.sample_rate
        if len(data) % width or not 50 <= ms <= 1000:
            raise ProtocolViolation(
                3007, f"Input duration violation: {ms:g} ms. Expected between 50 and 1000 ms")

        keep = self.core.config.keep_audio

        def change(r: LiveRecord) -> None:
            if keep:
                r.audio.extend(data)
            r.audio_messages += 1
            r.received.append("audio")
        self.core.update(self.record, change)
        if self.terminating:
            return
        samples = _to_int16(data, params.encoding)
        self.samples += samples.size
        if self.core.config.enforce_pacing:
            elapsed = time.monotonic() - self.begin_at
            received = self.samples / params.sample_rate
            if received > elapsed + self.core.config.burst_allowance_s:
                raise ProtocolViolation(3007, "Audio Transmission Rate Exceeded: Received "
                                              f"{received:.1f} sec. audio in {elapsed:.1f} sec")
        self.audio.extend(samples.tobytes())
        self._plan(self.tracker.feed(samples))
        unneeded = self.tracker.keep_from() - self.audio_base
        if unneeded >= params.sample_rate:        # trim in steps of a second or more
            del self.audio[:unneeded * 2]
            self.audio_base += unneeded

    async def _on_text(self, text: str) -> None:
        try:
            message = protocol.parse_control(text)
        except ProtocolViolation:
            self.core.update(self.record, lambda r: r.received.append("invalid"))
            raise
        kind = message["type"]

        def change(r: LiveRecord) -> None:
            r.received.append(kind)
            r.control.append(message)
            if kind == "Terminate" and r.terminate_at is None:
                r.terminate_at = time.monotonic()
        self.core.update(self.record, change)
        if kind == "ForceEndpoint":
            self._plan(self.tracker.force("force"))
        elif kind == "UpdateConfiguration":
            settings = self.tracker.settings
            if isinstance(message.get("min_turn_silence"), int):
                settings.partial_silence_ms = max(10, message["min_turn_silence"])
            if isinstance(message.get("max_turn_silence"), int):
                settings.end_of_turn_silence_ms = max(10, message["max_turn_silence"])
            if isinstance(message.get("format_turns"), bool):
                self.format_turns = message["format_turns"]
        elif kind == "Terminate" and not self.terminating and not self.core.ignore_terminate():
            self.terminating = True
            self._plan(self.tracker.force("terminate"))
            self.queue.put_nowait(self._end_with_termination)
        # KeepAlive: no reply; it only counts as activity.

    # -- turns ----------------------------------------------------------------------------

    def _plan(self, plans: list[Plan]) -> None:
        for plan in plans:
            if isinstance(plan, Onset):
                if not self.universal and self.core.config.speech_started:
                    message = protocol.speech_started(self._ms(plan.sample))
                    self.queue.put_nowait(functools.partial(self.send, message))
            else:
                base = self.audio_base
                audio = np.frombuffer(
                    bytes(self.audio[(plan.start - base) * 2:(plan.end - base) * 2]), "<i2")
                # Partials are cut mid-word and forced ends cut phrases: only a turn ended by
                # silence must hold exactly the audio that was spoken.
                strict = (isinstance(plan, Final) and plan.reason == "silence"
                          and self.core.config.strict_audio)
                future = asyncio.get_running_loop().run_in_executor(
                    self.core.executor, self._recognise, audio, plan.start,
                    isinstance(plan, Final), strict)
                self.queue.put_nowait(functools.partial(self._emit_turn, plan, future))

    def _recognise(self, audio: np.ndarray, start: int, final: bool,
                   strict: bool) -> list[RecognisedWord]:
        rate = self.params.sample_rate
        if rate != RECOGNISER_RATE:
            import soxr
            audio = soxr.resample(audio, rate, RECOGNISER_RATE).astype("<i2")
        offset = self._ms(start)
        return [RecognisedWord(w.text, w.start_ms + offset, w.end_ms + offset, w.confidence)
                for w in self.core.recogniser.recognise(audio, verify=final,
                                                         mark_unverified=strict)]

    def _ms(self, sample: int) -> int:
        return sample * 1000 // self.params.sample_rate

    async def _emit(self) -> None:
        while True:
            step = await self.queue.get()
            if self.finished:
                return
            await step()

    async def _emit_turn(self, plan: Partial | Final,
                         future: asyncio.Future[list[RecognisedWord]]) -> None:
        words = await future
        turn = self.turn
        if isinstance(plan, Partial):
            if words:
                await self._send_partial(turn, tuple(words))
            return
        self.turn = _Turn(order=turn.order + 1 if (words or turn.sent_any) else turn.order)
        if not words and not turn.sent_any:
            return       # noise or a click: no turn
        await self._send_final(turn, tuple(words))

    async def _send_partial(self, turn: _Turn, words: tuple[RecognisedWord, ...]) -> None:
        turn.sent_any = True
        formatted = self.format_turns and not self.core.config.second_formatted_final
        if not self.universal:
            message = protocol.turn(turn.order, words, [False] * len(words), end_of_turn=False,
                                    formatted=True, eot_confidence=0.0, utterance=False)
            await self.send(message)
            return
        # Universal: finalized words never change; the newest word stays open.
        done = turn.finalized
        if tuple(w.text for w in words[:len(done)]) == tuple(w.text for w in done):
            done = done + words[len(done):-1]
            turn.finalized = done
        shown = done + words[len(done):]
        finals = [True] * len(done) + [False] * (len(shown) - len(done))
        await self.send(protocol.turn(turn.order, shown, finals, end_of_turn=False,
                                      formatted=formatted, transcript_words=len(done),
                                      eot_confidence=0.1, utterance=False))

    async def _send_final(self, turn: _Turn, words: tuple[RecognisedWord, ...]) -> None:
        finals = [True] * len(words)
        if not self.universal:
            await self.send(protocol.turn(turn.order, words, finals, end_of_turn=True,
                                          formatted=True, eot_confidence=1.0, utterance=True))
            return
        twice = self.format_turns and self.core.config.second_formatted_final
        first_formatted = self.format_turns and not twice
        await self.send(protocol.turn(turn.order, words, finals, end_of_turn=True,
                                      formatted=first_formatted, eot_confidence=0.9,
                                      utterance=True))
        if twice:
            await self.send(protocol.turn(turn.order, words, finals, end_of_turn=True,
                                          formatted=True, eot_confidence=0.9, utterance=True))

    # -- endings and faults ---------------------------------------------------------------

    async def send(self, message: dict[str, Any], *, ending: bool = False) -> None:
        if self.finished and not ending:
            return  # a turn decoded while the session ends must not follow its Error/Termination
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(protocol.dumps(message))
            self.core.update(self.record, lambda r: r.sent.append(message))

    async def send_raw(self, text: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(text)
            self.core.update(self.record, lambda r: r.sent.append({"raw": text}))

    async def _end_with_termination(self) -> None:
        if self.finished:
            return
        self.finished = True
        await self.send(self._termination(), ending=True)
        await self.close(1000, "")

    def _termination(self) -> dict[str, Any]:
        return protocol.termination(self.samples / self.params.sample_rate,
                                    time.monotonic() - self.begin_at)

    async def fail(self, code: int, message: str) -> None:
        """Error{code, message} then close ``code``: pending turns are not sent."""
        if self.finished:
            return
        self.finished = True
        await self.send(protocol.error(code, message), ending=True)
        await self.close(code, protocol.close_reason(message))

    async def cancel(self) -> None:
        await self.fail(3005, "Session Cancelled: An error occurred")

    async def expire(self) -> None:
        style = self.core.config.expiry
        if style == "termination":
            await self._end_with_termination()
            return
        if style == "both" and not self.finished:
            await self.send(self._termination())
        await self.fail(3008, "Session Expired: Maximum session duration exceeded")

    async def close(self, code: int, reason: str) -> None:
        """Send the close frame; the closing handshake finishes in the background, so a fault
        triggered from a test returns before the client has read anything."""
        def change(r: LiveRecord) -> None:
            r.closed_by, r.close_code, r.close_reason = "server", code, reason
        self.core.update(self.record, change)
        self._closing = asyncio.get_running_loop().create_task(self.ws.close(code, reason))
        await asyncio.sleep(0)

    async def drop(self) -> None:
        """Cut TCP without a close frame: the client sees 1006 / a lost connection."""
        self.finished = True
        self.core.update(self.record, lambda r: setattr(r, "closed_by", "drop"))
        self.ws.transport.abort()


def _to_int16(data: bytes, encoding: str) -> np.ndarray:
    if encoding == "pcm_s16le":
        return np.frombuffer(data, dtype="<i2")
    return _MULAW[np.frombuffer(data, dtype=np.uint8)]


def _mulaw_table() -> np.ndarray:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = ((mantissa << 3) + 0x84) << exponent
    values = np.where(codes & 0x80, 0x84 - magnitude, magnitude - 0x84)
    return values.astype("<i2")


_MULAW = _mulaw_table()
