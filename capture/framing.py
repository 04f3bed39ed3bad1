"""Cutting 16 kHz mono audio into the contract's 50 ms frames, numbered and time-stamped.

Time stamps come from the sample count, not from when a frame happened to be cut:
``ts(n) = t0 + n * 50 ms``, where ``t0`` is the capture time of the first sample on a monotonic
clock anchored once to wall time. So thread scheduling adds no jitter and a wall-clock step (NTP)
never makes time stamps jump. Where audio was really lost (device overflow, a reopened device),
``discontinuity`` skips the seq numbers the gap covered, estimated from the monotonic clock; the
skipped frames are counted as dropped, so ``seq`` gaps are exactly the loss.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from capture.buffer import FrameBuffer
from capture.common.logs import OncePerKind
from capture.contract import FRAME_BYTES, FRAME_MS, FRAME_US, AudioFrame, EndOfStream
from capture.metrics import DROP_BUFFER_FULL, CaptureMetrics

log = logging.getLogger(__name__)

FRAME_S = FRAME_MS / 1000


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> float:
        """Unix time, seconds."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


class Source(Protocol):
    description: str
    """Short and bounded, e.g. ``mic:USB Audio`` or ``file:speech.wav`` (goes into the registry)."""

    def run(self, framer: Framer, stop: threading.Event) -> None:
        """Deliver audio to ``framer`` until the source ends (return) or ``stop`` is set."""
        ...


class Framer:
    """Turns 16 kHz mono s16le byte chunks into numbered frames in a FrameBuffer.

    Driven by one thread at a time (the source's); ``last_audio`` may be read from any thread.
    """

    def __init__(self, run: str, clock: Clock, buffer: FrameBuffer,
                 metrics: CaptureMetrics) -> None:
        self.run = run
        self._clock = clock
        self._buffer = buffer
        self._metrics = metrics
        # The one anchoring of the monotonic clock to wall time.
        self._anchor_mono = clock.monotonic()
        self._anchor_wall_us = round(clock.wall() * 1_000_000)
        self._t0_mono: float | None = None
        self._t0_us = 0
        self._next_seq = 0
        self._pending = bytearray()
        self._once = OncePerKind(log)
        self.last_audio: float | None = None
        """Monotonic time of the last ``write``."""

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def started(self) -> bool:
        return self._t0_mono is not None

    def epoch_us(self, mono: float) -> int:
        return self._anchor_wall_us + round((mono - self._anchor_mono) * 1_000_000)

    def start(self, first_sample_mono: float) -> None:
        """Fix ``t0``: the monotonic time the first sample was captured."""
        self._t0_mono = first_sample_mono
        self._t0_us = self.epoch_us(first_sample_mono)

    def write(self, pcm: bytes) -> None:
        if self._t0_mono is None:
            msg = "start() first"
            raise RuntimeError(msg)
        self.last_audio = self._clock.monotonic()
        self._pending += pcm
        while len(self._pending) >= FRAME_BYTES:
            self._emit(bytes(self._pending[:FRAME_BYTES]))
            del self._pending[:FRAME_BYTES]

    def discontinuity(self, resume_mono: float, reason: str) -> int:
        """Audio before ``resume_mono`` was lost: skip the seq numbers of the gap.

        The frame being filled is discarded, and at least one seq number is skipped even when
        the clock puts the loss under one frame, so every known loss shows as a gap.
        Returns the number of frames counted as dropped with ``reason``.
        """
        if self._t0_mono is None:
            self.start(resume_mono)
            return 0
        slot = round((resume_mono - self._t0_mono) / FRAME_S)
        lost = max(slot - self._next_seq, 1)
        self._pending.clear()
        self._next_seq += lost
        self._metrics.dropped[reason].inc(lost)
        self._once.warning(reason, "audio lost (%s): skipped %d frames at seq %d", reason, lost,
                           self._next_seq - lost)
        return lost

    def finish(self) -> EndOfStream:
        """Pad the last partial frame with silence (losing no audio) and return the EOS entry."""
        if self._t0_mono is None:  # no audio ever came
            self.start(self._clock.monotonic())
        if self._pending:
            self._emit(bytes(self._pending) + bytes(FRAME_BYTES - len(self._pending)))
            self._pending.clear()
        return EndOfStream(run=self.run, seq=self._next_seq, ts_us=self._ts(self._next_seq))

    def _ts(self, seq: int) -> int:
        return self._t0_us + seq * FRAME_US

    def _emit(self, pcm: bytes) -> None:
        seq = self._next_seq
        self._next_seq += 1
        dropped = self._buffer.push(AudioFrame(run=self.run, seq=seq, ts_us=self._ts(seq), pcm=pcm))
        self._metrics.frames.inc()
        if dropped:
            self._metrics.dropped[DROP_BUFFER_FULL].inc(dropped)
