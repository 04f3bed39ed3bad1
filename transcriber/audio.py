"""Per-device audio bookkeeping: the pre-roll ring, audio awaiting confirmation, and the timeline
that maps a session's word timestamps back to capture time.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from capture.contract import AudioFrame


@dataclass(eq=False)
class HeldFrame:
    """A frame read from the stream, with what we know of it."""

    entry_id: bytes
    frame: AudioFrame
    speech_ms: int
    sent_at_ms: int | None = None  # offset in the current connection's audio, once sent

    @property
    def duration_ms(self) -> int:
        return self.frame.duration_us // 1000


class Timeline:
    """Maps ms of one connection's audio to capture time (epoch µs).

    Stores one segment per run of contiguous frames, so a 3 h session of 50 ms frames costs a
    handful of entries, not 216 000.
    """

    def __init__(self) -> None:
        self._offsets: list[int] = []  # connection ms where each segment starts
        self._ts: list[int] = []  # capture µs of that point
        self._end_ms = 0
        self._end_ts: int | None = None

    @property
    def duration_ms(self) -> int:
        return self._end_ms

    def append(self, ts_us: int, duration_ms: int) -> int:
        """Record a frame sent next; returns its offset in the connection's audio."""
        offset = self._end_ms
        if self._end_ts is None or ts_us != self._end_ts:
            self._offsets.append(offset)
            self._ts.append(ts_us)
        self._end_ms = offset + duration_ms
        self._end_ts = ts_us + duration_ms * 1000
        return offset

    def capture_ts(self, offset_ms: int) -> int | None:
        if not self._offsets:
            return None
        offset_ms = min(max(offset_ms, 0), self._end_ms)
        i = bisect.bisect_right(self._offsets, offset_ms) - 1
        return self._ts[i] + (offset_ms - self._offsets[i]) * 1000


class PreRoll:
    """The last ``ms`` of audio while idle, so a session starts before the detected onset."""

    def __init__(self, ms: int) -> None:
        self._ms = ms
        self._frames: deque[HeldFrame] = deque()
        self._held_ms = 0

    def push(self, held: HeldFrame) -> list[HeldFrame]:
        """Add a frame; returns the frames that fell out (done with: acknowledge them)."""
        self._frames.append(held)
        self._held_ms += held.duration_ms
        evicted = []
        while self._frames and self._held_ms - self._frames[0].duration_ms >= self._ms:
            old = self._frames.popleft()
            self._held_ms -= old.duration_ms
            evicted.append(old)
        return evicted

    def drain(self) -> list[HeldFrame]:
        frames = list(self._frames)
        self._frames.clear()
        self._held_ms = 0
        return frames


class Unconfirmed:
    """Audio since the last final turn: sent or waiting to be sent, kept for a resend.

    A final turn confirms everything up to its last word; a reconnect resends the rest.
    """

    def __init__(self, max_ms: int) -> None:
        self._max_ms = max_ms
        self._frames: deque[HeldFrame] = deque()
        self._next = 0  # index of the first unsent frame
        self._held_ms = 0

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def held_ms(self) -> int:
        return self._held_ms

    def extend(self, frames: Iterable[HeldFrame]) -> list[HeldFrame]:
        """Add frames to send; returns any that overflowed the cap (lost: count them)."""
        for held in frames:
            self._frames.append(held)
            self._held_ms += held.duration_ms
        overflow = []
        while self._held_ms > self._max_ms and self._frames:
            overflow.append(self._popleft())
        return overflow

    def unsent(self) -> list[HeldFrame]:
        return list(self._frames)[self._next:]

    def has_unsent(self) -> bool:
        return self._next < len(self._frames)

    def unsent_speech(self) -> bool:
        return any(h.speech_ms for h in list(self._frames)[self._next:])

    def any_speech(self) -> bool:
        return any(h.speech_ms for h in self._frames)

    def take_unsent(self, max_ms: int) -> list[HeldFrame]:
        """Up to ``max_ms`` of the oldest unsent frames (at least one if any), marked as taken."""
        taken: list[HeldFrame] = []
        total = 0
        while self._next < len(self._frames):
            held = self._frames[self._next]
            if taken and total + held.duration_ms > max_ms:
                break
            taken.append(held)
            total += held.duration_ms
            self._next += 1
        return taken

    def confirm_until(self, offset_ms: int) -> list[HeldFrame]:
        """Drop sent frames that end at or before ``offset_ms`` of the connection's audio."""
        done = []
        while self._frames and self._next > 0:
            head = self._frames[0]
            if head.sent_at_ms is None or head.sent_at_ms + head.duration_ms > offset_ms:
                break
            done.append(self._popleft())
        return done

    def confirm_sent(self) -> list[HeldFrame]:
        """After a clean Termination every sent frame has been transcribed."""
        done = []
        while self._frames and self._next > 0:
            done.append(self._popleft())
        return done

    def rewind(self) -> None:
        """A new connection: everything held is unsent again."""
        for held in self._frames:
            held.sent_at_ms = None
        self._next = 0

    def drain(self) -> list[HeldFrame]:
        frames = list(self._frames)
        self._frames.clear()
        self._next = 0
        self._held_ms = 0
        return frames

    def _popleft(self) -> HeldFrame:
        held = self._frames.popleft()
        self._held_ms -= held.duration_ms
        if self._next > 0:
            self._next -= 1
        return held
