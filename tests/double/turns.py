"""Where turns begin and end in the audio of one session (an energy endpointer, in audio time).

The tracker sees every sample a session receives, in 10 ms frames, and plans what to decode:
``Onset`` (speech started), ``Partial`` and ``Final`` carry the sample span whose audio the
emitter decodes. It never looks at the wall clock, so replaying audio faster than real time
gives the same turns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAME_MS = 10


@dataclass(frozen=True)
class Onset:
    sample: int


@dataclass(frozen=True)
class Partial:
    start: int
    end: int
    reason: str          # "early", "pause" or "interval"


@dataclass(frozen=True)
class Final:
    start: int
    end: int
    reason: str          # "silence", "force" or "terminate"


Plan = Onset | Partial | Final


@dataclass
class TrackerSettings:
    rate: int
    universal: bool
    threshold_rms: float
    partial_silence_ms: int
    end_of_turn_silence_ms: int
    early_partial_ms: int | None
    interval_ms: int
    min_speech_ms: int
    padding_ms: int


class TurnTracker:
    def __init__(self, settings: TrackerSettings) -> None:
        self.settings = settings
        self._frame = settings.rate * FRAME_MS // 1000
        self._pending = np.zeros(0, dtype=np.int16)
        self._frames_seen = 0          # frames classified so far
        self._floor = 0                # no turn may reach back before this sample
        self._in_turn = False
        self._onset = 0                # first speech frame of the open turn
        self._last_speech = 0          # last speech frame of the open turn
        self._speech_frames = 0
        self._silence_run = 0
        self._pause_partial_sent = False
        self._early_sent = False
        self._next_interval = 0

    @property
    def in_turn(self) -> bool:
        return self._in_turn

    def feed(self, samples: np.ndarray) -> list[Plan]:
        """Classify the new samples; plans in the order they happen."""
        data = np.concatenate([self._pending, samples]) if self._pending.size else samples
        usable = data.size // self._frame * self._frame
        self._pending = data[usable:].copy()
        if usable == 0:
            return []
        frames = data[:usable].astype(np.float64).reshape(-1, self._frame)
        loud = np.sqrt((frames ** 2).mean(axis=1)) > self.settings.threshold_rms
        plans: list[Plan] = []
        for is_speech in loud:
            index = self._frames_seen
            self._frames_seen += 1
            if is_speech:
                self._speech(index, plans)
            elif self._in_turn:
                self._silence(plans)
        return plans

    def keep_from(self) -> int:
        """The earliest sample a future plan can need; older audio may be dropped."""
        if self._in_turn:
            return self._start()
        padding = self.settings.padding_ms * self.settings.rate // 1000
        return max(self._floor, self._frames_seen * self._frame - padding)

    def force(self, reason: str) -> list[Plan]:
        """ForceEndpoint or Terminate: end the open turn now."""
        if not self._in_turn:
            return []
        return self._end(reason, self._frames_seen * self._frame)

    def _speech(self, index: int, plans: list[Plan]) -> None:
        s = self.settings
        if not self._in_turn:
            self._in_turn = True
            self._onset = index
            self._speech_frames = 0
            self._early_sent = False
            self._next_interval = index + s.interval_ms // FRAME_MS
            plans.append(Onset(index * self._frame))
        self._last_speech = index
        self._speech_frames += 1
        self._silence_run = 0
        self._pause_partial_sent = False
        end = (index + 1) * self._frame
        if s.universal:
            if index + 1 >= self._next_interval:
                self._next_interval += s.interval_ms // FRAME_MS
                plans.append(Partial(self._start(), end, "interval"))
        elif (s.early_partial_ms is not None and not self._early_sent
              and self._speech_frames * FRAME_MS >= s.early_partial_ms):
            self._early_sent = True
            plans.append(Partial(self._start(), end, "early"))

    def _silence(self, plans: list[Plan]) -> None:
        s = self.settings
        self._silence_run += 1
        silent_ms = self._silence_run * FRAME_MS
        if silent_ms >= s.end_of_turn_silence_ms:
            plans.extend(self._end("silence", self._padded_end()))
        elif silent_ms >= s.partial_silence_ms and not self._pause_partial_sent \
                and not s.universal:
            self._pause_partial_sent = True
            plans.append(Partial(self._start(), self._padded_end(), "pause"))

    def _end(self, reason: str, end: int) -> list[Plan]:
        start = self._start()
        self._in_turn = False
        self._floor = end
        if self._speech_frames * FRAME_MS < self.settings.min_speech_ms:
            return []
        return [Final(start, end, reason)]

    def _start(self) -> int:
        padding = self.settings.padding_ms * self.settings.rate // 1000
        return max(self._floor, self._onset * self._frame - padding)

    def _padded_end(self) -> int:
        padding = self.settings.padding_ms * self.settings.rate // 1000
        return min((self._last_speech + 1) * self._frame + padding,
                   self._frames_seen * self._frame)
